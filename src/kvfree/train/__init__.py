"""Training: the Trainer, its config, optimizer groups and schedules."""

from kvfree.train.trainer import Batch, Schedule, TrainConfig, Trainer, lm_loss

__all__ = ["Batch", "Schedule", "TrainConfig", "Trainer", "lm_loss"]
