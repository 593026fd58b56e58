"""The TRL side of tools/bench_vs_trl.py: run by the TRL venv's python, never imported by the project.

    <trl-venv>/bin/python tools/trl_grpo_side.py --model examples/tiny/model --prompts FILE.jsonl \
        --steps N --out RESULT.json

Hugging Face TRL GRPOTrainer on the same tiny model and prompts as our side: 16 prompts x 8 samples per
step, <= 32 new tokens, T = 1, top-p 1, no top-k, beta (k3 KL) 0.01, one optimizer step per generation
(per_device_train_batch_size = generation batch = 128, no gradient accumulation), fp32 on the CPU.
Writes the wall and CPU time of every optimizer step (generation, reward, reference and policy passes
included: TRL generates inside training_step) and this process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import time


def reward_fn(completions, answer, **_):
    """1 when the last integer of the completion equals the gold answer (the tiny task's answers are
    integers; our side's verifier gives the same verdict on them). Its cost is negligible either way."""
    out = []
    for c, gold in zip(completions, answer):
        text = c[-1]["content"] if isinstance(c, list) else c
        nums = re.findall(r"-?\d+", text)
        out.append(1.0 if nums and nums[-1] == str(gold).strip() else 0.0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--take-turns", default="", metavar="FILE:ME:OTHER",
                    help="lockstep with our side (bench_vs_trl.py --paired): megatron_oreal/observability/turns.py")
    args = ap.parse_args()
    turns = None
    if args.take_turns:
        # turns.py is stdlib only; loaded by path so TRL's venv needs nothing of the project installed
        import importlib.util
        from pathlib import Path

        spec = importlib.util.spec_from_file_location(
            "turns", Path(__file__).resolve().parent.parent / "megatron_oreal/observability/turns.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        turns = mod.Turns.from_spec(args.take_turns)

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(line) for line in open(args.prompts) if line.strip()]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}],
                               "answer": str(r["gold_answer"])} for r in rows])
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    cfg = GRPOConfig(
        output_dir=args.out + ".trl", use_cpu=True, seed=args.seed, max_steps=args.steps,
        per_device_train_batch_size=128, gradient_accumulation_steps=1, num_generations=8,
        max_completion_length=32, temperature=1.0, top_p=1.0, top_k=0, beta=0.01, num_iterations=1,
        learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, bf16=False,
        logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        # GRPOConfig's default is True (activations recomputed in backward: an extra forward); the
        # bench runs TRL both ways (its sides "trl" and "trl_nogc"). bf16=False above: fp32 like ours.
        gradient_checkpointing=args.gradient_checkpointing,
    )

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times, self.cpu, self._t, self._c = [], [], None, None

        def on_step_begin(self, *a, **k):
            self._t, self._c = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self._t)
            self.cpu.append(time.process_time() - self._c)
            if turns is not None:  # outside the timed step: the other side runs one step meanwhile
                turns.pass_and_wait()

    clock = StepClock()
    trainer = GRPOTrainer(model=model, reward_funcs=reward_fn, args=cfg, train_dataset=data,
                          processing_class=tok, callbacks=[clock])
    trainer.train()
    with open(args.out, "w") as f:
        json.dump({"step_s": clock.times, "cpu_s": clock.cpu, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                   "torch_threads": torch.get_num_threads()}, f)
    if turns is not None:
        turns.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
