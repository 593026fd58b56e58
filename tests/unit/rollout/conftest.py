import pytest
import torch


@pytest.fixture
def one_thread():
    # Tiny tensors: a second intra-op thread only adds synchronisation, and on a busy 2-core machine
    # it makes every op wait for a descheduled peer (10x slower, measured).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
