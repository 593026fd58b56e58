"""Lean decode (rollout/lean_decode.py) = the HF forward: greedy equal to HF `generate` token for token,
sampled equal to the engine's HF-forward path (lean=False) for the same seed, on Qwen2 (q/k/v bias, GQA)
and Llama variants (tied embeddings; attention and MLP biases, head_dim != hidden/heads, one KV head,
llama3 and dynamic rope scaling). Weights written in place or replaced are seen; unsupported configs fall back."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from helpers.tiny_hf import make_tiny_llama, make_tiny_qwen2, randomise_norms_and_biases
from megatron_oreal.rollout.cpu_engine import CPUEngine
from megatron_oreal.rollout.engine import SamplingParams

VOCAB = 48
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/rollout/conftest.py


def _llama_variant(**overrides):
    """A random Llama with the less common features on. Norms and biases randomised (HF's 1 / 0 would
    hide a missed weight); init 0.2 (at 0.05 its greedy outputs collapse to one repeated token)."""
    torch.manual_seed(7)
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=1, head_dim=32, attention_bias=True, mlp_bias=True, rms_norm_eps=1e-5,
              max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.2,
              rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    kw.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**kw)).float().eval()
    randomise_norms_and_biases(model, seed=7)
    return model


@pytest.fixture(scope="module", params=["qwen2", "llama_tied", "llama_variant", "llama_dynamic_rope"])
def hf_model(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "qwen2":
        make_tiny_qwen2(root, vocab_size=VOCAB, hidden=64, layers=2, heads=4, kv_heads=2, tie=False, seed=0)
    elif request.param == "llama_tied":
        make_tiny_llama(root, vocab_size=VOCAB, hidden=64, layers=2, heads=4, kv_heads=2, tie=True, seed=0)
    elif request.param == "llama_variant":
        return _llama_variant()
    else:  # rope the lean step asks the rotary module for at every step (no table); its frequencies
        # would change past max_position_embeddings, which the engine never reaches
        return _llama_variant(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    return AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32).eval()


def _prompts(count, seed=3, lo=3, hi=11):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


def test_greedy_equals_hf_generate(hf_model):
    engine = CPUEngine(hf_model, threads=1)
    assert engine.lean is not None, engine.lean_off_reason  # the lean path is what is under test
    prompts = _prompts(5)
    free = [o[0].token_ids for o in engine.generate(prompts, SamplingParams.greedy_eval(12, ()))]
    # a stop token some outputs emit mid-way and some never do: both finish reasons are exercised
    stop = next(t for toks in free for t in toks[2:9] if any(t not in other for other in free))
    outs = [o[0] for o in engine.generate(prompts, SamplingParams.greedy_eval(12, (stop,)))]
    reasons = set()
    for p, o in zip(prompts, outs):
        ref = hf_model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=12, eos_token_id=stop,
                                pad_token_id=0)[0, len(p):].tolist()
        if stop in ref:
            ref = ref[: ref.index(stop) + 1]
        assert o.token_ids == ref
        reasons.add(o.finish_reason)
    assert reasons == {"stop", "length"}


def test_sampled_equals_hf_forward_path(hf_model):
    lean, hf = CPUEngine(hf_model, threads=1), CPUEngine(hf_model, threads=1, lean=False)
    assert lean.lean is not None and hf.lean is None
    prompts = _prompts(4, seed=11)
    for sp in (SamplingParams(n=4, temperature=1.0, max_new_tokens=14, stop_token_ids=(5, 9), seed=3,
                              return_logprobs=True),
               SamplingParams(n=3, temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=10, seed=4,
                              return_logprobs=True)):
        a, b = lean.generate(prompts, sp), hf.generate(prompts, sp)
        lengths, ties = set(), 0
        for ga, gb in zip(a, b):
            for oa, ob in zip(ga, gb):
                ties += _same_up_to_a_tie(oa, ob)
                lengths.add(len(oa.token_ids))
        assert ties <= 1  # rare (one seen in the ~100 rows of these tests); more would be a real difference
        assert len(lengths) > 1 or sp.stop_token_ids == ()  # stops hit: rows end at different steps


def test_prompts_of_one_length_skip_the_zero_key_mask_bit_for_bit(hf_model):
    """Without left padding the engine passes no key mask to the lean step: the logits must equal, bit for
    bit, those of a step given the all-zero mask it stands for; and the sampled rows equal the HF path's."""
    engine = CPUEngine(hf_model, threads=1)
    prompts = [p[:3] for p in _prompts(3, seed=13)]
    with torch.inference_mode():
        (c1, logits, mask), (c2, _, _) = engine._prefill(prompts, 2, 4), engine._prefill(prompts, 2, 4)
        assert not mask.any()  # one length: the mask the skip stands for is all zeros
        engine.lean.prepare(3 + 4)
        token, pos = logits.argmax(-1), torch.full((6,), 3)
        for step in range(3):  # several positions: the cache grows, both paths read it
            a = engine.lean.step(token, pos + step, c1.layers, mask)
            b = engine.lean.step(token, pos + step, c2.layers, None)
            assert torch.equal(a, b)
            token = a.argmax(-1)
    sp = SamplingParams(n=3, temperature=1.0, max_new_tokens=8, stop_token_ids=(5,), seed=2, return_logprobs=True)
    hf = CPUEngine(hf_model, threads=1, lean=False)
    ties = sum(_same_up_to_a_tie(oa, ob) for ga, gb in zip(engine.generate(prompts, sp), hf.generate(prompts, sp))
               for oa, ob in zip(ga, gb))
    assert ties <= 1


def _same_up_to_a_tie(oa, ob) -> bool:
    """Equal token ids and finish reason, log-probs within 1e-4; or equal up to a first difference
    where both paths drew a token of the same log-prob (within 1e-5): two near-equal logits whose order
    round-off swapped in top-p's sort (seen: -2.514147 vs -2.514146). Returns whether it was a tie."""
    k = next((i for i, (x, y) in enumerate(zip(oa.token_ids, ob.token_ids)) if x != y), None)
    if k is None:
        assert oa.token_ids == ob.token_ids and oa.finish_reason == ob.finish_reason
        torch.testing.assert_close(torch.tensor(oa.logprobs), torch.tensor(ob.logprobs), atol=1e-4, rtol=0)
        return False
    torch.testing.assert_close(torch.tensor(oa.logprobs[:k]), torch.tensor(ob.logprobs[:k]), atol=1e-4, rtol=0)
    assert abs(oa.logprobs[k] - ob.logprobs[k]) < 1e-5, (k, oa.logprobs[k], ob.logprobs[k])
    return True


def test_weights_written_in_place_or_replaced_are_used(tmp_path):
    make_tiny_qwen2(tmp_path / "a", vocab_size=VOCAB, hidden=64, layers=2, heads=4, kv_heads=2, seed=0)
    make_tiny_qwen2(tmp_path / "b", vocab_size=VOCAB, hidden=64, layers=2, heads=4, kv_heads=2, seed=1)
    engine = CPUEngine(tmp_path / "a", threads=1)
    other = AutoModelForCausalLM.from_pretrained(tmp_path / "b", dtype=torch.float32)
    prompts, sp = _prompts(3, seed=5), SamplingParams.greedy_eval(10, ())
    want = [o[0].token_ids for o in CPUEngine(tmp_path / "b", threads=1, lean=False).generate(prompts, sp)]
    before = [o[0].token_ids for o in engine.generate(prompts, sp)]
    assert before != want  # two different models: the check below can fail
    engine.update_weights(other.named_parameters())  # in-place copies land in the fused tensors
    assert [o[0].token_ids for o in engine.generate(prompts, sp)] == want
    # a replaced parameter (not an in-place write) is noticed and re-fused
    fresh = CPUEngine(tmp_path / "a", threads=1)
    for name, p in other.named_parameters():
        mod_name, attr = name.rsplit(".", 1)
        setattr(fresh.model.get_submodule(mod_name), attr, torch.nn.Parameter(p.detach().clone(), requires_grad=False))
    assert [o[0].token_ids for o in fresh.generate(prompts, sp)] == want
    # only norm weights replaced (the fused Linears untouched): the lean step reads the new ones too
    g = torch.Generator().manual_seed(0)
    for mod in (fresh.model.model.norm, fresh.model.model.layers[0].post_attention_layernorm):
        mod.weight = torch.nn.Parameter(mod.weight.detach() + torch.randn(mod.weight.shape, generator=g), requires_grad=False)
    after = [o[0].token_ids for o in fresh.generate(prompts, sp)]
    assert after != want  # the new norms change the outputs: the check below can fail
    assert after == [o[0].token_ids for o in CPUEngine(fresh.model, threads=1, lean=False).generate(prompts, sp)]


def test_unsupported_config_falls_back_to_hf_forward():
    model = _llama_variant(hidden_act="gelu")
    engine = CPUEngine(model, threads=1)
    assert engine.lean is None and "hidden_act" in engine.lean_off_reason
    p = _prompts(1, seed=2)[0]
    out = engine.generate([p], SamplingParams.greedy_eval(8, ()))[0][0].token_ids
    assert out == model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=8, pad_token_id=0)[0, len(p):].tolist()
