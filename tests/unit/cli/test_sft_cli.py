import json

import pytest

from megatron_oreal.data.tiny_model import TinySize, make_random_tiny_model


@pytest.mark.slow
def test_sft_command_lowers_nll_and_exports(tmp_path):
    from helpers.torchrun import run_torchrun
    from pathlib import Path

    hf = make_random_tiny_model(tmp_path / "init", size=TinySize(layers=1, hidden=32, heads=2, kv_heads=1, ffn=64))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"{a}+{a}", "response": f"\\boxed{{{2 * a}}}"}) + "\n" for a in range(16)))
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"""
data: {{system_prompt: none}}
policy: {{hf_path: {hf}, dtype: fp32, optim: {{lr: 1.0e-2, min_lr: 1.0e-3, warmup_steps: 2}}}}
sft: {{train_file: {pairs}, batch_size: 8, steps: 12, log_every: 4}}
""")
    main = Path(__file__).resolve().parents[3] / "megatron_oreal" / "__main__.py"
    out = run_torchrun(main, 1, ["sft", cfg, f"run_dir={tmp_path / 'run'}"], timeout=300)
    nll = [float(line.split("nll ")[1].split()[0]) for line in out.splitlines() if line.startswith("sft step")]
    assert len(nll) == 3 and nll[-1] < 0.7 * nll[0], nll
    summary = json.loads(out[out.index("{"):])
    assert summary["steps"] == 12

    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf")
    AutoTokenizer.from_pretrained(tmp_path / "run" / "hf")  # tokenizer files travel with the export


def test_sft_bad_pair_names_file_and_line(tmp_path, capsys):
    from megatron_oreal.sft import main

    hf = make_random_tiny_model(tmp_path / "init", size=TinySize(layers=1, hidden=32, heads=2, kv_heads=1, ffn=64))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "1+1", "response": "2"}\n{"prompt": "1+2"}\n')
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"data: {{system_prompt: none}}\npolicy: {{hf_path: {hf}}}\nsft: {{train_file: {pairs}, steps: 20}}\n")
    assert main([str(cfg), "policy.optim.warmup_steps=1"]) == 2
    assert f"{pairs}:2: missing or empty 'response'" in capsys.readouterr().err
