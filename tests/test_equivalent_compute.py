"""Equivalent compute (Gao et al. 2024 sec. 4.1): the inversion of a family's L(C) and the clean CE it
is measured with."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sae_dist.eval.equivalent_compute import clean_cross_entropy, equivalent_compute, member_compute


def _seed() -> int:
    return int(np.random.default_rng().integers(0, 2**31))


def test_inverts_a_power_law_family():
    seed = _seed()
    rng = np.random.default_rng(seed)
    alpha, beta, c = rng.uniform(3, 5), rng.uniform(-0.2, -0.05), rng.uniform(1.0, 2.0)
    C = np.geomspace(1e18, 1e22, 5)
    L = np.exp(alpha + beta * np.log(C)) + c
    c_true = float(10 ** rng.uniform(18.5, 21.5))
    ce_sae = math.exp(alpha + beta * math.log(c_true)) + c
    model_c = float(C[-1])
    out = equivalent_compute(ce_sae, C, L, model_c)
    assert out["equivalent_compute"] == pytest.approx(c_true, rel=1e-3), (seed, out)
    assert out["equivalent_compute_fraction"] == pytest.approx(c_true / model_c, rel=1e-3)
    assert out["equivalent_compute_note"] is None
    # a spliced loss better than the irreducible term has no equivalent compute
    below = equivalent_compute(c * 0.9, C, L, model_c)
    assert below["equivalent_compute"] is None and "irreducible" in below["equivalent_compute_note"]


def test_two_members_use_the_line_through_both():
    seed = _seed()
    rng = np.random.default_rng(seed)
    C = np.array([1e19, 1e21])
    L = np.array([rng.uniform(3.5, 4.0), rng.uniform(2.5, 3.0)])
    ce = float(rng.uniform(L[1], L[0]))
    out = equivalent_compute(ce, C[::-1], L[::-1], 1e21)  # order of members does not matter
    # log-log interpolation by hand
    t = (math.log(ce) - math.log(L[0])) / (math.log(L[1]) - math.log(L[0]))
    ref = math.exp(math.log(C[0]) + t * (math.log(C[1]) - math.log(C[0])))
    assert out["equivalent_compute"] == pytest.approx(ref, rel=1e-9), (seed, out, ref)
    with pytest.raises(ValueError, match=">= 2 family members"):
        equivalent_compute(ce, [1e19], [3.0], 1e21)


def test_member_compute():
    assert member_compute({"name": "a", "params": 1e8, "train_tokens": 2e9}) == pytest.approx(1.2e18)
    assert member_compute({"name": "b", "compute": 5e20}) == 5e20
    with pytest.raises(ValueError, match="'c' needs `compute`"):
        member_compute({"name": "c", "params": 1e8})


def test_clean_cross_entropy_matches_downstream_loss(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    from sae_dist.eval.downstream import downstream_loss

    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).eval()
    ids = torch.randint(3, model.config.vocab_size, (5, 12), generator=g)
    ids[:, 0] = 1
    ref = downstream_loss(model, torch.nn.Identity(), "blocks.1.hook_resid_post", ids, batch_size=2)
    ce = clean_cross_entropy(model, ids, batch_size=3)
    assert ce == pytest.approx(ref["ce_loss_clean"], rel=1e-6), seed
    # by hand, float64
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
    hand = -lp[:, 1:-1].gather(-1, ids[:, 2:].unsqueeze(-1)).mean().item()
    assert ce == pytest.approx(hand, rel=1e-5), seed
    bad = ids.clone()
    bad[0, 3] = model.config.vocab_size + 5
    with pytest.raises(ValueError, match="share the evaluated model's tokenizer"):
        clean_cross_entropy(model, bad)
