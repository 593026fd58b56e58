"""Shared test set-up: the CPU shims for Megatron-Core are applied where CUDA is absent."""

import os
import sys

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `from helpers.tiny_hf import ...` from any test folder.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(config, items):
    import importlib.util

    has_cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        has_cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
