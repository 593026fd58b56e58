"""Side by side on the CPU: Hugging Face TRL's GRPOTrainer vs ours, same tiny model, prompts and shape.

    python tools/bench_vs_trl.py [--steps 8] [--rounds 3] [--threads 0] [--sides trl,trl_nogc,grpo,oreal]
                                 [--paired trl,grpo] [--keep DIR]

Shape (issue 13): 16 prompts x 8 samples per step, <= 32 new tokens, T = 1, k3 KL 0.01, one optimizer
step per rollout, fp32, model examples/tiny/model, prompts = the first 16 x steps problems of
examples/tiny/data/train.jsonl (each side shuffles them its own way).

- trl:   TRL 1.16.0 GRPOTrainer (tools/trl_grpo_side.py) as configured by default (GRPOConfig's
         gradient_checkpointing=True: activations are recomputed in backward), in fp32 like ours
         (GRPOConfig's bf16 default is turned off: equal work); trains all 128 samples of every step.
- trl_nogc: the same with gradient checkpointing off, the faster TRL (no recomputed forward).
- grpo:  ours, the equal-work rung: algo ladder "grpo" (every sample, (r - mean)/std advantages,
         REINFORCE form, k3 KL 0.01, no actor freeze), token RM off: all 128 samples trained.
- oreal: ours, full OREAL (examples/tiny/oreal.yaml: 1+1 selection, token RM) with the actor trained
         from the first step (actor_freeze_steps=0) so every step has its optimizer step.
Ours runs `python -m megatron_oreal profile` (rollout, reward, reference + policy passes, weight
sync: the whole step). CPU s/step is the main process's CPU time per step (TRL: its one process; ours:
the trainer process, which runs the rollout engine in-process; the reward workers, a few ms a step,
are not counted): unlike wall time it hardly moves when other jobs share the cores. Step times are
wall seconds of whole optimizer steps; the first step of each side is warm-up and is left out of the median. Peak RSS is each side's process tree (wait4's
ru_maxrss: the largest single process of that tree; our reward workers are separate small processes).

TRL lives in its own venv, built on first use at ~/.cache/megatron-oreal/trl-venv (pinned below,
torch pinned to the project's 2.13.0 CPU wheel). Timings depend on machine load: the tool prints
the load average next to each side; compare ratios from one invocation. On a shared VM the speed of
both sides drifts together by tens of percent over a minute, so the sides run in interleaved rounds
and each round's ratio is printed as well as the medians.

Ratios are printed against both TRL configurations, per round and as medians.

--paired trl,grpo runs those two sides at the same time in lockstep instead (profile --take-turns and
trl_grpo_side.py --take-turns, megatron_oreal/observability/turns.py): after each step a side hands
the turn to the other and sleeps until it comes back, so only one computes at a time and step i of
one side runs next to step i of the other. The per-step ratios (ours / TRL, step i with step i) then
see the same machine speed, which drifts by tens of percent within seconds on a shared VM. Printed:
both medians, the median of the per-step ratios, and peak RSS (each process's own).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TRL_VENV = Path(os.environ.get("MEGATRON_OREAL_TRL_VENV", Path.home() / ".cache/megatron-oreal/trl-venv"))
# Pinned: TRL as in issue 13, the project's torch and transformers, and TRL's own requirements at
# the versions resolved when this was written (accelerate/datasets are what GRPOTrainer imports).
TRL_PINS = ["torch==2.13.0", "trl==1.16.0", "transformers==5.23.0", "tokenizers==0.23.3", "safetensors==0.8.0",
            "numpy==2.4.6", "accelerate==1.15.0", "datasets==5.2.0"]
PROMPTS_PER_STEP, SAMPLES = 16, 8


def ensure_trl_venv() -> Path:
    """The TRL venv's python; (re)built when missing or when its pins differ from TRL_PINS."""
    py, stamp = TRL_VENV / "bin" / "python", TRL_VENV / ".pins"
    if py.exists() and stamp.exists() and stamp.read_text().split() == TRL_PINS:
        return py
    print(f"building the TRL venv at {TRL_VENV} (once; a few minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *TRL_PINS], check=True)
    stamp.write_text("\n".join(TRL_PINS) + "\n")
    return py


def run_measured(cmd: list[str], env: dict, log: Path) -> tuple[int, float]:
    """Run cmd to completion (output to log); returns (exit code, peak RSS GiB of its tree)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 2**20  # kB -> GiB


def our_overrides(side: str, prompts: Path, run_dir: Path) -> list[str]:
    from megatron_oreal.algo.ladder import ablation_overrides

    common = [f"run_dir={run_dir}", f"data.train_file={prompts}", f"data.eval_file={prompts}",
              f"data.prompts_per_step={PROMPTS_PER_STEP}", f"rollout.sampling.n={SAMPLES}",
              "rollout.sampling.max_new_tokens=32", "rollout.sampling.temperature=1.0",
              "eval.every=0", "checkpoint.every=0", "log.html_every=0"]
    if side == "grpo":
        return common + ablation_overrides("grpo") + ["token_rm.enabled=false"]
    return common + ["algo.actor_freeze_steps=0"]


def side_command(side: str, trl_py: Path | None, prompts: Path, steps: int, out: Path, run_dir: Path,
                 turns: str = "") -> list[str]:
    """The command line of one side; `turns` = FILE:ME:OTHER runs it in lockstep (--paired)."""
    if side.startswith("trl"):
        cmd = [str(trl_py), str(ROOT / "tools/trl_grpo_side.py"), "--model", str(ROOT / "examples/tiny/model"),
               "--prompts", str(prompts), "--steps", str(steps), "--out", str(out)]
        cmd += [] if side == "trl_nogc" else ["--gradient-checkpointing"]
    else:
        cmd = [sys.executable, "-m", "megatron_oreal", "profile", str(ROOT / "examples/tiny/oreal.yaml"),
               "--steps", str(steps), "--metrics-out", str(out), *our_overrides(side, prompts, run_dir)]
    return cmd + (["--take-turns", turns] if turns else [])


def step_times(side: str, out: Path) -> tuple[list[float], list[float]]:
    """(wall, CPU) seconds of every step of a side's result file."""
    data = json.loads(out.read_text())
    if side.startswith("trl"):
        return data["step_s"], data["cpu_s"]
    return [m["time/step"] for m in data], [m["cpu/step_s"] for m in data]


def run_paired(pair: list[str], trl_py: Path | None, prompts: Path, args, work: Path, env: dict) -> int:
    """The two sides of `pair` at once, taking turns step by step (module docstring); prints the figures."""
    ratios, med, peak = [], {s: [] for s in pair}, {s: 0.0 for s in pair}
    for rnd in range(args.rounds):
        turn_file = work / f"turns_r{rnd}"
        turn_file.write_text(pair[0])
        procs, outs = {}, {}
        for side, other in (pair, pair[::-1]):
            outs[side] = work / f"{side}_paired_r{rnd}.json"
            cmd = side_command(side, trl_py, prompts, args.steps, outs[side], work / f"run_{side}_paired_r{rnd}",
                               turns=f"{turn_file}:{side}:{other}")
            with open(work / f"{side}_paired_r{rnd}.log", "w") as log:
                procs[side] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        pending = dict(procs)
        while pending:  # a side that fails takes the other down (it would wait for its turn until timeout)
            pid, status, usage = os.wait4(-1, 0)
            side = next((s for s, p in pending.items() if p.pid == pid), None)
            if side is None:
                continue
            pending.pop(side).returncode = code = os.waitstatus_to_exitcode(status)
            peak[side] = max(peak[side], usage.ru_maxrss / 2**20)
            if code != 0:
                for p in pending.values():
                    p.kill()
                print(f"{side}: exit code {code}; log: {work / f'{side}_paired_r{rnd}.log'}", file=sys.stderr)
                return 1
        times = {s: step_times(s, outs[s])[0] for s in pair}
        n = min(len(t) for t in times.values())
        per = [times[pair[1]][i] / times[pair[0]][i] for i in range(1, n)]  # step 0 is each side's warm-up
        ratios += per
        for s in pair:
            med[s].append(median_after_warmup(times[s]))
        print(f"round {rnd}: {pair[0]} {med[pair[0]][-1]:.3f} s/step, {pair[1]} {med[pair[1]][-1]:.3f} s/step, "
              f"per-step {pair[1]}/{pair[0]} median {statistics.median(per):.2f}x "
              f"(range {min(per):.2f}-{max(per):.2f}, {len(per)} steps)", flush=True)
    a, b = pair
    print(f"\npaired, {args.rounds} round(s) x {args.steps} steps: {a} median {statistics.median(med[a]):.3f} s/step, "
          f"{b} median {statistics.median(med[b]):.3f} s/step; {b}/{a} per-step ratio median "
          f"{statistics.median(ratios):.2f}x over {len(ratios)} step pairs; peak RSS {a} {peak[a]:.2f} GiB, "
          f"{b} {peak[b]:.2f} GiB")
    return 0


def median_after_warmup(times: list[float]) -> float:
    used = times[1:] if len(times) > 1 else times
    return statistics.median(used)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per side (the first is warm-up)")
    ap.add_argument("--rounds", type=int, default=3, help="run the sides this many times, interleaved "
                    "(the per-round ratios are printed too)")
    ap.add_argument("--threads", type=int, default=0, help="torch/OpenMP threads for both sides (0 = default)")
    ap.add_argument("--sides", default="trl,trl_nogc,grpo,oreal",
                    help="trl: TRL's defaults (gradient checkpointing on), trl_nogc: without it, grpo/oreal: ours")
    ap.add_argument("--keep", default="", help="keep the run dirs and logs here (default: a temp dir)")
    ap.add_argument("--paired", default="", metavar="A,B",
                    help="run sides A and B at once in lockstep, step by step (e.g. trl,grpo); see the docstring")
    args = ap.parse_args()
    sides = [s for s in (args.paired or args.sides).split(",") if s]
    unknown = set(sides) - {"trl", "trl_nogc", "grpo", "oreal"}
    if unknown or args.steps < 2:
        ap.error(f"unknown sides {sorted(unknown)}" if unknown else "--steps must be >= 2 (one warm-up step)")
    if args.paired and (len(sides) != 2 or sides[0] == sides[1]):
        ap.error(f"--paired {args.paired!r}: two different sides, e.g. trl,grpo")

    trl_py = ensure_trl_venv() if {"trl", "trl_nogc"} & set(sides) else None
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench_vs_trl_"))
    work.mkdir(parents=True, exist_ok=True)
    lines = (ROOT / "examples/tiny/data/train.jsonl").read_text().splitlines()
    prompts = work / "prompts.jsonl"
    prompts.write_text("\n".join(lines[:PROMPTS_PER_STEP * args.steps]) + "\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))

    if args.paired:
        return run_paired(sides, trl_py, prompts, args, work, env)

    results: dict[str, dict] = {s: {"step_s": [], "cpu_s": [], "peak_gb": 0.0, "load": []} for s in sides}
    for rnd in range(args.rounds):
        for side in sides:
            tag = f"{side}_r{rnd}"
            out = work / f"{tag}.json"
            load0 = os.getloadavg()[0]
            t0 = time.perf_counter()
            cmd = side_command(side, trl_py, prompts, args.steps, out, work / f"run_{tag}")
            code, peak = run_measured(cmd, env, work / f"{tag}.log")
            if code != 0:
                print(f"{side}: exit code {code}; log: {work / f'{tag}.log'}", file=sys.stderr)
                return 1
            times, cpu = step_times(side, out)
            r = results[side]
            r["step_s"].append(median_after_warmup(times))
            r["cpu_s"].append(median_after_warmup(cpu))
            r["peak_gb"] = max(r["peak_gb"], peak)
            r["load"].append((load0, os.getloadavg()[0]))
            print(f"{tag}: median {r['step_s'][-1]:.3f} s/step ({r['cpu_s'][-1]:.3f} CPU s) over {len(times) - 1} "
                  f"steps, peak RSS {peak:.2f} GiB, "
                  f"wall {time.perf_counter() - t0:.0f} s, load avg {load0:.1f} -> {os.getloadavg()[0]:.1f}",
                  flush=True)

    bases = [b for b in ("trl", "trl_nogc") if b in results]
    med = {side: statistics.median(r["step_s"]) for side, r in results.items()}
    cpu = {side: statistics.median(r["cpu_s"]) for side, r in results.items()}
    head = "".join(f"{'vs ' + b:>14}" for b in bases)
    print(f"\n{'side':<10}{'median s/step':>15}{head}{'CPU s/step':>12}{'peak RSS GiB':>14}")
    for side, r in results.items():
        ratios = "".join(f"{med[side] / med[b]:>13.2f}x" for b in bases)
        print(f"{side:<10}{med[side]:>15.3f}{ratios}{cpu[side]:>12.3f}{r['peak_gb']:>14.2f}")
    if args.rounds > 1:
        # Each round runs the sides back to back, so a ratio within a round sees the same machine speed;
        # on a shared VM the speed drifts by tens of percent between rounds, which the medians above mix.
        for side, r in results.items():
            for b in bases:
                if side not in ("trl", "trl_nogc"):
                    per = [x / y for x, y in zip(r["step_s"], results[b]["step_s"])]
                    print(f"{side} vs {b}: per round {', '.join(f'{x:.2f}x' for x in per)}; "
                          f"median {statistics.median(per):.2f}x")
    print(f"(cpu count {os.cpu_count()}, threads {args.threads or 'default'}, {args.rounds} round(s); "
          f"work dir {work})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
