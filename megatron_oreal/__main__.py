import sys

from megatron_oreal.cli import main

# The guard matters: worker pools (forkserver/spawn) re-import the main module, and running the CLI
# again in every worker would start a second training run.
if __name__ == "__main__":
    sys.exit(main())
