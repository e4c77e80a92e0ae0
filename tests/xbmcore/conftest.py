import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: the float32 results compared with the float64 references do not depend on the core count,
    and tests on a shared 2-core machine do not wait on descheduled threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
