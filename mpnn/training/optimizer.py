"""Optimiser: gradient clipping → Adam/AMSGrad with linear warm-up and cosine decay (or a
constant rate that the loop reduces on plateaus)."""

from __future__ import annotations

import optax

from mpnn.config import TrainConfig


def learning_rate_schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """Linear warm-up, then cosine decay to min_lr_ratio·lr over max_epochs ("cosine"), or
    constant ("plateau": the training loop scales it down when validation stalls)."""
    total = max(config.max_epochs * steps_per_epoch, 1)
    warmup = min(int(config.warmup_epochs * steps_per_epoch), total - 1)
    if config.schedule == "plateau":
        return optax.warmup_constant_schedule(config.lr * 0.01 if warmup > 0 else config.lr, config.lr, warmup)
    return optax.warmup_cosine_decay_schedule(
        init_value=config.lr * 0.01 if warmup > 0 else config.lr,
        peak_value=config.lr,
        warmup_steps=warmup,
        decay_steps=total,
        end_value=config.lr * config.min_lr_ratio,
    )


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(config, steps_per_epoch)
    if config.optimizer == "adam":
        scale = optax.scale_by_adam()
    elif config.optimizer == "amsgrad":
        scale = optax.scale_by_amsgrad()
    else:
        raise ValueError(f"train.optimizer must be 'adam' or 'amsgrad', got {config.optimizer!r}")
    parts = [optax.clip_by_global_norm(config.clip_norm), scale]
    if config.weight_decay > 0:
        parts.append(optax.add_decayed_weights(config.weight_decay))
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts)
