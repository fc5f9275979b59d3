"""DeepSpeed engine (`sae_dist.train.deepspeed_engine`) argument checks in this process: a ZeRO stage other
than 1 or 2 (ZeRO-3 named as conflicting with the latent sharding) and non-float32 parameters raise
ValueError before DeepSpeed is started. The engine against the torch engine, every DeepSpeed run in
spawned worker processes: tests/integration/train/test_deepspeed_engine_gloo.py."""

from __future__ import annotations

import pytest
from helpers.train import LR, engine_cfg

from sae_dist.sae.config import SAEConfig
from sae_dist.sae.topk import TopKSAE
from sae_dist.train.deepspeed_engine import DeepSpeedEngine
from sae_dist.train.trainer import TrainerConfig


@pytest.mark.parametrize("bad", [0, 3, 4, "2", True, None])
def test_bad_zero_stage_raises(bad):
    model = TopKSAE(engine_cfg())
    with pytest.raises(ValueError, match=r"trainer.zero_stage=.*use 1 .* or 2") as e:
        DeepSpeedEngine(model, LR, TrainerConfig(), None, zero_stage=bad)
    if bad == 3:
        assert "conflicts with the latent sharding" in str(e.value)


def test_non_float32_parameters_raise():
    model = TopKSAE(SAEConfig(d_in=16, d_sae=64, k=4, dtype="bfloat16"))
    with pytest.raises(ValueError, match="needs float32 parameters.*sae.dtype=float32"):
        DeepSpeedEngine(model, LR, TrainerConfig(), None, zero_stage=1)
