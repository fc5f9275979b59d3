"""Equivalent compute (Gao et al. 2024 sec. 4.1): the inversion of a family's L(C) and the clean CE it
is measured with."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers.seeds import numpy_rng_seed

from sae_dist.eval.equivalent_compute import clean_cross_entropy, equivalent_compute, member_compute


def test_inverts_a_power_law_family():
    seed = numpy_rng_seed()
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
    seed = numpy_rng_seed()
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


@pytest.mark.parametrize("beta", [-1e-6, -1e-300, -1e-30])
def test_a_flat_family_gives_a_note_not_an_overflow(beta):
    """A family whose loss barely moves with compute: inverting it at another loss overflows a float."""
    C = np.array([1e15, 1e16, 1e17])
    L = np.exp(1.1 + beta * np.log(C))
    for ce in (5.0, 1.5):  # above and below the family's losses (~3.0)
        out = equivalent_compute(ce, C[:2], L[:2], 1e16)
        assert out["equivalent_compute"] is None and out["equivalent_compute_fraction"] is None, out
        assert "hardly changes with compute" in out["equivalent_compute_note"] or "does not fall" in out[
            "equivalent_compute_note"], out
    json.dumps(out)  # eval.json-ready


def test_member_compute():
    assert member_compute({"name": "a", "params": 1e8, "train_tokens": 2e9}) == pytest.approx(1.2e18)
    assert member_compute({"name": "b", "compute": 5e20}) == 5e20
    with pytest.raises(ValueError, match="'c' needs `compute`"):
        member_compute({"name": "c", "params": 1e8})


def test_clean_cross_entropy_matches_downstream_loss(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    from sae_dist.eval.downstream import downstream_loss

    seed = numpy_rng_seed()
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


def test_clean_cross_entropy_caps_its_batches_by_the_vocabulary(tiny_lm_dir, monkeypatch):
    """With room for two 12-token contexts of float32 log-probs, batch_size=32 runs forwards of at most two
    sequences (as downstream_loss does), with the CE of batch_size=2."""
    from transformers import AutoModelForCausalLM

    import sae_dist.train.heldout as heldout

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).eval()
    ids = torch.randint(3, model.config.vocab_size, (5, 12), generator=torch.Generator().manual_seed(5))
    ref = clean_cross_entropy(model, ids, batch_size=2)
    monkeypatch.setattr(heldout, "MAX_LOGPROB_ELEMENTS", 2 * 12 * model.config.vocab_size + 1)
    rows = []
    handle = model.register_forward_pre_hook(lambda m, args, kw: rows.append(kw["input_ids"].shape[0]),
                                             with_kwargs=True)
    try:
        ce = clean_cross_entropy(model, ids, batch_size=32)
    finally:
        handle.remove()
    assert rows == [2, 2, 1] and ce == ref


def test_family_members_visit_the_eval_device_one_at_a_time(monkeypatch):
    """Each LM-family member goes to the evaluation's device for its clean CE and back before the next one
    (all members on one GPU at once would need the whole family's memory). The members are stand-ins that
    record their moves instead of making them, so "cuda:0" needs no GPU."""
    import sae_dist.eval.equivalent_compute as ec
    from sae_dist.eval.evaluate import _equivalent_compute

    log = []

    class Member(torch.nn.Linear):
        def to(self, device):
            log.append((self.tag, "to", str(device)))
            return self

    family = []
    for i, name in enumerate(("a", "b", "c", "d")):
        m = Member(2, 2)
        m.tag = name
        family.append({"name": name, "model": m, "compute": 10.0 ** (18 + i)})
    ce = {"a": 4.0, "b": 3.5, "c": 3.2, "d": 3.0}
    monkeypatch.setattr(ec, "clean_cross_entropy", lambda model, seqs, **kw: log.append((model.tag, "ce")) or
                        ce[model.tag])
    out = _equivalent_compute(family, None, "c", 3.3, torch.zeros(2, 4, dtype=torch.long), batch_size=2,
                              device="cuda:0")
    assert log == [step for n in "abcd" for step in ((n, "to", "cuda:0"), (n, "ce"), (n, "to", "cpu"))]
    assert out["lm_family_ce"] == ce


def test_sae_eval_reports_equivalent_compute_of_an_lm_family(tiny_lm_dir, tmp_path):
    """run_eval (sae-eval) with eval.lm_family: every member loaded from its directory, its clean CE measured
    on the eval sequences (checked against a float64 log-softmax by hand), and the equivalent compute equal
    to inverting the family's fit at the spliced CE; the evaluated model's own compute is found by name."""
    from helpers.synthetic import make_tiny_lm
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sae_dist.cli import CONF_DIR, _docs, run_eval
    from sae_dist.eval.evaluate import heldout_sequences
    from sae_dist.sae.config import SAEConfig
    from sae_dist.sae.export import export_sae
    from sae_dist.sae.topk import TopKSAE

    seed = numpy_rng_seed()
    torch.manual_seed(seed)
    family = [{"name": make_tiny_lm(tmp_path / "lm16", hidden_size=16, seed=seed % 1000 + 1), "params": 2e5,
               "train_tokens": 1e9},
              {"name": tiny_lm_dir, "params": 6e5, "train_tokens": 1e9},
              {"name": make_tiny_lm(tmp_path / "lm48", hidden_size=48, n_heads=4, seed=seed % 1000 + 2),
               "compute": 9e15}]
    sae = TopKSAE(SAEConfig(d_in=32, d_sae=64, k=4, normalize="none"))
    export_sae(sae, tmp_path / "sae", hook_name="blocks.1.hook_resid_post", model_name=tiny_lm_dir, normalize="none")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"run_dir={tmp_path / 'run'}", "model=hf", f"model.name={tiny_lm_dir}", "model.dtype=float32",
            "device=cpu", f"sae_path={tmp_path / 'sae'}", "data.ctx_len=32", "eval.eval_tokens=300",
            "eval.probes=false", "eval.ablation_latents=0", "eval.shrinkage_tokens=0", "eval.n2g_latents=0"])
    with open_dict(cfg):
        cfg.eval.lm_family = family
    (tmp_path / "run").mkdir()
    res = run_eval(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["lm_family_ce"] == res["lm_family_ce"]

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    seqs = heldout_sequences(_docs(cfg), tok, 32, 300, float(cfg.data.eval_fraction))
    hand = []
    for m in family:
        lm = AutoModelForCausalLM.from_pretrained(m["name"], dtype=torch.float32).eval()
        with torch.no_grad():
            lp = torch.log_softmax(lm(input_ids=seqs).logits.double(), -1)
        hand.append(-lp[:, 1:-1].gather(-1, seqs[:, 2:].unsqueeze(-1)).mean().item())
    assert list(res["lm_family_ce"].values()) == pytest.approx(hand, rel=1e-5), seed
    assert res["lm_family_ce"][tiny_lm_dir] == pytest.approx(res["ce_loss_clean"], rel=1e-6), seed
    computes = [6 * 2e5 * 1e9, 6 * 6e5 * 1e9, 9e15]
    # the inversion, from the CEs just checked: a 3-member fit with an irreducible term is exactly determined,
    # and inverting it amplifies the float32-vs-float64 CE differences (1e-5) to ~1 % of the compute
    ref = equivalent_compute(res["ce_loss_sae"], computes, list(res["lm_family_ce"].values()), computes[1])
    assert res["model_compute"] == computes[1]
    for key in ("equivalent_compute", "equivalent_compute_fraction"):
        assert (res[key] is None and ref[key] is None) or res[key] == pytest.approx(ref[key], rel=1e-6), (seed, key)
    assert (res["equivalent_compute_note"] is None) == (ref["equivalent_compute_note"] is None), (seed, res, ref)

    with open_dict(cfg):
        cfg.eval.lm_family = family[:1]
    with pytest.raises(ValueError, match=">= 2 members"):
        run_eval(cfg, tmp_path / "run")
