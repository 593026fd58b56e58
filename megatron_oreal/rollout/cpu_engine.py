"""The CPU rollout engine: a batched KV-cache sampling loop over a `transformers` causal LM.

Used by the embedded default (tiny Qwen2 on 2 cores) and by every CPU test. It owns its own copy of
the model; the trainer pushes new weights with `update_weights` after each step (HF names).

How a call runs (per chunk of prompts):
  1. prefill each distinct prompt once, left-padded, with an explicit causal+padding mask and
     per-row position ids (so padding changes nothing but the low bits of the sums);
  2. repeat the KV cache `n` times (samples of a prompt share its prefill);
  3. decode one token per step for all live rows; rows that stop are dropped from the batch once
     enough of them are done (the cache is compacted), so long tails cost only their own rows.
What makes it fast on a tiny model (measured; tests/unit/rollout/bench_cpu_engine.py times it):
a preallocated KV cache (HF's DynamicCache concatenates every step: quadratic copying); a plain
matmul attention for decoding (PyTorch's CPU flash-SDPA kernel costs ~6 ms per call at q=1); for
Qwen2/Llama, a lean decode step (lean_decode.py: our own forward over the HF model's weights, fused
q/k/v and gate/up, about a third of the ops; ~0.4-0.6x the HF forward's time at 1-16 rows, where the
step is overhead, ~0.8-0.9x at 128 rows, where the matmuls are the cost); and outputs kept in
tensors, converted to lists once per call. Other models, or `lean=False`, decode with the HF forward
(the choice is made at construction; `lean_off_reason` says why). The prefill is always the HF
forward (once per call); both paths read and write the same cache.

Randomness: one generator per (seed, prompt position, sample index) draws all the uniforms of that
row up front; tokens are drawn by inverse CDF. So a row's samples do not depend on the chunking or
on which other rows are in the batch (up to float round-off of the padded batch).
"""

from __future__ import annotations

import copy
import hashlib
import math
from pathlib import Path
from typing import Any, Iterable

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from megatron_oreal.rollout.engine import GenOutput, SamplingParams
from megatron_oreal.rollout.lean_decode import LeanDecoder, unsupported_reason

ATTN_NAME = "oreal_cpu_matmul"


def _matmul_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Softmax attention with GQA by reshaping the queries (no repeat_kv copy).

    query [B, Hq, q, D]; key/value [B, Hkv, k, D]; attention_mask additive [B, 1, q, k].
    Query head h reads kv head h // G (transformers' repeat_kv order), so viewing the Hq heads as
    [Hkv, G] groups them correctly. Returns ([B, q, Hq, D], None) like HF attention functions.
    """
    bsz, hq, q_len, dim = query.shape
    hkv = key.shape[1]
    group = hq // hkv
    qg = query.reshape(bsz, hkv, group * q_len, dim)
    scores = torch.matmul(qg, key.transpose(2, 3)) * scaling  # [B, Hkv, G*q, k]
    if attention_mask is not None:
        scores = (scores.view(bsz, hkv, group, q_len, -1) + attention_mask[:, :, None]).view(bsz, hkv, group * q_len, -1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(probs, value).view(bsz, hq, q_len, dim)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_NAME, _matmul_attention)
# Without a registered mask function transformers passes mask=None to a custom attention (no causal
# masking at all). Registering its eager (additive float) mask keeps a plain `model(input_ids)` on
# the engine's model correct; the decode loop passes its own prebuilt masks and skips this.
AttentionMaskInterface.register(ATTN_NAME, eager_mask)


class _Workspace:
    """Flat buffers for the KV caches, reused by later calls while they total at most KEEP_BYTES.

    Why: fresh multi-MiB tensors are paid in page faults on first touch (~3,000 minor faults per
    tiny-model rollout call, about a tenth of its time, measured); reused memory pays them once. The
    bound keeps a big model's cache (GBs) allocated per call and freed, as before."""

    KEEP_BYTES = 64 << 20

    def __init__(self):
        self._bufs: dict[tuple, torch.Tensor] = {}

    def get(self, key: tuple, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous tensor of `shape` (contents undefined); the same memory for the same key."""
        numel = math.prod(shape)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            self._bufs.pop(key, None)
            buf = torch.empty(numel, dtype=dtype)
            kept = sum(b.numel() * b.element_size() for b in self._bufs.values())
            if kept + buf.numel() * buf.element_size() <= self.KEEP_BYTES:
                self._bufs[key] = buf
        return buf[:numel].view(shape)


class _PreallocLayer(DynamicLayer):
    """KV cache layer with a fixed capacity, written in place; returns views of the filled prefix.

    Keys are stored transposed ([B, H, D, capacity]) and handed out as a transposed view, so the
    attention's `key.transpose(2, 3)` is a plain strided matrix for the matmul (2-3x faster than
    a sliced [B, H, len, D] view at decode shapes, measured).
    """

    def __init__(self, capacity: int, workspace: _Workspace | None = None, index: int = 0):
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self._ws = workspace or _Workspace()
        self._index = index
        self._slot = 0  # which of the two row-level buffers holds the cache (compaction alternates)

    def _buffer(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self._ws.get((self._index, name), shape, self.dtype)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            b, h, _, d = key_states.shape
            self.dtype, self.device = key_states.dtype, key_states.device
            self._kt = self._buffer("kt", (b, h, d, self.capacity)).zero_()
            self._v = self._buffer("v", (b, h, self.capacity, value_states.shape[-1])).zero_()
            self.is_initialized = True
        t = key_states.shape[-2]
        if self.length + t > self.capacity:
            raise RuntimeError(f"KV cache overflow: {self.length}+{t} > capacity {self.capacity}")
        self._kt[:, :, :, self.length : self.length + t] = key_states.transpose(2, 3)
        self._v[:, :, self.length : self.length + t] = value_states
        self.length += t
        self._refresh()
        return self.keys, self.values

    def append_step(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The lean decode's write: key/value [B, H, D] of one new position. Returns the filled prefix as
        (keys transposed [B, H, D, len], values [B, H, len, D]); `keys`/`values` are refreshed lazily
        (only an HF forward reads them, and its `update` refreshes them first)."""
        if self.length + 1 > self.capacity:
            raise RuntimeError(f"KV cache overflow: {self.length}+1 > capacity {self.capacity}")
        self._kt[:, :, :, self.length] = key
        self._v[:, :, self.length] = value
        self.length += 1
        return self._kt[:, :, :, : self.length], self._v[:, :, : self.length]

    def reserve_step(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """For a kernel that writes this step's key/value itself (native.decode_attention): the whole
        buffers (keys transposed [B, H, D, capacity], values [B, H, capacity, D], both contiguous) and
        the position to write; the length counts it from here on."""
        if self.length + 1 > self.capacity:
            raise RuntimeError(f"KV cache overflow: {self.length}+1 > capacity {self.capacity}")
        if not (self._kt.is_contiguous() and self._v.is_contiguous()):
            raise RuntimeError("reserve_step: the cache buffers are not contiguous")
        self.length += 1
        return self._kt, self._v, self.length - 1

    def _refresh(self) -> None:
        self.keys = self._kt[:, :, :, : self.length].transpose(2, 3)
        self.values = self._v[:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length

    # Row-level caches live in two workspace buffers per tensor: the repeat fills one, each compaction
    # copies into the other. Expand-copy and index_select give the same values as repeat_interleave
    # and x[indices] with plain copy kernels (2x and 5x faster at decode shapes, measured).
    def batch_repeat_interleave(self, repeats: int) -> None:
        self._slot = 0
        self._kt, self._v = (self._rows(name, x, x.shape[0] * repeats).view(x.shape[0], repeats, *x.shape[1:])
                             .copy_(x[:, None].expand(x.shape[0], repeats, *x.shape[1:])).view(-1, *x.shape[1:])
                             for name, x in (("kt", self._kt), ("v", self._v)))
        self._refresh()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._slot ^= 1
        self._kt, self._v = (torch.index_select(x, 0, indices, out=self._rows(name, x, indices.numel()))
                             for name, x in (("kt", self._kt), ("v", self._v)))
        self._refresh()

    def _rows(self, name: str, like: torch.Tensor, rows: int) -> torch.Tensor:
        return self._buffer(f"{name}{self._slot}", (rows, *like.shape[1:]))


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed per (call seed, prompt position, sample index); a hash, so nearby triples are unrelated."""
    digest = hashlib.blake2b(f"{seed}/{prompt_index}/{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def filter_probs(logits: torch.Tensor, sampling: SamplingParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Temperature, top-k, top-p -> (probs [R, V'], order [R, V'] or None).

    With top-p the probs come sorted descending and `order` maps back to token ids. top-k keeps ties
    at the k-th value (as HF's TopKLogitsWarper); top-p keeps the smallest prefix of tokens whose
    mass reaches top_p (a token is kept when the mass strictly above it is < top_p), at least one.
    """
    scaled = logits / sampling.temperature if sampling.temperature != 1.0 else logits  # x / 1 is x, bit for bit
    if sampling.top_k > 0 and sampling.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, sampling.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if sampling.top_p >= 1.0:
        return probs, None
    probs, order = _sorted_head(probs, sampling.top_p)
    mass_above = torch.cumsum(probs, dim=-1) - probs
    probs = probs.masked_fill(mass_above >= sampling.top_p, 0.0)
    return probs, order


TOP_P_HEAD = 512  # candidates tried before a full sort: a 49k-vocabulary sort per row per step is the cost


def _sorted_head(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """probs sorted descending with their token ids, cut to the first TOP_P_HEAD when those already
    hold >= top_p of every row's mass (then the nucleus lies inside them: the result is the same as a
    full sort's). Small vocabularies, or a flat row, take the full sort."""
    if probs.shape[-1] > 4 * TOP_P_HEAD:
        head, order = torch.topk(probs, TOP_P_HEAD, dim=-1)
        if bool((head.sum(dim=-1) >= top_p).all()):
            return head, order
    return torch.sort(probs, dim=-1, descending=True)


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """One token per row: argmax when greedy, else inverse-CDF with the row's uniform in [0, 1)."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    probs, order = filter_probs(logits.float(), sampling)
    cdf = torch.cumsum(probs.double(), dim=-1)
    target = uniforms.to(cdf.dtype) * cdf[:, -1]
    # first index whose cdf exceeds the target: zero-probability tokens never qualify. A cumsum of
    # non-negative terms never decreases, so a binary search finds the index a count of cdf <= target
    # gives (equal: test_sampling_search.py), in O(log V) instead of two passes over [R, V] (32 ms a
    # step at 49k vocabulary x 128 rows, measured)
    idx = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1).clamp_(max=cdf.shape[-1] - 1)
    if order is not None:
        idx = order.gather(1, idx[:, None]).squeeze(1)
    return idx


class CPUEngine:
    """RolloutEngine on a `transformers` causal LM (an HF folder or a model object, deep-copied).

    lean=True (default) decodes with lean_decode.LeanDecoder where it covers the model exactly
    (Qwen2ForCausalLM, LlamaForCausalLM; see its docstring), else with the HF forward; lean=False
    forces the HF forward (A/B checks: tests/unit/rollout/test_lean_decode.py, bench_cpu_engine.py).
    One `generate` at a time per engine: the KV workspace and the lean rope table are engine state.
    """

    def __init__(self, hf_dir_or_model: Any, tokenizer: Any = None, *, max_batch_rows: int = 512,
                 dtype: torch.dtype = torch.float32, threads: int = 0, lean: bool = True):
        if isinstance(hf_dir_or_model, (str, Path)):
            path = Path(hf_dir_or_model)
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"CPUEngine: {path} has no config.json (expected a Hugging Face model folder)")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        else:
            model = copy.deepcopy(hf_dir_or_model).to(dtype)
        layer_types = set(getattr(model.config, "layer_types", None) or ["full_attention"])
        if layer_types != {"full_attention"}:
            raise ValueError(f"CPUEngine supports full-attention models only; the config has layer types {sorted(layer_types)}")
        model.config._attn_implementation = ATTN_NAME
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_batch_rows = max_batch_rows
        self.threads = threads
        self.vocab_size = self.model.get_input_embeddings().weight.shape[0]
        # rotary positions past this were never trained: responses are cut there ("length")
        self.max_position = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        self._params = dict(self.model.named_parameters())
        self._params.update(dict(self.model.named_buffers()))
        self._workspace = _Workspace()  # KV-cache memory reused across calls (bounded; see _Workspace)
        # Decode steps use the lean forward (lean_decode.py) where it covers the model exactly; else
        # (or with lean=False, for A/B checks) the HF forward. Chosen once here; why not: lean_off_reason.
        self.lean_off_reason = "lean=False" if not lean else unsupported_reason(self.model)
        self.lean = LeanDecoder(self.model) if self.lean_off_reason is None else None
        self._closed = False

    # ---- protocol ---------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[list[GenOutput]]:
        if self._closed:
            raise RuntimeError("CPUEngine.generate called after close()")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"CPUEngine.generate: prompt {i} is empty")
            bad = [t for t in p if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"CPUEngine.generate: prompt {i} has token ids {bad[:5]} outside the vocab [0, {self.vocab_size})")
            if self.max_position and len(p) >= self.max_position:
                raise ValueError(f"CPUEngine.generate: prompt {i} is {len(p)} tokens; the model's "
                                 f"max_position_embeddings is {self.max_position}")
        if self.lean is not None:
            self.lean.refresh()  # re-fuse if a parameter was replaced rather than written in place
        per_chunk = max(1, self.max_batch_rows // sampling.n)
        results: list[list[GenOutput]] = []
        old_threads = torch.get_num_threads()
        if self.threads > 0:
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                for start in range(0, len(prompts), per_chunk):
                    results.extend(self._generate_chunk(prompts[start : start + per_chunk], start, sampling))
        finally:
            if self.threads > 0:
                torch.set_num_threads(old_threads)
        return results

    def greedy(self, prompts: list[list[int]], max_new_tokens: int, stop_token_ids: Iterable[int]) -> list[GenOutput]:
        """Evaluation helper: temperature 0, one output per prompt."""
        sp = SamplingParams.greedy_eval(max_new_tokens, tuple(stop_token_ids))
        return [outs[0] for outs in self.generate(prompts, sp)]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the model in place (dtype-cast; shapes must match exactly)."""
        with torch.no_grad():
            for name, tensor in named_tensors:
                target = self._params.get(name)
                if target is None:
                    # tied embeddings: HF checkpoints may still carry lm_head.weight
                    if name == "lm_head.weight" and getattr(self.model.config, "tie_word_embeddings", False):
                        target = self.model.get_input_embeddings().weight
                    else:
                        raise KeyError(f"CPUEngine.update_weights: unknown tensor {name!r} (not a parameter of "
                                       f"{type(self.model).__name__})")
                if tuple(tensor.shape) != tuple(target.shape):
                    raise ValueError(f"CPUEngine.update_weights: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                     f"the model expects {tuple(target.shape)}")
                target.copy_(tensor.detach().to(device=target.device, dtype=target.dtype))

    def release_memory(self) -> None:  # nothing to free on the CPU path; kept for the protocol
        pass

    def resume_memory(self) -> None:
        pass

    def health(self) -> bool:
        return not self._closed

    def close(self) -> None:
        self._closed = True

    # ---- the loop -----------------------------------------------------------------------------
    def _generate_chunk(self, prompts: list[list[int]], first_index: int, sp: SamplingParams) -> list[list[GenOutput]]:
        n, num = sp.n, len(prompts)
        lens = torch.tensor([len(p) for p in prompts])
        cap = self.max_position or 1 << 62
        budgets = torch.tensor([min(sp.budget(len(p)), cap - len(p)) for p in prompts]).repeat_interleave(n)
        outputs = [[GenOutput([], "length", [] if sp.return_logprobs else None) for _ in range(n)] for _ in range(num)]
        max_new = int(budgets.max())
        if max_new == 0:
            return outputs
        cache, logits, key_mask = self._prefill(prompts, n, max_new)
        if self.lean is not None:
            self.lean.prepare(int(lens.max()) + max_new)
        rows = torch.arange(num * n)  # global row id = prompt * n + sample, for the live rows
        width = max(len(p) for p in prompts)
        next_pos = lens.repeat_interleave(n)
        uniforms = self._uniforms(num, n, first_index, max_new, sp)
        stop_ids = sorted(set(sp.stop_token_ids))
        stops = torch.tensor(stop_ids, dtype=torch.long)
        # Per-step bookkeeping is a dozen tiny ops, each a few µs of dispatch at any batch size: skip
        # the ones that cannot change anything. No row reaches its budget before `min_budget` steps;
        # with no left padding (prompts of one length) the additive key mask is all zeros.
        min_budget = int(budgets.min())
        padded = any(len(p) != width for p in prompts)
        # Outputs live in tensors, converted once at the end (per-row Python appends, a tolist and an
        # isin/index bookkeeping per step cost more than the tiny model's step). A row stops and never
        # resumes, so a row live at step s has emitted exactly s tokens: slot [g, s] is its next token.
        # Slots past a row's end hold junk until it is compacted away; its length is found at the end.
        out_tok = torch.zeros(num * n, max_new, dtype=torch.long)
        out_lp = torch.zeros(num * n, max_new) if sp.return_logprobs else None
        row_budget = budgets.clone()  # budgets of the rows in the batch, compacted with them
        live = budgets > 0
        n_live = int(live.sum())
        temp = sp.temperature if sp.temperature > 0 else 1.0
        for step in range(max_new):
            if step > 0:
                if n_live < 0.75 * rows.numel():  # compact: drop finished rows from the batch
                    keep = live.nonzero().squeeze(1)
                    cache.batch_select_indices(keep)
                    rows, next_pos, live = rows[keep], next_pos[keep], live[keep]
                    if padded or self.lean is None:
                        key_mask = key_mask.index_select(0, keep)
                    token, uniforms, row_budget = token[keep], uniforms[keep], row_budget[keep]
                if self.lean is not None:
                    logits = self.lean.step(token, next_pos, cache.layers, key_mask if padded else None)
                else:
                    kv_len = width + step  # prefill + the `step` tokens fed so far, this one included
                    logits = self.model(input_ids=token[:, None], attention_mask=key_mask[..., :kv_len],
                                        position_ids=next_pos[:, None], past_key_values=cache, use_cache=True,
                                        logits_to_keep=1).logits[:, -1]
                next_pos = next_pos + 1
            token = sample_tokens(logits, uniforms[:, step], sp)
            out_tok[rows, step] = token
            if out_lp is not None:
                out_lp[rows, step] = torch.log_softmax(logits.float() / temp, dim=-1).gather(1, token[:, None]).squeeze(1)
            if step + 1 >= min_budget:
                live = live & (row_budget > step + 1)
            if len(stop_ids) == 1:
                live &= token != stop_ids[0]
            elif stop_ids:
                live &= ~torch.isin(token, stops)
            n_live = int(live.sum())
            if n_live == 0:
                break
        # A row ends at its first stop token (included; reason "stop") or at its budget ("length").
        within = torch.arange(max_new)[None, :] < budgets[:, None]
        is_stop = (torch.isin(out_tok, stops) if stops.numel() else torch.zeros_like(within)) & within
        lengths = torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1, budgets)
        token_lists, lengths, stop_flags = out_tok.tolist(), lengths.tolist(), is_stop.any(1).tolist()
        lp_lists = out_lp.tolist() if out_lp is not None else None
        for g in range(num * n):
            out = outputs[g // n][g % n]
            out.token_ids = token_lists[g][: lengths[g]]
            if stop_flags[g]:
                out.finish_reason = "stop"
            if lp_lists is not None:
                out.logprobs = lp_lists[g][: lengths[g]]
        return outputs

    def _prefill(self, prompts: list[list[int]], n: int, max_new: int):
        """Left-padded prefill of the distinct prompts, then the cache repeated n times.

        Returns (cache, last-position logits [P*n, V], additive key mask [P*n, 1, 1, W+max_new]).
        """
        num = len(prompts)
        lens = torch.tensor([len(p) for p in prompts])
        width = int(lens.max())
        pad = width - lens  # left padding per prompt
        ids = torch.zeros(num, width, dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, pad[r] :] = torch.tensor(p, dtype=torch.long)
        valid = torch.arange(width)[None, :] >= pad[:, None]  # [P, W] real (non-pad) positions
        neg = torch.finfo(self.model.dtype).min
        # causal over real keys; a pad query sees only itself (keeps its row finite, never read)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        allowed = (causal[None] & valid[:, None, :]) | torch.eye(width, dtype=torch.bool)[None]
        mask = torch.zeros(num, 1, width, width, dtype=self.model.dtype).masked_fill_(~allowed[:, None], neg)
        positions = (torch.arange(width)[None, :] - pad[:, None]).clamp_(min=0)
        cache = DynamicCache()
        cache.layers = [_PreallocLayer(width + max_new, self._workspace, i) for i in range(self.model.config.num_hidden_layers)]
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                            past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        key_mask = torch.zeros(num, 1, 1, width + max_new, dtype=self.model.dtype)
        key_mask[:, 0, 0, :width].masked_fill_(~valid, neg)
        if n == 1:  # one sample per prompt (greedy evaluation): the prefill's rows are the rows, no copies
            return cache, logits, key_mask
        cache.batch_repeat_interleave(n)  # the n samples of a prompt share its prefill
        return cache, logits.repeat_interleave(n, dim=0), key_mask.repeat_interleave(n, dim=0)

    def _uniforms(self, num: int, n: int, first_index: int, steps: int, sp: SamplingParams) -> torch.Tensor:
        """[num*n, steps] uniforms in [0, 1), one independent stream per (seed, prompt, sample)."""
        if sp.greedy:
            return torch.zeros(num * n, steps, dtype=torch.float64)
        out = torch.empty(num * n, steps, dtype=torch.float64)
        gen = torch.Generator()
        for g, row in enumerate(out):  # drawn into the row (out=): no temporary and no indexed copy per row
            gen.manual_seed(row_seed(sp.seed, first_index + g // n, g % n))
            torch.rand(steps, generator=gen, dtype=torch.float64, out=row)
        return out
