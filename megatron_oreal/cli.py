"""`python -m megatron_oreal <command>` (also installed as `oreal`).

Each subcommand lives next to the code it drives and exposes `main(argv) -> int`; this file only
dispatches, importing the command's module lazily so `oreal verify` never imports Megatron.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module with `main(argv)`, one-line help). An explicit registry: greppable, no magic.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("megatron_oreal.train", "run the OREAL RL loop from a YAML config"),
    "sft": ("megatron_oreal.sft", "supervised fine-tuning on prompt/response JSONL"),
    "eval": ("megatron_oreal.evaluate", "greedy pass@1 of an HF model on a JSONL set"),
    "convert": ("megatron_oreal.checkpoint.convert", "HF <-> Megatron checkpoint conversion"),
    "profile": ("megatron_oreal.observability.profile", "run N steps and print a per-stage table"),
    "plan": ("megatron_oreal.observability.plan", "per-GPU memory and step-time estimate"),
    "verify": ("megatron_oreal.reward.cli", "score solution/gold pairs with the math verifier"),
}


def _usage() -> str:
    lines = ["usage: python -m megatron_oreal <command> [args]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `python -m megatron_oreal <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if name == "train":  # the console script `oreal train`: record SIGTERM/SIGUSR1 before the heavy imports
        from megatron_oreal.launch.signals import install_early

        install_early()
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
