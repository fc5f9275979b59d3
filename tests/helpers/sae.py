"""What the architecture tests (tests/unit/sae/test_arch_*.py) share: random non-trivial weights, the
L1-family config, an interrupted-and-resumed training run and the `sae-train` command line on a small
synthetic store. Random draws go through the generator or seed a test passes in, in the order the tests
always drew them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from sae_dist.eval.synthetic import SyntheticDictionary
from sae_dist.sae.config import SAEConfig
from sae_dist.store import write_store
from sae_dist.train.trainer import TrainerConfig, train


def l1_cfg(architecture: str, d=12, n=40, normalize="none", **options) -> SAEConfig:
    """An SAEConfig of an L1-penalised architecture (relu, prolu: no k) with `options`."""
    return SAEConfig(d_in=d, d_sae=n, k=None, architecture=architecture, normalize=normalize, options=options)


@torch.no_grad()
def randomize_weights(sae, g: torch.Generator, *, row_scale: bool, b_enc_scale: float) -> None:
    """Non-trivial weights: unit decoder rows (times random norms in [0.2, 3] with `row_scale`), a random
    encoder (when the SAE has its own), b_enc ~ b_enc_scale * N(0, 1), b_dec ~ 0.5 * N(0, 1)."""
    d, n = sae.d_in, sae.d_sae
    w = torch.randn(n, d, generator=g)
    w = w / w.norm(dim=-1, keepdim=True)
    if row_scale:
        w = w * (0.2 + 2.8 * torch.rand(n, 1, generator=g))
    sae.W_dec.copy_(w)
    if "W_enc" in dict(sae.named_parameters()):
        sae.W_enc.copy_(torch.randn(d, n, generator=g) / d**0.5)
    sae.b_enc.copy_(b_enc_scale * torch.randn(n, generator=g))
    sae.b_dec.copy_(0.5 * torch.randn(d, generator=g))


@torch.no_grad()
def perturb_topk_family(sae, g: torch.Generator) -> None:
    """Move a freshly built TopK-family SAE off its initialisation: b_enc ~ 0.3 N(0, 1), b_dec ~ 0.5 N(0, 1),
    W_enc += 0.2 N(0, 1)."""
    n, d = sae.b_enc.numel(), sae.b_dec.numel()
    sae.b_enc.copy_(0.3 * torch.randn(n, generator=g))
    sae.b_dec.copy_(0.5 * torch.randn(d, generator=g))
    sae.W_enc.add_(0.2 * torch.randn(d, n, generator=g))


def train_interrupted_and_resumed(tmp_path: Path, store, cfg: SAEConfig, seed: int):
    """Train `cfg` on `store` for 30 steps of 128 tokens (EMA on, a checkpoint every 8 steps) into
    tmp_path/"a"; into tmp_path/"b" the same run stopped after step 19, then resumed to the end. Asserts
    the stop and the resume; returns the exported weights of a and of b (safetensors dicts)."""
    def tcfg(max_steps=None):
        return TrainerConfig(tokens=128 * 30, batch_tokens=128, lr=3e-3, warmup_steps=2, ema=True, ema_decay=0.9,
                             checkpoint_every_steps=8, keep_checkpoints=2, log_every_steps=1, max_steps=max_steps)

    kw = dict(store_path=store, sae_cfg=cfg, progress=False, seed=seed, wandb_cfg={"enabled": False})
    train(out_dir=tmp_path / "a", trainer_cfg=tcfg(), **kw)
    r1 = train(out_dir=tmp_path / "b", trainer_cfg=tcfg(max_steps=19), **kw)
    assert r1["stopped_early"] and r1["steps"] == 19
    r2 = train(out_dir=tmp_path / "b", trainer_cfg=tcfg(), **kw)
    assert not r2["stopped_early"] and r2["steps"] == 30
    wa = load_file(str(tmp_path / "a" / "sae" / "sae_weights.safetensors"))
    wb = load_file(str(tmp_path / "b" / "sae" / "sae_weights.safetensors"))
    return wa, wb


def sae_train_on_synthetic(console_script, tmp_path: Path, seed: int, *sae_args: str, batch_tokens: int = 512,
                           threads: int | None = None):
    """`sae-train` (conftest.py's `console_script`, in this process) with `sae_args` on a store of 8192
    tokens of SyntheticDictionary(24, 48, p_active=0.08, seed=seed): 16384 training tokens on the CPU,
    wandb off. Returns (dictionary, stored activations, CompletedProcess, run directory)."""
    sd = SyntheticDictionary(24, 48, p_active=0.08, seed=seed)
    x, _ = sd.sample(8192)
    store = write_store(tmp_path / "acts.zarr", x, attrs={"model": "synthetic", "hook_name": "none"})
    run = tmp_path / "run"
    proc = console_script(
        "sae-train", f"run_dir={run}", f"store.path={store}", *sae_args, "trainer.tokens=16384",
        f"trainer.batch_tokens={batch_tokens}", "device=cpu", f"seed={seed % 1000}", "wandb.enabled=false",
        threads=threads)
    return sd, x, proc, run


def sae_train_on_sparse_atoms(console_script, tmp_path: Path, *sae_args: str):
    """`sae-train` (in this process) with `sae_args` on 8000 tokens made of 48 random unit atoms in R^24
    (about 3 active per token, exponential coefficients, noise 0.01; numpy's global RNG picks the data),
    16384 training tokens on the CPU, seed 0, wandb off. Returns (activations, CompletedProcess, run directory)."""
    rng = np.random.default_rng(np.random.randint(2**31))
    d = 24
    atoms = rng.normal(size=(48, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    coef = rng.exponential(size=(8000, 48)) * (rng.random((8000, 48)) < 3 / 48)
    acts = (coef @ atoms + 0.01 * rng.normal(size=(8000, d))).astype(np.float32)
    store = write_store(tmp_path / "acts.zarr", acts, attrs={"model": "synthetic", "hook_name": "none"})
    run = tmp_path / "x"
    proc = console_script(
        "sae-train", f"run_dir={run}", f"store.path={store}", *sae_args, "trainer.tokens=16384",
        "trainer.batch_tokens=512", "device=cpu", "seed=0", "wandb.enabled=false")
    return acts, proc, run


def train_l0_by_l1_coef(tmp_path: Path, architecture: str, seed: int, coefs=(0.03, 0.3)) -> dict:
    """Train `architecture` (relu, prolu; 128 latents) with each L1 coefficient of `coefs` on the same
    SyntheticDictionary(32, 64, p_active=0.05, seed=seed), 60k tokens (train_on_synthetic); returns
    {coef: the last logged train/l0}."""
    from helpers.synthetic import train_on_synthetic

    sd = SyntheticDictionary(32, 64, p_active=0.05, seed=seed)
    l0 = {}
    for coef in coefs:
        cfg = SAEConfig(d_in=32, d_sae=128, k=None, architecture=architecture, normalize="none",
                        options={"l1_coef": coef})
        _, res, _ = train_on_synthetic(tmp_path / str(coef), cfg, dictionary=sd, seed=seed, tokens=60_000,
                                       batch_tokens=512, lr=1e-2)
        l0[coef] = res["metrics"]["train/l0"]
    return l0


def reference_l1_controller(l0s, target, gain, tau, log0):
    """The controller of `l1_controller_step` written out over a whole sequence of L0s with numpy."""
    logs, e_prev, r = [log0], None, 0.0
    for l0 in l0s:
        e = np.log(max(l0, target / 1000) / target)
        if e_prev is not None:
            r = 0.9 * r + 0.1 * (e - e_prev)
        logs.append(logs[-1] + gain * np.clip(e + tau * r, -1, 1))
        e_prev = e
    return np.array(logs)
