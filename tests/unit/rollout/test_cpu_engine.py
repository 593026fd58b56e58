"""CPU engine: exact greedy parity (batched = unbatched = HF generate), stop/length semantics,
seeded sampling, top-k/top-p, weight updates equal to loading the weights."""

import math

import pytest
import torch
from helpers.tiny_hf import make_tiny_qwen2
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from megatron_oreal.rollout import ENGINES, build_engine
from megatron_oreal.rollout.cpu_engine import CPUEngine, filter_probs, sample_tokens
from megatron_oreal.rollout.engine import SamplingParams

VOCAB = 48


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/rollout/conftest.py


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpu_engine")
    # Two different random models of one shape; the second is the "new weights" for update_weights.
    make_tiny_qwen2(root / "a", vocab_size=VOCAB, hidden=64, layers=2, heads=4, kv_heads=2, tie=False, seed=0)
    make_tiny_qwen2(root / "b", vocab_size=VOCAB, hidden=64, layers=2, heads=4, kv_heads=2, tie=False, seed=1)
    return root / "a", root / "b"


@pytest.fixture(scope="module")
def engine(hf_dirs):
    return CPUEngine(hf_dirs[0], threads=1)  # tiny tensors: a 2nd thread only adds sync cost


def _prompts(count, seed=3, lo=3, hi=11):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist() for _ in range(count)]


def test_greedy_batched_equals_unbatched_equals_hf_generate(engine, hf_dirs):
    prompts = _prompts(6)  # lengths differ: the batch is left-padded
    assert len({len(p) for p in prompts}) > 1
    free = engine.generate(prompts, SamplingParams.greedy_eval(10, ()))
    # a stop token that the greedy outputs actually produce mid-way (not at position 0)
    stop = next(t for outs in free for t in outs[0].token_ids[1:8])
    sp = SamplingParams.greedy_eval(10, (stop,))
    batched = [o[0] for o in engine.generate(prompts, sp)]
    single = [engine.generate([p], sp)[0][0] for p in prompts]
    hf = AutoModelForCausalLM.from_pretrained(hf_dirs[0], dtype=torch.float32).eval()
    reasons = set()
    for p, f, b, s in zip(prompts, free, batched, single):
        assert b.token_ids == s.token_ids and b.finish_reason == s.finish_reason
        ref = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=10, eos_token_id=stop, pad_token_id=0)
        ref = ref[0, len(p):].tolist()
        if stop in ref:  # HF pads after eos; our output ends with the stop token
            ref = ref[: ref.index(stop) + 1]
        assert b.token_ids == ref
        # stop semantics: the stop-free run cut at the first stop token, stop token included
        full = f[0].token_ids
        if stop in full:
            assert b.finish_reason == "stop" and b.token_ids == full[: full.index(stop) + 1]
        else:
            assert b.finish_reason == "length" and b.token_ids == full and len(full) == 10
        reasons.add(b.finish_reason)
    assert reasons == {"stop", "length"}  # both paths exercised


def test_greedy_logprobs_match_a_full_forward(engine, hf_dirs):
    prompts = _prompts(3, seed=5)
    outs = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=6, return_logprobs=True))
    hf = AutoModelForCausalLM.from_pretrained(hf_dirs[0], dtype=torch.float32).eval()
    for p, (o,) in zip(prompts, outs):
        ids = torch.tensor([p + o.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids).logits[0, len(p) - 1 : -1], dim=-1)
        ref = logp.gather(1, torch.tensor(o.token_ids)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(o.logprobs), ref, atol=1e-5, rtol=0)
        assert o.token_ids == logp.argmax(-1).tolist()  # greedy = argmax of the unpadded forward


def test_sampling_is_seeded_per_row_and_independent_of_batching(hf_dirs, engine):
    prompts = _prompts(5, seed=7)
    sp = SamplingParams(n=4, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=11)
    a = engine.generate(prompts, sp)
    assert a == engine.generate(prompts, sp)  # same seed, same inputs -> same outputs
    assert all(len(outs) == 4 for outs in a)
    assert all(len({tuple(o.token_ids) for o in outs}) > 1 for outs in a)  # n samples differ
    assert engine.generate(prompts, sp.with_seed(12)) != a
    small = CPUEngine(hf_dirs[0], max_batch_rows=4, threads=1)  # one prompt (4 rows) per chunk
    assert small.generate(prompts, sp) == a
    assert engine.generate(prompts[:1], sp) == a[:1]  # prompt 0 alone = prompt 0 in the batch
    fewer = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=11))
    assert [outs for outs in fewer] == [outs[:2] for outs in a]  # sample j's stream does not depend on n


def test_max_new_tokens_and_total_length_budget(engine):
    prompts = [[5, 6, 7], [5, 6, 7, 8, 9, 10, 11, 12]]
    out = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=4, seed=1))
    assert all(len(o.token_ids) == 4 and o.finish_reason == "length" for outs in out for o in outs)
    capped = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=50, max_total_length=6, seed=1))
    assert [len(o.token_ids) for o in capped[0]] == [3, 3]  # 6 - 3 prompt tokens
    assert [(o.token_ids, o.finish_reason) for o in capped[1]] == [([], "length")] * 2  # prompt already too long


def test_filter_and_sample_hand_computed():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    # top_p 0.8: mass above 0.3 is 0.5 < 0.8 (kept); mass above 0.15 is 0.8 (dropped)
    p, order = filter_probs(logits, SamplingParams(top_p=0.8))
    assert order.tolist() == [[0, 1, 2, 3]]
    torch.testing.assert_close(p / p.sum(), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    # temperature 2: probs proportional to sqrt(p)
    p, _ = filter_probs(logits, SamplingParams(temperature=2.0))
    torch.testing.assert_close(p, probs.sqrt() / probs.sqrt().sum())
    # top_k 2 renormalises the two largest; inverse CDF: u < 0.625 -> token 0, else token 1
    sp = SamplingParams(top_k=2)
    picks = sample_tokens(logits.expand(4, 4), torch.tensor([0.0, 0.62, 0.63, 0.999]), sp)
    assert picks.tolist() == [0, 0, 1, 1]
    shuffled = logits[:, [2, 0, 3, 1]]  # [0.15, 0.5, 0.05, 0.3]: top-p must map sorted picks back to ids
    picks = sample_tokens(shuffled.expand(2, 4), torch.tensor([0.1, 0.9]), SamplingParams(top_p=0.8))
    assert picks.tolist() == [1, 3]
    assert sample_tokens(shuffled, torch.tensor([0.5]), SamplingParams(temperature=0.0)).tolist() == [1]


def test_first_token_frequencies_follow_the_filtered_distribution(engine):
    prompt = [7, 8, 9, 10]
    with torch.no_grad():
        logits = engine.model(input_ids=torch.tensor([prompt])).logits[0, -1]
    n = 3000
    for sp in (SamplingParams(n=n, temperature=0.7, max_new_tokens=1, seed=3),
               SamplingParams(n=n, temperature=1.0, top_k=3, max_new_tokens=1, seed=4)):
        counts = torch.zeros(VOCAB)
        for o in engine.generate([prompt], sp)[0]:
            counts[o.token_ids[0]] += 1
        expected = torch.softmax(logits / sp.temperature, -1)
        if sp.top_k:
            expected = torch.where(logits >= logits.topk(3).values[-1], expected, 0.0)
            assert set(counts.nonzero().squeeze(1).tolist()) <= set(logits.topk(3).indices.tolist())
        expected = expected / expected.sum()
        # every token within 5 standard errors of its expected count
        sd = (n * expected * (1 - expected)).sqrt()
        assert ((counts - n * expected).abs() <= 5 * sd + 1).all()
    # top_k=1 and a vanishing top_p are greedy
    greedy = engine.generate([prompt], SamplingParams.greedy_eval(6, ()))[0][0].token_ids
    for sp in (SamplingParams(n=3, top_k=1, max_new_tokens=6, seed=5), SamplingParams(n=3, top_p=1e-6, max_new_tokens=6, seed=5)):
        assert all(o.token_ids == greedy for o in engine.generate([prompt], sp)[0])


def test_update_weights_equals_loading_the_new_weights(hf_dirs):
    a_dir, b_dir = hf_dirs
    engine = CPUEngine(a_dir, threads=1)
    fresh_b = CPUEngine(b_dir, threads=1)
    prompts = _prompts(4, seed=9)
    sp = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=8, seed=2, stop_token_ids=(2,))
    before = engine.generate(prompts, sp)
    engine.update_weights(load_file(str(b_dir / "model.safetensors")).items())
    after = engine.generate(prompts, sp)
    assert after != before
    assert after == fresh_b.generate(prompts, sp)
    assert engine.greedy(prompts, 8, (2,)) == fresh_b.greedy(prompts, 8, (2,))
    with pytest.raises(KeyError, match="model.layers.0.mlp.nonexistent"):
        engine.update_weights([("model.layers.0.mlp.nonexistent", torch.zeros(1))])
    with pytest.raises(ValueError, match=r"model.norm.weight.*\(3,\).*\(64,\)"):
        engine.update_weights([("model.norm.weight", torch.zeros(3))])


def test_engine_owns_a_copy_and_keeps_the_protocol(hf_dirs):
    model = AutoModelForCausalLM.from_pretrained(hf_dirs[0], dtype=torch.float32)
    original = model.model.norm.weight.clone()
    engine = build_engine("cpu", model, None)
    assert set(ENGINES) >= {"cpu", "sglang"}
    engine.update_weights([("model.norm.weight", torch.ones(64))])
    assert torch.equal(model.model.norm.weight, original)  # the caller's model is untouched
    engine.release_memory(), engine.resume_memory()
    assert engine.health()
    with pytest.raises(ValueError, match="prompt 1 has token ids"):
        engine.generate([[3], [VOCAB + 5]], SamplingParams())
    engine.close()
    assert not engine.health()
    with pytest.raises(ValueError, match="unknown engine 'vllm'"):
        build_engine("vllm", model, None)
    assert math.isclose(SamplingParams(top_p=0.5).top_p, 0.5)


def test_engine_model_plain_forward_matches_hf_attention(engine, hf_dirs):
    # The engine swaps in its own attention; a plain padded forward on its model must stay causal.
    hf = AutoModelForCausalLM.from_pretrained(hf_dirs[0], dtype=torch.float32).eval()
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        ours, ref = engine.model(input_ids=ids, attention_mask=mask).logits, hf(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[0, 2:], ref[0, 2:], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[1], ref[1], atol=1e-5, rtol=0)


def test_update_weights_tied_embeddings_accept_lm_head(tmp_path):
    # A tied model has one tensor; weight sync may name it either way (HF export keeps lm_head).
    make_tiny_qwen2(tmp_path / "t", vocab_size=VOCAB, hidden=32, layers=1, heads=2, kv_heads=1, ffn=64, tie=True)
    engine = CPUEngine(tmp_path / "t")
    new = torch.randn(VOCAB, 32)
    engine.update_weights([("lm_head.weight", new)])
    assert torch.equal(engine.model.get_input_embeddings().weight, new)
    assert torch.equal(engine.model.get_output_embeddings().weight, new)
    engine.update_weights([("model.embed_tokens.weight", new.to(torch.bfloat16))])  # cast to the engine dtype
    assert torch.equal(engine.model.lm_head.weight, new.to(torch.bfloat16).float())
