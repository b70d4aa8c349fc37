import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # the curvature tests use tiny models: one intra-op thread avoids oversubscription on shared cores
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
