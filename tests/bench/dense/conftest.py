"""One torch thread for the dense tests, as ``taskbalance bench`` trains (``--threads``
default 1): small convolutions gain nothing from a second thread, and on a loaded machine two
threads make them many times slower."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
