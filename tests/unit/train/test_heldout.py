"""When sae-train's held-out evaluation runs at all (`evals_due`: a step that is a multiple of
trainer.eval_every_steps inside the run), the options refused by name, and the splice of a latent-sharded SAE
(`ShardedTopKSplice`) on one process against the exported SAE (over tp ranks:
tests/integration/train/test_heldout_eval.py)."""

import math

import pytest
import torch

from sae_dist.sae import SAEConfig, TopKSAE
from sae_dist.sae.export import MAX_PRE_ELEMENTS, exported_view
from sae_dist.train.config import TrainerConfig
from sae_dist.train.heldout import ShardedTopKSplice, evals_due


@pytest.mark.parametrize(("every", "tokens", "max_steps", "due"), [
    (10, 1000, None, True),  # 10 steps: step 10 is the last
    (11, 1000, None, False),
    (0, 1000, None, False),  # off
    (5, 1000, 4, False),  # stopped at step 4 (trainer.max_steps)
    (4, 1000, 4, True),
    (1, 50, None, True),  # a run shorter than one batch still makes one step
])
def test_an_evaluation_is_due_when_its_step_is_inside_the_run(every, tokens, max_steps, due):
    assert evals_due(TrainerConfig(tokens=tokens, batch_tokens=100, eval_every_steps=every,
                                   max_steps=max_steps)) is due


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
