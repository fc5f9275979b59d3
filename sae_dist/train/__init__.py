"""sae_dist.train: the TopK SAE trainer (loop, DCP checkpoints, logging, LR rule)."""

from sae_dist.train.engine import default_lr, lr_at_step
from sae_dist.train.trainer import TrainerConfig, train

__all__ = ["TrainerConfig", "train", "default_lr", "lr_at_step"]
