"""Shared test set-up: the CPU shims for Megatron-Core are applied where CUDA is absent."""

import os
import sys

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `from helpers.tiny_hf import ...` from any test folder.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _wants_gpu(config) -> bool:
    expr = config.option.markexpr or ""
    return ("gpu" in expr and "not gpu" not in expr) or os.environ.get("MEGATRON_OREAL_TEST_CUDA") == "1"


def pytest_configure(config):
    # The suite tests the CPU path (gloo, the local layer spec, the CPU engine). On a GPU node (where
    # users run `make test` too) a visible CUDA device would move every model onto the GPU and ask
    # for Transformer Engine and SGLang, so CUDA is hidden from this process and the torchruns it
    # starts, before anything initialises it. `pytest -m gpu` (or MEGATRON_OREAL_TEST_CUDA=1) keeps it.
    if not _wants_gpu(config):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def pytest_collection_modifyitems(config, items):
    import importlib.util

    has_cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        has_cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (the CPU suite hides CUDA: `pytest -m gpu` runs these where there is one)")
    # The `sglang` tier runs under `make test-sglang`, which builds the server env and names its python in
    # MEGATRON_OREAL_SGLANG_PYTHON. Elsewhere it is left out (deselected, not skipped) unless asked for with
    # `-m sglang`, where the tests then fail with the reason (tests/sglang_server/conftest.py): never a silent skip.
    if not os.environ.get("MEGATRON_OREAL_SGLANG_PYTHON") and "sglang" not in (config.option.markexpr or ""):
        kept = [i for i in items if not i.get_closest_marker("sglang")]
        if len(kept) != len(items):
            config.hook.pytest_deselected(items=[i for i in items if i.get_closest_marker("sglang")])
            items[:] = kept
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
