"""What the trainer and engine tests (tests/unit/train/, tests/integration/train/) share: the environment
of the trainer tests (wandb offline, torch on one thread), data drawn from a known sparse dictionary, a
small activation store made from it and a run's train_log.jsonl; the SAE config and learning rate of the
engine tests; a recorder standing in for a wandb run. Random draws go through the seed a test passes in or
the global torch RNG, as the tests always drew them."""

from __future__ import annotations

import json

import torch

from sae_dist.sae.config import SAEConfig
from sae_dist.store import write_store

#: the engine tests' base learning rate (tests/*/train/test_deepspeed_engine*.py)
LR = 3e-3


def offline_one_thread(monkeypatch):
    """The body of an autouse fixture (`yield from offline_one_thread(monkeypatch)`): wandb offline and
    silent without an API key (never the network), torch on one thread for the test (small matmuls are
    faster single-threaded on a shared 2-core box); the thread count is restored after it."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sparse_dictionary_data(n_tokens=16384, d=32, n_feat=64, k_true=3, seed=None):
    """x = sum of k_true random unit dictionary atoms with magnitudes in [0.5, 2.5] + offset + noise."""
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ())))
    D = torch.nn.functional.normalize(torch.randn(n_feat, d, generator=g), dim=-1)
    idx = torch.argsort(torch.rand(n_tokens, n_feat, generator=g), dim=-1)[:, :k_true]
    vals = torch.rand(n_tokens, k_true, generator=g) * 2 + 0.5
    x = (vals[..., None] * D[idx]).sum(1)
    return (x + 0.01 * torch.randn(n_tokens, d, generator=g) + 0.3 * torch.randn(d, generator=g)).float()


def synthetic_store(tmp_path, x, name="store"):
    """An activation store of `x` at tmp_path / name (chunks of 512 tokens, shards of 2048)."""
    return write_store(tmp_path / name, x.numpy(), attrs={"model": "synthetic", "hook_name": "blocks.0.hook_resid_post",
                                                        "ctx_len": 64, "dataset": "synthetic"},
                       chunk_tokens=512, shard_tokens=2048)


def train_log(out):
    """The rows of the run's train_log.jsonl under `out`."""
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def engine_cfg() -> SAEConfig:
    """The engine tests' TopK SAE: d_in 16, 64 latents, k 4, k_aux 6."""
    return SAEConfig(d_in=16, d_sae=64, k=4, k_aux=6)


class WandbRecorder:
    """Stands in for a wandb run (`monkeypatch.setattr(wandb, "init", ...)`): keeps init's keywords, every
    `log` call as (step, metrics), the summary and the logged artifacts."""

    def __init__(self, **kw):
        self.init, self.logged, self.summary, self.artifacts = kw, [], {}, []

    def log(self, metrics, step):
        self.logged.append((step, dict(metrics)))

    def log_artifact(self, artifact):
        self.artifacts.append(artifact)

    def finish(self):
        pass
