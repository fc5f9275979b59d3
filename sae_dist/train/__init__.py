"""sae_dist.train: the TopK SAE trainer (loop, DCP checkpoints, logging, LR rule).

`train` (the loop, which reads activation stores: zarr) is imported on first use, so that the training
step's pieces (`TrainerConfig`, `sae_dist.train.engine`) import without the store's dependencies, as
`python -m sae_dist.bench` needs on a machine that has only PyTorch.
"""

from sae_dist.train.config import TrainerConfig
from sae_dist.train.engine import default_lr, lr_at_step

__all__ = ["TrainerConfig", "train", "default_lr", "lr_at_step"]


def __getattr__(name: str):
    if name == "train":
        from sae_dist.train.trainer import train

        return train
    raise AttributeError(f"module 'sae_dist.train' has no attribute {name!r}")
