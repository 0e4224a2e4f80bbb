"""Model registry: `model.name` in the config → the model's config class and builder.

Every model is a flax module called as

    model.apply(variables, edge_vectors [n_edge, 3], species [n_node], senders [n_edge],
                receivers [n_edge], edge_mask [n_edge] bool) → per-atom energies [n_node]

(unscaled; the potential adds scale, shift, E0 and the other energy terms). A model
built with `num_outputs=2` (`config.num_outputs`, set by `model.long_range:
electrostatics`) returns [n_node, 2]: the energy and a raw charge per atom, both read
from invariant features (`mpnn.nn.ScalarReadout(hidden, num_outputs)`). Each model
file holds its module, its config dataclass (a `mpnn.config.ModelConfig` with the
model's own fields and its paper's defaults) and `build(config, num_species,
avg_num_neighbors)`. Adding a model means adding a file and a line here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import flax.linen as nn

from mpnn.models import allegro, bpnn, mace, nequip, schnet


@dataclass(frozen=True)
class ModelEntry:
    config: type  # the model's config dataclass
    build: Callable[..., nn.Module]  # build(config, num_species, avg_num_neighbors) → flax module
    # fit_statistics(module, params, graphs) → params: data-dependent constants set once
    # from the training graphs before training (BPNN's descriptor standardisation).
    fit_statistics: Callable | None = None


# Parameters that hold data statistics, not learned weights (set by fit_statistics, gradients
# stopped in the model): weight decay leaves them alone.
FIXED_PARAMETERS = ("descriptor_mean", "descriptor_inv_std")

MODELS: dict[str, ModelEntry] = {
    "nequip": ModelEntry(nequip.NequIPConfig, nequip.build),
    "mace": ModelEntry(mace.MACEConfig, mace.build),
    "bpnn": ModelEntry(bpnn.BPNNConfig, bpnn.build, bpnn.fit_statistics),
    "schnet": ModelEntry(schnet.SchNetConfig, schnet.build),
    "allegro": ModelEntry(allegro.AllegroConfig, allegro.build),
}


def build_model(config, num_species: int, avg_num_neighbors: float) -> nn.Module:
    """The flax module for a model config (`config.name` picks the model)."""
    if config.name not in MODELS:
        raise ValueError(f"unknown model.name {config.name!r}; available: {sorted(MODELS)}")
    entry = MODELS[config.name]
    if not isinstance(config, entry.config):
        raise TypeError(f"model {config.name!r} needs a {entry.config.__name__}, got {type(config).__name__}")
    return entry.build(config, num_species, avg_num_neighbors)
