"""Turns (profile --take-turns, bench_vs_trl.py --paired): two processes run their steps strictly in
alternation after the first, and a side whose partner has finished stops waiting."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from helpers.torchrun import pythonpath

from megatron_oreal.observability.turns import Turns

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
SIDE = """
import sys, time
from megatron_oreal.observability.turns import Turns
path, me, other, steps, log = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
turns = Turns(path, me, other, poll=0.001, timeout=60)
for i in range(steps):
    with open(log, "a") as f:
        f.write(f"{me} start {i}\\n")
    time.sleep(0.02)  # the step: another side running now would write its start in between
    with open(log, "a") as f:
        f.write(f"{me} end {i}\\n")
    turns.pass_and_wait()
turns.finish()
"""


def test_two_processes_alternate_step_by_step(tmp_path):
    turn, log = tmp_path / "turn", tmp_path / "log"
    turn.write_text("a")
    env = dict(os.environ, PYTHONPATH=pythonpath(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", SIDE, str(turn), me, other, str(steps), str(log)], env=env)
             for me, other, steps in (("a", "b", 4), ("b", "a", 6))]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    lines = log.read_text().split("\n")[:-1]
    # After each side's first step (which may overlap the other's start-up), a step's start and end
    # are adjacent and the sides alternate until a has finished; b then runs its last two alone.
    firsts = {"a start 0", "a end 0", "b start 0", "b end 0"}
    rest = [line for line in lines if line not in firsts]
    steps = [(rest[i], rest[i + 1]) for i in range(0, len(rest), 2)]
    assert all(s.split()[0] == e.split()[0] and s.split()[1:] == ["start", e.split()[2]] and e.split()[1] == "end"
               for s, e in steps), rest
    order = [s.split()[0] + s.split()[2] for s, _ in steps]
    assert order in (["a1", "b1", "a2", "b2", "a3", "b3", "b4", "b5"], ["b1", "a1", "b2", "a2", "b3", "a3", "b4", "b5"])


def test_waiting_stops_when_the_partner_is_done(tmp_path):
    me = Turns(tmp_path / "turn", "x", "y", poll=0.001, timeout=30)
    Turns(tmp_path / "turn", "y", "x").finish()  # y is done and handed the turn to x
    t0 = time.perf_counter()
    me.pass_and_wait()  # gives the turn to y, which will never answer: returns on y's done marker
    assert time.perf_counter() - t0 < 5
    assert me.whose() == "y"


def test_command_line_spec():
    t = Turns.from_spec("/tmp/a:b/turn:grpo:trl")
    assert (str(t.path), t.me, t.other) == ("/tmp/a:b/turn", "grpo", "trl")
    with pytest.raises(ValueError, match="FILE:ME:OTHER"):
        Turns.from_spec("turn:grpo")
