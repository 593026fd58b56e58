"""A tiny random model, arithmetic prompts and a run config that exercises every stage of `train`
(used by the e2e tests and the real-Slurm test)."""

from __future__ import annotations

from pathlib import Path


def write_tiny_run(root: Path, *, steps: int = 2, eval_rows: int = 8, eval_every: int = 1,
                   html_every: int = 1) -> Path:
    from megatron_oreal.data import arith
    from megatron_oreal.data.tiny_model import TinySize, make_random_tiny_model

    hf = make_random_tiny_model(root / "hf", seed=0, size=TinySize(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128))
    arith.write_prompts_jsonl(root / "train.jsonl", arith.make_problems(40, seed=0, split="train"))
    arith.write_prompts_jsonl(root / "eval.jsonl", arith.make_problems(eval_rows, seed=0, split="heldout"))
    cfg = root / "run.yaml"
    # selection=all: a random model's groups are all wrong, and every stage must still run.
    cfg.write_text(f"""
steps: {steps}
seed: 0
data: {{train_file: {root / 'train.jsonl'}, eval_file: {root / 'eval.jsonl'}, prompts_per_step: 4, system_prompt: none}}
rollout:
  sampling: {{n: 4, max_new_tokens: 12, max_total_length: 64, top_p: 1.0}}
algo: {{selection: all, actor_freeze_steps: 1}}
policy: {{hf_path: {hf}, dtype: fp32, micro_batch_tokens: 256, optim: {{lr: 1e-3, min_lr: 1e-4, warmup_steps: 1}}}}
token_rm: {{optim: {{lr: 1e-3, min_lr: 1e-4, warmup_steps: 1}}}}
checkpoint: {{every: 1, keep: 2}}
eval: {{every: {eval_every}, max_new_tokens: 12, keep_best: false}}
log: {{html_every: {html_every}}}
reward: {{workers: 1}}
""")
    return cfg


def exported_weights(run_dir: Path) -> dict:
    """The tensors of RUN_DIR/hf (every safetensors shard)."""
    from safetensors.torch import load_file

    return {k: v for f in sorted((run_dir / "hf").glob("*.safetensors")) for k, v in load_file(f).items()}


def assert_same_weights(a: dict, b: dict) -> None:
    """Bit-identical: same names, dtypes and values."""
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].equal(b[k]), f"{k} differs (max {(a[k] - b[k]).abs().max()})"
