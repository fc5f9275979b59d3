"""When sae-train's held-out evaluation has a step ahead (`evals_due`: a multiple of trainer.eval_every_steps
after the run's step, up to where it stops), the options refused by name, and the splice of a latent-sharded SAE
(`ShardedTopKSplice`) on one process against the exported SAE (over tp ranks:
tests/integration/train/test_heldout_eval.py)."""

import math

import pytest
import torch

from sae_dist.sae import SAEConfig, TopKSAE
from sae_dist.sae.export import MAX_PRE_ELEMENTS, exported_view
from sae_dist.train.config import TrainerConfig
from sae_dist.train.heldout import ShardedTopKSplice, evals_due


@pytest.mark.parametrize(("every", "step", "stop_at", "due"), [
    (10, 0, 10, True),  # 10 steps: step 10 is the last
    (11, 0, 10, False),
    (0, 0, 10, False),  # off
    (5, 0, 4, False),  # stopped at step 4 (trainer.max_steps)
    (4, 0, 4, True),
    (1, 0, 1, True),  # a run of one step
    (5, 6, 9, False),  # resumed at step 6: its evaluation at 5 is behind it, 10 beyond its end
    (5, 4, 9, True),  # resumed at step 4: 5 is ahead
    (5, 5, 10, True),  # resumed right after an evaluation: the next at 10
])
def test_an_evaluation_is_due_when_a_step_of_it_is_ahead(every, step, stop_at, due):
    assert evals_due(every, step, stop_at) is due


@pytest.mark.parametrize(("kw", "msg"), [({"eval_every_steps": -1}, "trainer.eval_every_steps=-1 must be >= 0"),
                                         ({"eval_contexts": 0}, "trainer.eval_contexts=0 >= 1")])
def test_bad_options_are_refused_by_name(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TrainerConfig(**kw)


@pytest.mark.parametrize("mode", ["scalar", "layer_norm", "none"])
def test_the_sharded_splice_of_a_whole_sae_is_its_export(mode):
    """On one process (the local comm: one shard holding every latent) the splice's x_hat of RAW activations is the
    exported SAE's (`exported_view`) to float rounding, also taken in blocks of a few rows (each normalised on its
    own, the last one short)."""
    d, n = 16, 48
    g = torch.Generator().manual_seed(3)
    sae = TopKSAE(SAEConfig(d_in=d, d_sae=n, k=4, normalize=mode), generator=g)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3, generator=g)
        sae.b_dec.normal_(0, 0.5, generator=g)
        sae.W_enc.add_(0.2 * torch.randn(d, n, generator=g))
    x = torch.randn(70, d, generator=g) * torch.rand(70, 1, generator=g) * 5 + 2 * torch.randn(d, generator=g)
    scale = math.sqrt(d) / float(x.norm(dim=-1).mean()) if mode == "scalar" else None
    with torch.no_grad():
        want = exported_view(sae, normalize=mode, scale=scale)(x)
    splice = ShardedTopKSplice(sae, normalize=mode, scale=scale)
    assert splice.block_rows == MAX_PRE_ELEMENTS // n
    torch.testing.assert_close(splice(x), want, rtol=1e-5, atol=1e-5)
    splice.block_rows = 8
    torch.testing.assert_close(splice(x), want, rtol=1e-5, atol=1e-5)
    assert float((want - x).norm()) > 0.1 * float(x.norm())  # not the identity


def test_the_loader_runs_only_where_and_when_an_evaluation_is_ahead(capsys):
    """`_open_heldout` calls sae-train's loader on dp replica 0 only, only when a run still has an evaluation step
    ahead (a run resumed past its last one loads no LM), with the most contexts any such run asks for; a loader
    that fails turns the evaluation off with a notice instead of failing that rank."""
    from types import SimpleNamespace

    from sae_dist.train.trainer import _open_heldout

    def run(step, stop_at, every, contexts):
        return SimpleNamespace(step=step, stop_at=stop_at,
                               tcfg=TrainerConfig(eval_every_steps=every, eval_contexts=contexts))

    calls = []

    def loader(n):
        calls.append(n)
        return f"heldout({n})"

    replica0, replica1 = SimpleNamespace(tp=1, dp_rank=0), SimpleNamespace(tp=1, dp_rank=1)
    runs = [run(0, 10, 5, 8), run(0, 10, 20, 64), run(3, 10, 5, 16)]  # the second has no evaluation in its run
    assert _open_heldout(loader, runs, replica0) == "heldout(16)" and calls == [16]
    assert _open_heldout(loader, runs, replica1) is None and calls == [16]
    assert _open_heldout(loader, [run(6, 9, 5, 8)], replica0) is None and calls == [16]  # resumed past it
    assert _open_heldout("given", [run(6, 9, 5, 8)], replica0) == "given"  # a HeldoutEval given as is

    def broken(n):
        raise RuntimeError("CUDA out of memory")

    assert _open_heldout(broken, runs, replica0) is None
    err = capsys.readouterr().err
    assert "held-out evaluation off (trainer.eval_every_steps): RuntimeError: CUDA out of memory" in err
