"""Optimiser: gradient clipping → Adam/AMSGrad with a linear warm-up, then a constant rate
that the loop reduces on validation plateaus (the default) or a cosine decay."""

from __future__ import annotations

import dataclasses

import jax
import optax

from mpnn.config import TrainConfig
from mpnn.models import FIXED_PARAMETERS


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


def frozen_labels(params, prefixes) -> dict:
    """"frozen"/"trained" per parameter leaf: frozen where its path ("layer_0/linear_up/w")
    starts with one of `prefixes`. Unknown prefixes are an error listing the top level."""
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if any(_path(path).startswith(p) for p in prefixes) else "trained", params
    )
    paths = [_path(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    unknown = [p for p in prefixes if not any(x.startswith(p) for x in paths)]
    if unknown:
        raise ValueError(f"train.freeze: {unknown} match no parameter; top level: {sorted(params)}")
    return labels


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def make_optimizer(config: TrainConfig, steps_per_epoch: int, params=None) -> optax.GradientTransformation:
    """The optimiser; with train.freeze (and `params` to label), frozen leaves get no update."""
    if config.freeze:
        inner = make_optimizer(dataclasses.replace(config, freeze=()), steps_per_epoch)
        return optax.multi_transform({"trained": inner, "frozen": optax.set_to_zero()}, frozen_labels(params, config.freeze))
    schedule = learning_rate_schedule(config, steps_per_epoch)
    scale = optax.scale_by_adam() if config.optimizer == "adam" else optax.scale_by_amsgrad()  # checked by TrainConfig
    parts = [optax.clip_by_global_norm(config.clip_norm), scale]
    if config.weight_decay > 0:
        # Not the data statistics some models keep among their parameters (gradient-free constants).
        decayed = lambda params: jax.tree_util.tree_map_with_path(
            lambda path, _: getattr(path[-1], "key", None) not in FIXED_PARAMETERS, params
        )
        parts.append(optax.add_decayed_weights(config.weight_decay, mask=decayed))
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts)
