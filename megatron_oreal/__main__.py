import sys

from megatron_oreal.launch.signals import exit_with_parent, ignore_preemption_signals, install_early

if __name__ == "__mp_main__":
    # A spawned/forkserver child of the CLI (Megatron's checkpoint-writer Manager, the verifier pool)
    # re-imports this module under this name: leave SIGTERM/SIGUSR1 to the trainer, which saves first,
    # and go when the trainer is gone (a kill -9 of the trainer left the Manager behind).
    ignore_preemption_signals()
    exit_with_parent()
elif __name__ == "__main__" and sys.argv[1:2] == ["train"]:
    install_early()  # before the imports of torch/Megatron: a USR1 in the first seconds must not kill (138)

from megatron_oreal.cli import main  # noqa: E402

# The guard matters: worker pools (forkserver/spawn) re-import the main module, and running the CLI
# again in every worker would start a second training run.
if __name__ == "__main__":
    sys.exit(main())
