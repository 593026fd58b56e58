"""sample_tokens' binary search picks exactly the index the count `(cdf <= target).sum()` picks (the
inverse-CDF rule it replaced), also with zero-probability tokens, exact boundary hits and u = 0."""

import torch

from megatron_oreal.rollout.cpu_engine import filter_probs, sample_tokens
from megatron_oreal.rollout.engine import SamplingParams


def _by_count(logits, uniforms, sp):
    probs, order = filter_probs(logits.float(), sp)
    cdf = torch.cumsum(probs.double(), dim=-1)
    target = uniforms.to(cdf.dtype) * cdf[:, -1]
    idx = (cdf <= target[:, None]).sum(dim=-1).clamp_(max=cdf.shape[-1] - 1)
    return order.gather(1, idx[:, None]).squeeze(1) if order is not None else idx


def test_search_equals_count():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 300, generator=g) * 3
    logits[:, ::7] = float("-inf")  # zero-probability tokens inside the vocabulary
    for sp in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=20),
               SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=1.3, top_k=50, top_p=0.95)):
        u = torch.rand(64, generator=g, dtype=torch.float64)
        u[:4] = torch.tensor([0.0, 0.5, 1.0 - 1e-16, 0.25])
        probs, _ = filter_probs(logits, sp)
        cdf = torch.cumsum(probs.double(), dim=-1)
        u[4:12] = cdf[4:12, 10] / cdf[4:12, -1]  # targets on (or next to) a cdf value
        assert torch.equal(sample_tokens(logits, u, sp), _by_count(logits, u, sp))
