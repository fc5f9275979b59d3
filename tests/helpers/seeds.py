"""Fresh random seeds drawn from the global RNGs that tests/conftest.py seeds with TEST_SEED before every
test (`seed_everything`): a test draws its data's seed here and names it in its assert messages, so a
failure reproduces on a rerun (or under another SAE_DIST_TEST_SEED). Each function draws from one RNG,
as the tests that use it always have; which one a test uses decides the seeds it gets."""

from __future__ import annotations

import random

import numpy as np
import torch


def torch_seed(high: int = 2**31 - 1) -> int:
    """A seed in [0, high) from torch's global generator."""
    return int(torch.randint(0, high, ()))


def numpy_seed() -> int:
    """A seed in [0, 2**31) from numpy's global RNG."""
    return int(np.random.randint(2**31))


def numpy_rng_seed() -> int:
    """A seed in [0, 2**31) from a numpy Generator seeded from numpy's global RNG."""
    return int(np.random.default_rng(np.random.randint(2**31)).integers(0, 2**31))


def python_seed() -> int:
    """A seed in [0, 2**31) from `random`'s global RNG."""
    return random.randrange(2**31)
