"""HF safetensors IO: sliced reads straight into a TP/PP-sharded model, and atomic sharded writes.

Reading: each rank opens only the files holding its stage's tensors and reads only its TP slice
(`safe_open(...).get_slice(name)[lo:hi]`), so a 32B load never materialises the full model per rank.
Writing: shards up to a size limit plus `model.safetensors.index.json`, in the layout
`transformers.PreTrainedModel.save_pretrained` writes, into a temporary folder renamed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_oreal.checkpoint.mapping import all_entries, hf_shape, shard_from_hf, stage_entries, uses_te_names

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json")


class CheckpointError(ValueError):
    """A bad checkpoint: the message names the tensor and the file."""


@contextlib.contextmanager
def atomic_dir(out: str):
    """Yield a temporary sibling folder; on success it replaces `out` (never a half-written one)."""
    out = os.path.abspath(out)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(out):
        old = f"{out}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


class HFReader:
    """Name -> file lookup over a single-file or sharded (index.json) safetensors checkpoint."""

    def __init__(self, hf_dir: str):
        self.dir = hf_dir
        index = os.path.join(hf_dir, INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                self.weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(hf_dir, SINGLE)):
            with safe_open(os.path.join(hf_dir, SINGLE), "pt") as f:
                self.weight_map = {k: SINGLE for k in f.keys()}
        else:
            raise CheckpointError(f"no {SINGLE} or {INDEX} in HF checkpoint folder {hf_dir!r}")
        self._open: dict[str, object] = {}
        self._stack = contextlib.ExitStack()

    def close(self) -> None:
        self._stack.close()
        self._open.clear()

    def file_of(self, name: str) -> str:
        if name not in self.weight_map:
            where = INDEX if os.path.isfile(os.path.join(self.dir, INDEX)) else SINGLE
            raise CheckpointError(f"tensor {name!r} is missing from {os.path.join(self.dir, where)}")
        return os.path.join(self.dir, self.weight_map[name])

    def read(self, name: str, expect: tuple[int, ...], rows=None, cols=None) -> torch.Tensor:
        path = self.file_of(name)
        if path not in self._open:
            self._open[path] = self._stack.enter_context(safe_open(path, "pt"))
        sl = self._open[path].get_slice(name)
        shape = tuple(sl.get_shape())
        if shape != tuple(expect):
            raise CheckpointError(f"tensor {name!r} in {path} has shape {shape}, expected {tuple(expect)} from config.json")
        if rows is not None and cols is not None:
            return sl[rows[0] : rows[1], cols[0] : cols[1]]
        if rows is not None:
            return sl[rows[0] : rows[1]]
        if cols is not None:
            return sl[:, cols[0] : cols[1]]
        return sl[:]


def load_hf_weights(model, hf_dir: str, layout, *, log=None) -> int:
    """Copy this rank's stage/TP shard of an HF checkpoint into `model` (built by build_policy or
    build_token_rm for the same config.json). Returns the number of elements loaded here."""
    from megatron_oreal.mcore.model import unwrap

    m = unwrap(model)
    spec = m.arch
    params = dict(m.named_parameters())
    entries = stage_entries(spec, layout.pp_rank, layout.pp, te_names=uses_te_names(m),
                            token_rm=getattr(m, "is_token_rm", False))
    reader = HFReader(hf_dir)
    known = {h for stage in all_entries(spec, layout.pp) for e in stage for h in e.hf} | {"lm_head.weight"}
    unused = sorted(set(reader.weight_map) - known)
    if unused:
        raise CheckpointError(f"{hf_dir}: tensors with no Megatron counterpart in the {spec.architecture} mapping "
                              f"(unsupported variant?): {unused[:8]}{' ...' if len(unused) > 8 else ''}")
    loaded, n = set(), 0
    t0 = time.time()
    try:
        for e in entries:
            if e.mcore not in params:
                raise CheckpointError(f"model has no parameter {e.mcore!r} for HF {e.hf} (mapping/model mismatch)")
            p = params[e.mcore]
            t = shard_from_hf(e, spec, layout.tp, layout.tp_rank,
                              lambda name, rows=None, cols=None: reader.read(name, hf_shape(spec, name), rows, cols))
            if tuple(t.shape) != tuple(p.shape):
                raise CheckpointError(f"{e.hf} -> {e.mcore}: built shard {tuple(t.shape)}, parameter is {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(t.to(p.dtype))
            loaded.add(e.mcore)
            n += t.numel()
    finally:
        reader.close()
    rest = [k for k in params if k not in loaded and not (getattr(m, "is_token_rm", False) and k == "output_layer.weight")]
    if rest:
        raise CheckpointError(f"parameters not covered by the {spec.architecture} mapping: {rest}")
    if log:
        log(f"[rank {layout.rank}] loaded {len(loaded)} tensors ({n / 1e6:.2f} M elements) from {hf_dir} "
            f"in {time.time() - t0:.1f}s")
    return n


def copy_hf_side_files(src_dir: str | None, dst_dir: str, hf_config: dict) -> None:
    """config.json (as given), generation_config.json and tokenizer files (copied when present)."""
    with open(os.path.join(dst_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    gen_src = os.path.join(src_dir, "generation_config.json") if src_dir else ""
    if gen_src and os.path.isfile(gen_src):
        shutil.copy(gen_src, dst_dir)
    else:
        gen = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_config.get(k) is not None}
        with open(os.path.join(dst_dir, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)
    for name in TOKENIZER_FILES if src_dir else ():
        if os.path.isfile(os.path.join(src_dir, name)):
            shutil.copy(os.path.join(src_dir, name), dst_dir)


class ShardedWriter:
    """Accumulate (name, tensor) and write safetensors shards of at most `max_shard_bytes`."""

    def __init__(self, out_dir: str, max_shard_bytes: int):
        self.dir, self.max = out_dir, max_shard_bytes
        self.cur: dict[str, torch.Tensor] = {}
        self.cur_bytes = 0
        self.files: list[list[str]] = []  # names per written shard
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nb = t.numel() * t.element_size()
        if self.cur and self.cur_bytes + nb > self.max:
            self._flush()
        self.cur[name] = t.contiguous()
        self.cur_bytes += nb
        self.total += nb

    def _flush(self) -> None:
        save_file(self.cur, os.path.join(self.dir, f"part-{len(self.files):05d}.safetensors"), metadata={"format": "pt"})
        self.files.append(list(self.cur))
        self.cur, self.cur_bytes = {}, 0

    def close(self) -> None:
        if self.cur:
            self._flush()
        n = len(self.files)
        if n == 1:
            os.replace(os.path.join(self.dir, "part-00000.safetensors"), os.path.join(self.dir, SINGLE))
            return
        weight_map = {}
        for i, names in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.dir, f"part-{i:05d}.safetensors"), os.path.join(self.dir, final))
            weight_map.update({k: final for k in names})
        with open(os.path.join(self.dir, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
