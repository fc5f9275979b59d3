"""Shared fixtures: a tiny random Llama saved to disk, and a clean environment for subprocesses."""

from __future__ import annotations

import os
import shutil

import pytest

# Tests never touch the network: wandb writes offline run files, HF libraries stay offline.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without an NVIDIA GPU the Triton kernels are tested through Triton's interpreter; it must be chosen
# before any kernel module is imported (triton.jit reads it at decoration time).
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> str:
    """Directory holding a tiny random LlamaForCausalLM (d_model 32, 3 layers) and its BPE tokenizer."""
    from sae_dist.testing import make_tiny_lm

    return make_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))
