"""Model registry: `model.name` in the config → the flax module class.

Every model is called as model.apply(variables, edge_vectors, species, senders, receivers)
and returns unscaled per-atom energies [n_node]; the potential adds scale, shift and E0.
A model's hyperparameters are its dataclass fields; `build_model` fills them from the
`ModelConfig` fields of the same name, so adding a model means adding a line here.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from mpnn.models.mace import MACE
from mpnn.models.nequip import NequIP

MODELS: dict[str, type[nn.Module]] = {
    "nequip": NequIP,
    "mace": MACE,
}


def build_model(config, num_species: int, avg_num_neighbors: float) -> nn.Module:
    """Build the module named by `config.name` (a `ModelConfig`)."""
    if config.name not in MODELS:
        raise ValueError(f"unknown model.name {config.name!r}; available: {sorted(MODELS)}")
    cls = MODELS[config.name]
    hyperparameters = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(cls)
        if f.name not in ("name", "parent", "num_species", "avg_num_neighbors") and hasattr(config, f.name)
    }
    hyperparameters = {k: tuple(v) if isinstance(v, list) else v for k, v in hyperparameters.items()}
    return cls(num_species=num_species, avg_num_neighbors=avg_num_neighbors, **hyperparameters)
