"""Model registry: `model.name` in the config → a function building the flax module.

Every model is called as model.apply(variables, edge_vectors, species, senders, receivers)
and returns unscaled per-atom energies [n_node]; the potential adds scale, shift and E0.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn

from mpnn.models import nequip

MODELS: dict[str, Callable[..., nn.Module]] = {
    "nequip": nequip.build,
}


def build_model(config, num_species: int, avg_num_neighbors: float) -> nn.Module:
    """Build the module named by `config.name` (a `ModelConfig`)."""
    if config.name not in MODELS:
        raise ValueError(f"unknown model.name {config.name!r}; available: {sorted(MODELS)}")
    return MODELS[config.name](config, num_species, avg_num_neighbors)
