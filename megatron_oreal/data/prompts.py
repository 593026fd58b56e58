"""Prompt datasets from JSONL, difficulty balancing, and the resumable, DP-sharded prompt stream.

Field names differ between sets (MATH-500 `problem`/`answer`, GSM8K `question`/`answer` with the
final answer after "#### ", OREAL-RL-Prompts `question`/`gold_answer`/`pass_rate`, AMC23 numeric
answers), so the configured key is tried first and then the usual alternatives. Every row is checked
when the file is loaded: a bad row fails the run before any model is built, naming file and line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from megatron_oreal.config import DataConfig
from megatron_oreal.data.templates import CHAT, tokenize_prompts
from megatron_oreal.types import Prompt

PROMPT_KEYS = ("question", "problem", "prompt")
ANSWER_KEYS = ("gold_answer", "answer")
META_KEYS = ("subject", "level", "pass_rate", "id", "unique_id")
ANSWER_FORMATS = ("auto", "plain", "gsm8k")

# docs/algorithm.md §4.1 / [C7] data_difficulty_balance_cfg: half-open pass-rate ranges -> repeats.
# A pass rate in none of them (>= 0.8) drops the prompt, as the reference's loop does.
DIFFICULTY_REPEATS: tuple[tuple[tuple[float, float], int], ...] = (
    ((0.0, 0.2), 6),
    ((0.2, 0.4), 4),
    ((0.4, 0.6), 4),
    ((0.6, 0.8), 2),
)


class DataError(ValueError):
    """A bad data file or row: the message starts with `file:line`."""


def _keys(preferred: str | None, defaults: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys([k for k in (preferred, *defaults) if k]))


def parse_answer(raw: Any, answer_format: str = "auto") -> str:
    """The gold answer as a string; raises ValueError (the caller adds file:line).

    JSON numbers (AMC23's 27.0) become their shortest exact text ("27"); GSM8K-style text keeps what
    follows the last "#### " (thousands commas removed: GSM8K finals are plain integers).
    """
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"unknown answer_format {answer_format!r} (known: {', '.join(ANSWER_FORMATS)})")
    if isinstance(raw, bool) or raw is None:
        raise ValueError(f"answer must be a string or a number, got {raw!r}")
    if isinstance(raw, (int, float)):
        if isinstance(raw, float) and not math.isfinite(raw):
            raise ValueError(f"answer is not a finite number: {raw!r}")
        text = str(int(raw)) if float(raw).is_integer() else repr(float(raw))
    elif isinstance(raw, str):
        text = raw
        if answer_format == "gsm8k" or (answer_format == "auto" and "####" in raw):
            if "####" not in raw:
                raise ValueError("answer has no '#### ' final-answer marker (answer_format=gsm8k)")
            text = raw.rsplit("####", 1)[1].replace(",", "")
    else:
        raise ValueError(f"answer must be a string or a number, got {type(raw).__name__}")
    text = text.strip()
    if not text:
        raise ValueError("answer is empty")
    return text


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, row) for every non-blank line; a broken line is a DataError naming file:line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read data file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append((lineno, row))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def load_prompts(
    path: str | Path,
    prompt_key: str | None = None,
    answer_key: str | None = None,
    answer_format: str = "auto",
    limit: int = 0,
) -> list[Prompt]:
    """Rows of a JSONL file -> Prompts (uid "name:line"; subject/level/pass_rate/id kept in meta)."""
    path = Path(path)
    p_keys, a_keys = _keys(prompt_key, PROMPT_KEYS), _keys(answer_key, ANSWER_KEYS)
    prompts = []
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        pk = next((k for k in p_keys if k in row), None)
        if pk is None:
            raise DataError(f"{where}: no prompt field (tried {', '.join(p_keys)}; the row has {', '.join(row) or 'none'})")
        text = row[pk]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: prompt field {pk!r} is empty or not a string")
        ak = next((k for k in a_keys if k in row), None)
        if ak is None:
            raise DataError(f"{where}: no answer field (tried {', '.join(a_keys)}; the row has {', '.join(row) or 'none'})")
        try:
            gold = parse_answer(row[ak], answer_format)
        except ValueError as exc:
            raise DataError(f"{where}: field {ak!r}: {exc}") from None
        meta = {k: row[k] for k in META_KEYS if k in row}
        if "pass_rate" in meta:
            pr = meta["pass_rate"]
            if isinstance(pr, bool) or not isinstance(pr, (int, float)) or not 0.0 <= pr <= 1.0:
                raise DataError(f"{where}: pass_rate must be a number in [0, 1], got {pr!r}")
        prompts.append(Prompt(uid=f"{path.name}:{lineno}", text=text, gold=gold, meta=meta))
        if limit and len(prompts) >= limit:
            break
    return prompts


def check_prompt_lengths(prompts: Iterable[Prompt], max_total_length: int, max_position: int, what: str) -> None:
    """DataError naming the first templated prompt that leaves no room for a response: one of
    >= `max_total_length` tokens (0 = no cap) or >= the model's `max_position_embeddings`. Without
    this such a prompt generates nothing and scores -1 silently (or generates past the position limit)."""
    for p in prompts:
        n = len(p.input_ids)
        if max_total_length > 0 and n >= max_total_length:
            raise DataError(f"{p.uid}: the templated prompt is {n} tokens, no room for a response within "
                            f"{what} max_total_length={max_total_length}")
        if max_position > 0 and n >= max_position:
            raise DataError(f"{p.uid}: the templated prompt is {n} tokens; the model's max_position_embeddings "
                            f"is {max_position}")


def load_eval_set(path: str | Path, prompt_key: str | None = None, answer_key: str | None = None,
                  limit: int = 0, answer_format: str = "auto") -> list[Prompt]:
    """A held-out set (MATH-500, GSM8K, AIME, AMC): same validation; `subject`/`level` stay in meta
    for per-subject / per-level breakdowns."""
    return load_prompts(path, prompt_key, answer_key, answer_format, limit)


def _prompt_format(cfg: DataConfig) -> str:
    return getattr(cfg, "prompt_format", CHAT)


def load_eval_prompts(cfg: DataConfig, tokenizer: Any = None) -> list[Prompt]:
    """`data.eval_file` (first `data.eval_limit` rows), templated like the training prompts."""
    if not cfg.eval_file:
        raise DataError("data.eval_file is empty: no held-out set configured")
    prompts = load_eval_set(cfg.eval_file, cfg.prompt_key, cfg.answer_key, limit=cfg.eval_limit)
    if tokenizer is not None:
        tokenize_prompts(prompts, tokenizer, cfg.system_prompt, _prompt_format(cfg))
    return prompts


def balance_difficulty(prompts: Sequence[Prompt], table=DIFFICULTY_REPEATS) -> list[Prompt]:
    """Repeat each prompt by its offline pass rate ([DP] balance_difficulty_with_cfg); drop the rest."""
    out = []
    for p in prompts:
        if "pass_rate" not in p.meta:
            raise DataError(f"{p.uid}: data.difficulty_balance needs a pass_rate field on every row")
        rate = p.meta["pass_rate"]
        for (low, high), repeat in table:
            if low <= rate < high:
                # copies get distinct uids ("name:line#2"...): one step may hold several of them
                out.extend(dataclasses.replace(p, uid=p.uid if r == 0 else f"{p.uid}#{r + 1}", input_ids=list(p.input_ids),
                                               meta=dict(p.meta)) for r in range(repeat))
                break
    if not out:
        raise DataError("difficulty balancing dropped every prompt (all pass_rate >= 0.8)")
    return out


class PromptStream:
    """An endless, seeded, epoch-reshuffled stream of `prompts_per_step` prompts per step.

    The global order is the same on every rank: epoch e is a permutation drawn from a generator
    seeded with (seed, e). A step takes the next `prompts_per_step` prompts of that order; an epoch's
    tail shorter than a step is skipped (as a drop_last sampler does; the next shuffle differs) unless
    the whole set is smaller than a step. Rank r keeps its contiguous slice of prompts_per_step / dp_size. The cursor (epoch, offset) is the whole state, so a resumed run
    continues with exactly the same prompts.
    """

    def __init__(self, prompts: Sequence[Prompt], prompts_per_step: int, seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1):
        if not prompts:
            raise DataError("PromptStream: no prompts")
        if prompts_per_step <= 0 or prompts_per_step % dp_size != 0:
            raise DataError(f"data.prompts_per_step={prompts_per_step} must be a positive multiple of the "
                            f"number of rollout data-parallel ranks ({dp_size})")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"PromptStream: dp_rank {dp_rank} outside [0, {dp_size})")
        self.prompts = list(prompts)
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.epoch, self.offset = 0, 0
        self._order_epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    @classmethod
    def from_config(cls, cfg: DataConfig, tokenizer: Any = None, *, prompts: Sequence[Prompt] | None = None,
                    dp_rank: int = 0, dp_size: int = 1) -> "PromptStream":
        """From `data.*`: load `train_file` (unless `prompts` are given), template + tokenise them with
        `tokenizer` (when given), balance by difficulty when configured."""
        if prompts is None:
            if not cfg.train_file or cfg.train_file.startswith("builtin:"):
                raise DataError(f"data.train_file: {cfg.train_file!r} is not a JSONL file; "
                                "write the built-in task's prompts to JSONL (data/arith.py) or pass prompts")
            prompts = load_prompts(cfg.train_file, cfg.prompt_key, cfg.answer_key)
        if tokenizer is not None:
            tokenize_prompts(prompts, tokenizer, cfg.system_prompt, _prompt_format(cfg))
        if cfg.difficulty_balance:
            if any("pass_rate" in p.meta for p in prompts):
                prompts = balance_difficulty(prompts)
            else:  # the recipe's default, on data that cannot be balanced (e.g. the built-in tasks)
                warnings.warn(f"data.difficulty_balance: {cfg.train_file or 'the prompts'} has no pass_rate "
                              "field, so prompts are not re-weighted (set data.difficulty_balance=false to "
                              "silence this)", stacklevel=2)
        return cls(prompts, cfg.prompts_per_step, cfg.seed, dp_rank, dp_size)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if epoch != self._order_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order, self._order_epoch = torch.randperm(len(self.prompts), generator=gen), epoch
        return self._order

    def next_global(self) -> list[Prompt]:
        """The whole step's prompts (every rank computes the same list); advances the cursor."""
        picked: list[int] = []
        while len(picked) < self.prompts_per_step:
            order = self._epoch_order(self.epoch)
            need, left = self.prompts_per_step - len(picked), len(order) - self.offset
            if not picked and left < need and len(order) >= self.prompts_per_step:
                # drop the epoch's short tail (a fresh shuffle next epoch), so one step never holds the
                # same row twice; only a set smaller than a step has to run on across epochs
                self.epoch, self.offset = self.epoch + 1, 0
                continue
            take = min(need, left)
            picked.extend(order[self.offset : self.offset + take].tolist())
            self.offset += take
            if self.offset == len(order):
                self.epoch, self.offset = self.epoch + 1, 0
        return [self.prompts[i] for i in picked]

    def __next__(self) -> list[Prompt]:
        """This rank's slice of the next step."""
        step = self.next_global()
        share = self.prompts_per_step // self.dp_size
        return step[self.dp_rank * share : (self.dp_rank + 1) * share]

    def __iter__(self) -> Iterator[list[Prompt]]:
        return self

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed,
                "num_prompts": len(self.prompts), "prompts_per_step": self.prompts_per_step}

    def load_state_dict(self, state: dict) -> None:
        # A different dataset or seed would silently change the data order: refuse.
        for key, mine in (("seed", self.seed), ("num_prompts", len(self.prompts))):
            if state.get(key) != mine:
                raise DataError(f"prompt stream state: {key}={state.get(key)!r} in the checkpoint but {mine!r} now "
                                "(the data file or data.seed changed since the checkpoint)")
        if not 0 <= int(state["offset"]) < len(self.prompts):
            raise DataError(f"prompt stream state: offset {state['offset']} outside [0, {len(self.prompts)})")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
