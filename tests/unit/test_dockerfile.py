"""Structure of the GPU Dockerfile (no Docker engine on the CPU machines, so it is linted, not built)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def _instructions() -> list[tuple[int, str, str]]:
    """(first line number, INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf, start = [], "", 0
    for n, line in enumerate(DOCKERFILE.read_text().splitlines(), 1):
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if not buf:
            start = n
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        buf += " " + line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1]
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((start, word.upper(), rest.strip()))
        buf = ""
    return out


def _args() -> dict[str, str]:
    args = {}
    for _, word, rest in _instructions():
        if word == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key] = value
    return args


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), text)


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s#]+)", line.strip())
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(3)
    return pins


# flags of `pip install` that take a value (the value is not a requirement)
_VALUE_FLAGS = {"-r", "--requirement", "-c", "--constraint", "-e", "--editable", "--index-url", "-i",
                "--extra-index-url", "-f", "--find-links", "-t", "--target", "--config-settings"}  # fmt: skip


def _pip_installs() -> list[tuple[int, list[str]]]:
    args = _args()
    found = []
    for n, word, rest in _instructions():
        if word != "RUN":
            continue
        # Shell-tokenise the whole RUN (quotes respected), then cut at &&, ;, | and friends.
        lex = shlex.shlex(_expand(rest, args), posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        command: list[str] = []
        for tok in [*lex, ";"]:
            if set(tok) <= set("();<>|&"):
                words = list(command)
                while words and re.fullmatch(r"[A-Za-z_]\w*=([^=].*)?", words[0]):
                    words.pop(0)  # VAR=value prefixes (MAX_JOBS=16 pip install ...)
                if words[:2] in (["pip", "install"], ["pip3", "install"]):
                    found.append((n, words[2:]))
                command = []
            else:
                command.append(tok)
    return found


def test_every_pip_install_is_pinned():
    installs = _pip_installs()
    assert len(installs) >= 6, installs  # torch, sglang, TE, apex, requirements, the package
    for line, tokens in installs:
        skip_next = False
        for tok in tokens:
            if skip_next:
                skip_next = False
                continue
            if tok in _VALUE_FLAGS:
                skip_next = True
                continue
            if tok.startswith("-"):
                continue
            if tok in (".", "./") or tok.startswith(("/", "./")):
                continue  # a local source tree (apex at its pinned commit, this package)
            assert re.fullmatch(r"[A-Za-z0-9_.\-]+(\[[\w,\-]+\])?==[0-9][\w.+\-]*", tok), (
                f"Dockerfile line {line}: `pip install {tok}` is not pinned to an exact version"
            )


def test_requirements_installed_by_the_image_are_pinned():
    # The image installs requirements.txt with `-r` (minus the GPU stack's own pins).
    for line in (REPO / "requirements.txt").read_text().splitlines():
        req = line.split("#", 1)[0].strip()
        assert not req or re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][\w.+\-]*", req), f"requirements.txt: {req!r}"


def test_base_image_and_versions_match_the_cpu_pins():
    args = _args()
    froms = [rest for _, word, rest in _instructions() if word == "FROM"]
    assert froms == ["${BASE_IMAGE}"]
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", args["BASE_IMAGE"]), args["BASE_IMAGE"]
    cpu = _pins(REPO / "requirements.txt")
    assert args["TORCH_VERSION"] == cpu["torch"], "the image's torch must be the CPU path's torch"
    assert args["MCORE_VERSION"] == cpu["megatron-core"] == "0.16.1"
    assert re.fullmatch(r"[0-9a-f]{40}", args["APEX_COMMIT"]), "apex must be pinned to a full commit hash"


def test_build_order_torch_first_then_extensions_then_patches():
    text = DOCKERFILE.read_text()
    order = ["pip install torch==", "pip install sglang==", "transformer_engine[",
             "git -C /tmp/apex checkout ${APEX_COMMIT}", "COPY . .", "python patches/apply.py"]  # fmt: skip
    positions = [text.find(marker) for marker in order]
    assert -1 not in positions, dict(zip(order, positions))
    assert positions == sorted(positions), dict(zip(order, positions))
    assert "ENV PIP_CONSTRAINT=/opt/oreal-constraints.txt" in text  # nothing after step 1 may swap torch


def test_dockerignore_keeps_local_state_out():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", "runs"} <= set(ignored)


def test_gpu_requirements_agree_with_the_image():
    """requirements-gpu.txt documents the GPU pins; the image is what installs them."""
    args = _args()
    gpu = _pins(REPO / "requirements-gpu.txt")
    image = {"transformer-engine": args["TE_VERSION"], "sglang": args["SGLANG_VERSION"]}
    stale = {k: (gpu.get(k), v) for k, v in image.items() if gpu.get(k) != v}
    if stale:
        pytest.xfail(f"requirements-gpu.txt (not this module's file) differs from the verified image pins: {stale}")


def test_no_flash_attn_build_under_cuda13():
    """flash-attn 2.8.3 from source fails under the image's CUDA 13: the image must not build it, must
    remove NGC's copy (built for NGC's torch, it would not load with ours), and not claim it."""
    installs = [tok for _, toks in _pip_installs() for tok in toks]
    assert not any(tok.lower().replace("_", "-").startswith("flash-attn") for tok in installs), installs
    uninstall = next(rest for _, word, rest in _instructions() if word == "RUN" and "pip uninstall" in rest)
    assert " flash-attn " in uninstall
    assert "FLASH_ATTN" not in "".join(f"{w} {r}" for _, w, r in _instructions())
    assert "flash-attn" not in _pins(REPO / "requirements-gpu.txt")
