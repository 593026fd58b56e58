"""Static checks of examples/slurm/*.sbatch (no Slurm needed): the GPU scripts cannot run here,
so what they must contain is checked against what the local-Slurm tests proved for tiny_cpu.sbatch."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

SLURM_DIR = Path(__file__).resolve().parents[2] / "examples" / "slurm"
SCRIPTS = sorted(SLURM_DIR.glob("*.sbatch"))


def _directives(text: str) -> dict[str, str]:
    out = {}
    for m in re.finditer(r"^#SBATCH\s+--([\w-]+)(?:=(\S+))?", text, re.M):
        out[m.group(1)] = m.group(2) or ""
    return out


def test_all_scripts_found():
    assert {p.name for p in SCRIPTS} >= {"tiny_cpu.sbatch", "train_1node.sbatch", "train_multinode.sbatch"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_sbatch_script_shape(script):
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, f"{script}: bash syntax"
    d = _directives(text)
    assert "requeue" in d, f"{script.name}: needs #SBATCH --requeue (scontrol requeue of a --no-requeue job fails)"
    assert d.get("open-mode") == "append", f"{script.name}: the log must survive a requeue (--open-mode=append)"
    assert re.fullmatch(r"B:USR1@\d+", d.get("signal", "")), f"{script.name}: needs --signal=B:USR1@<seconds>"
    assert int(d["signal"].split("@")[1]) >= 60, f"{script.name}: Slurm checks the warning ~once a minute"
    assert "%j" in d.get("output", ""), f"{script.name}: one log per job (%j in --output)"
    assert "source" in text and "examples/slurm/common.sh" in text and "oreal_srun" in text
    assert not re.search(r"\b(pkill|killall)\b", text), f"{script.name}: never kill by name"
    assert "--kill-on-bad-exit=1" in text


@pytest.mark.parametrize("name", ["train_1node.sbatch", "train_multinode.sbatch"])
def test_gpu_scripts_one_task_per_gpu(name):
    text = (SLURM_DIR / name).read_text()
    d = _directives(text)
    assert d["ntasks-per-node"] == d["gpus-per-node"] == "8"
    assert "nccl.sh" in text and "torchrun" not in text.split("#SBATCH")[-1]
    # The engine's server processes and the verifier pool inherit their rank's CPU mask: no per-task
    # core binding, or they would share one rank's cores during rollout.
    srun_lines = [ln for ln in text.splitlines() if ln.startswith("oreal_srun")]
    assert srun_lines and all("--cpu-bind=none" in ln for ln in srun_lines), srun_lines
    assert "--cpu-bind=cores" not in text


def test_multinode_header_node_counts_match_the_recipes():
    """The script's header and its default node count agree with the recipes' own "(N nodes x 8)"."""
    text = (SLURM_DIR / "train_multinode.sbatch").read_text()
    header = text.split("#SBATCH")[0]
    nodes = {}
    for recipe in ("qwen2.5-7b.yaml", "qwen2.5-32b.yaml", "qwen2.5-32b-fp8.yaml"):
        m = re.search(r"\((\d+) nodes x 8\)", (SLURM_DIR.parent / recipe).read_text().splitlines()[0])
        nodes[recipe] = int(m.group(1))
    assert _directives(text)["nodes"] == str(nodes["qwen2.5-7b.yaml"]) == "4"
    assert "the 7B recipes" in header
    assert f"32B BF16 recipe needs\n# --nodes={nodes['qwen2.5-32b.yaml']}" in header
    assert f"32B FP8 one --nodes={nodes['qwen2.5-32b-fp8.yaml']}" in header


def test_common_sh_turns_usr1_into_the_flag_file():
    text = (SLURM_DIR / "common.sh").read_text()
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in text
    assert "20000 + SLURM_JOB_ID % 20000" in text  # == launch.env.slurm_port
    assert "OREAL_PREEMPT_FILE" in text and "SLURM_RESTART_COUNT" in text  # one flag file per run
    assert not re.search(r"\b(pkill|killall)\b", text)
