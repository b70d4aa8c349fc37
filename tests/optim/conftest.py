"""Fixtures the optimizer tests share."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Small matrices: one thread is several times faster than two on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
