"""Fixtures of the SAE architecture tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread(monkeypatch):
    """wandb offline and silent, torch on one thread for the test (small matmuls: faster single-threaded on a
    shared 2-core box); the thread count is restored after it."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
