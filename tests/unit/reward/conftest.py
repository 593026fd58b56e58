"""A warm verifier pool shared by this directory's tests (starting one costs about a second)."""

import pytest

from megatron_oreal.reward import Verifier


@pytest.fixture(scope="session")
def pool():
    with Verifier(workers=2, timeout=10.0) as verifier:  # generous: CI machines get loaded
        yield verifier
