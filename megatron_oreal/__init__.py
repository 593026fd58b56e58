"""megatron-oreal: OREAL (arXiv 2502.06781) reinforcement learning for math reasoning on Megatron-Core."""

__version__ = "0.1.0"
