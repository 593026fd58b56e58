import sys

from megatron_oreal.cli import main

sys.exit(main())
