"""What one weight sync cost: bytes, buckets, seconds, GB/s (docs/design.md decision 10: every sync is
logged), plus the optional first-sync weight check (slime's `--check-weight-update-equal`,
`rollout_manager.check_weights` in slime's train.py)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch


@dataclass
class SyncMetrics:
    bytes: int = 0  # payload bytes handed to the transport (after FP8 quantisation, if any)
    source_bytes: int = 0  # bytes as they came from the source
    tensors: int = 0  # tensors sent (an FP8 weight and its scale count as two)
    buckets: int = 0  # transport sends (one flattened buffer per dtype per source bucket)
    seconds: float = 0.0  # wall time of the whole sync, begin() to end() included
    source_seconds: float = 0.0  # waiting on the source iterator (the TP/PP gather on real runs)
    quantize_seconds: float = 0.0
    send_seconds: float = 0.0  # inside transport.send (flatten + serialise + engine load)
    checked: bool = False  # the weights were read back and compared
    mismatches: list[str] = field(default_factory=list)  # names that differed (when checked)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def as_dict(self, prefix: str = "sync/") -> dict[str, float]:
        """Flat scalars for the console and TensorBoard."""
        out = {
            "bytes": float(self.bytes),
            "gb": self.bytes / 1e9,
            "tensors": float(self.tensors),
            "buckets": float(self.buckets),
            "seconds": self.seconds,
            "source_seconds": self.source_seconds,
            "quantize_seconds": self.quantize_seconds,
            "send_seconds": self.send_seconds,
            "gb_per_s": self.gb_per_s,
        }
        if self.checked:
            out["check_mismatches"] = float(len(self.mismatches))
        return {prefix + k: v for k, v in out.items()}

    def summary(self) -> str:
        text = (
            f"weight sync: {self.bytes / 1e6:.1f} MB in {self.tensors} tensors / {self.buckets} buckets, "
            f"{self.seconds:.3f} s ({self.gb_per_s:.2f} GB/s; source {self.source_seconds:.3f} s, "
            f"quantize {self.quantize_seconds:.3f} s, send {self.send_seconds:.3f} s)"
        )
        if self.checked:
            text += f", check: {'OK' if not self.mismatches else f'{len(self.mismatches)} mismatched'}"
        return text


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of the raw bytes (dtype and shape included), so equal digests mean bit-identical."""
    t = tensor.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class WeightDigests:
    """Digests of what was sent, by name, compared afterwards with what the engine holds. The
    engine's copy is cast back to the sent dtype first: an engine that keeps fp32 weights while we
    send bf16 holds them exactly (bf16 -> fp32 -> bf16 is lossless)."""

    def __init__(self) -> None:
        self.sent: dict[str, tuple[torch.dtype, str]] = {}

    def add(self, named: list[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in named:
            self.sent[name] = (tensor.dtype, tensor_digest(tensor))

    def compare(self, engine_weights: dict[str, torch.Tensor]) -> list[str]:
        """Names whose engine copy differs from what was sent, or that the engine lacks."""
        bad = []
        for name, (dtype, digest) in self.sent.items():
            held = engine_weights.get(name)
            if held is None or tensor_digest(held.detach().to(dtype)) != digest:
                bad.append(name)
        return bad
