"""Imported once by the forkserver that the multi-process tests start their workers from (see
`worker_forkserver` in tests/conftest.py): what those workers import, so that each forked worker starts
with it loaded. An optional package that is missing is skipped (its workers then import what they need)."""

import importlib
import os

# The workers run DeepSpeed on CPU tensors (gloo); sae_dist.train.deepspeed_engine sets the same before
# it first imports deepspeed in a process.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

for _name in (
    "torch",
    "torch.distributed",
    "transformers.models.llama.modeling_llama",  # the tiny test LM
    "transformers.tokenization_utils_fast",
    "sae_dist.cli",
    "sae_dist.harvest",
    "sae_dist.harvest.lm",
    "sae_dist.parallel.export",
    "sae_dist.parallel.tp",
    "helpers.synthetic",
    "sae_dist.train.deepspeed_engine",
    "sae_dist.train.trainer",
    "deepspeed",
    "deepspeed.runtime.zero.muon.muon_optimizer",  # imported by DeepSpeed's optimizer check: ~2 s
):
    try:
        importlib.import_module(_name)
    except ImportError:
        pass
