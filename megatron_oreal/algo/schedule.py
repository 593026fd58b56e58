"""Learning-rate schedule, exactly as the reference (docs/algorithm.md §4.3, [train_oreal.py:L356-415]).

A LambdaLR linear warm-up followed by a separately built CosineAnnealingLR, both stepped at the start
of every step; with s the 0-based step index:
  s <= warmup: lr = base * min((s + 1) / warmup, 1)
  s >  warmup: lr = min + (base - min) * (1 + cos(pi * (s - warmup) / (total - warmup))) / 2
The actor's schedule advances during its frozen steps too, so its first update (s = 10) uses base.
"""

from __future__ import annotations

import math


def lr_at(step: int, base: float, min_lr: float, warmup: int, total: int) -> float:
    if step < 0:
        raise ValueError(f"lr schedule: step must be >= 0, got {step}")
    if total <= warmup:
        raise ValueError(f"lr schedule: total steps ({total}) must exceed warm-up steps ({warmup})")
    if warmup > 0 and step <= warmup:
        return base * min((step + 1) / warmup, 1.0)
    s = min(step, total) - warmup  # past the end the cosine stays at its minimum
    return min_lr + (base - min_lr) * (1.0 + math.cos(math.pi * s / (total - warmup))) / 2.0
