"""Allegro (Musaelian et al., Nat. Commun. 14, 579, 2023): strictly local equivariant
features on edges, with no message passing between atoms.

Every quantity lives on an ordered pair (i, j) within the cutoff:
- a scalar latent x_ij = MLP(one-hot Z_i, one-hot Z_j, Bessel(r_ij)) · u(r_ij);
- tensor features V_ij = w(x_ij) ⊗ Y(r̂_ij), `num_tensor_features` channels of l ≤ l_max.
Each layer builds atom i's environment Γ_i = Σ_k w(x_ik) Y(r̂_ik) / avg_num_neighbors,
takes the channel-wise tensor product V_ij ⊗ Γ_i, feeds its scalars into the latent
(x ← (x + u(r_ij) · MLP(x, scalars)) / √2) and mixes the rest linearly into the next
V_ij. The pair energy E_ij = MLP(x_ij) · u(r_ij) · σ(Z_i, Z_j), and E_i = Σ_j E_ij.

Nothing ever reads a neighbor's features, so atom i's energy depends only on atoms
within the cutoff of i: the receptive field is the cutoff itself (not layers × cutoff as
in NequIP or MACE), which is what lets a large system be split across devices by space.
An atom without neighbors has no pairs and model energy exactly 0; every pair's
contribution carries u(r_ij), zero with two derivatives at the cutoff.

Edge (i, j) here is (sender, receiver): r_ij = r_j − r_i is the graph's edge vector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mpnn.config import ConfigError, ModelConfig
from mpnn.models.nequip import hidden_irreps
from mpnn.nn import NodeOutputs, bessel_basis, polynomial_envelope, safe_norm
from mpnn.nn.radial import masked_edge_vectors


@dataclass
class AllegroConfig(ModelConfig):
    """Allegro hyperparameters; defaults follow the allegro package's example configuration
    (2 layers, 32 tensor channels, l ≤ 2 with both parities, two-body MLP 32-64-128,
    latent MLP 128, edge-energy MLP 32, 8 Bessel functions, p = 6)."""

    name: str = "allegro"
    num_layers: int = 2
    num_tensor_features: int = 32  # channels of the tensor track (env_embed_multiplicity)
    l_max: int = 2
    parity: bool = True  # also carry pseudo-tensors (0o, 1e, 2o) in the tensor track
    num_radial: int = 8
    envelope_p: int = 6
    two_body_mlp: tuple[int, ...] = (32, 64, 128)
    latent_mlp: tuple[int, ...] = (128,)
    edge_energy_mlp: tuple[int, ...] = (32,)

    def __post_init__(self):
        super().__post_init__()
        if not self.two_body_mlp or not self.latent_mlp or self.latent_mlp[-1] != self.two_body_mlp[-1]:
            raise ConfigError(
                f"model (allegro): latent_mlp must end at the latent width two_body_mlp[-1] (residual updates), got "
                f"{self.latent_mlp} and {self.two_body_mlp}"
            )


def build(config: AllegroConfig, num_species: int, avg_num_neighbors: float) -> "Allegro":
    return Allegro(
        num_species=num_species,
        cutoff=config.cutoff,
        avg_num_neighbors=avg_num_neighbors,
        num_layers=config.num_layers,
        num_tensor_features=config.num_tensor_features,
        l_max=config.l_max,
        parity=config.parity,
        num_radial=config.num_radial,
        envelope_p=config.envelope_p,
        two_body_mlp=tuple(config.two_body_mlp),
        latent_mlp=tuple(config.latent_mlp),
        edge_energy_mlp=tuple(config.edge_energy_mlp),
        num_outputs=config.num_outputs,
    )


def mlp(widths: Sequence[int], name: str, last_bias: bool = True):
    """Dense layers with SiLU between them (not after the last)."""
    layers = [nn.Dense(w, use_bias=last_bias or k < len(widths) - 1, name=f"{name}_{k}") for k, w in enumerate(widths)]

    def apply(x):
        for k, layer in enumerate(layers):
            x = layer(x)
            if k < len(layers) - 1:
                x = jax.nn.silu(x)
        return x

    return apply


class Allegro(nn.Module):
    """Per-atom energies (unscaled) from edge vectors and species.

    Call: (edge_vectors [n_edge, 3] Å, species [n_node] int, senders [n_edge],
    receivers [n_edge], edge_mask [n_edge] bool) → [n_node] ([n_node, 2] with num_outputs=2).
    """

    num_species: int
    cutoff: float
    avg_num_neighbors: float = 1.0
    num_layers: int = 2
    num_tensor_features: int = 32
    l_max: int = 2
    parity: bool = True
    num_radial: int = 8
    envelope_p: int = 6
    two_body_mlp: Sequence[int] = (32, 64, 128)
    latent_mlp: Sequence[int] = (128,)
    edge_energy_mlp: Sequence[int] = (32,)
    num_outputs: int = 1

    @nn.compact
    def __call__(self, edge_vectors, species, senders, receivers, edge_mask) -> jnp.ndarray:
        n_node, channels = species.shape[0], self.num_tensor_features
        vectors = masked_edge_vectors(edge_vectors, edge_mask)
        lengths = safe_norm(vectors)
        envelope = jnp.where(edge_mask, polynomial_envelope(lengths, self.cutoff, self.envelope_p), 0.0)[:, None]
        sh = e3nn.spherical_harmonics(
            e3nn.Irreps.spherical_harmonics(self.l_max), vectors / lengths[:, None], normalize=False, normalization="component"
        )
        z_centre = jax.nn.one_hot(species[senders], self.num_species, dtype=vectors.dtype)
        z_neighbor = jax.nn.one_hot(species[receivers], self.num_species, dtype=vectors.dtype)
        bessel = bessel_basis(lengths, self.cutoff, self.num_radial)

        latent = mlp(self.two_body_mlp, "two_body")(jnp.concatenate([z_centre, z_neighbor, bessel], axis=1)) * envelope
        weights = nn.Dense(channels, use_bias=False, name="tensor_embedding")(latent)
        tensors = e3nn.IrrepsArray(sh.irreps, weights[:, :, None] * sh.array[:, None, :])  # [E, C, sh]
        track = hidden_irreps(1, self.l_max, self.parity)
        for layer in range(self.num_layers):
            last = layer == self.num_layers - 1
            env_weights = nn.Dense(channels, use_bias=False, name=f"env_embedding_{layer}")(latent)
            environment = jax.ops.segment_sum(env_weights[:, :, None] * sh.array[:, None, :], senders, n_node)
            environment = e3nn.IrrepsArray(sh.irreps, environment[senders] / self.avg_num_neighbors)  # Γ_i on pair (i, j)
            products = e3nn.tensor_product(tensors, environment, filter_ir_out="0e" if last else track + "0e")
            products = products.regroup()  # [E, C, paths]
            scalars = products.filter(keep="0e").array.reshape(products.shape[0], -1)
            update = mlp(self.latent_mlp, f"latent_{layer}")(jnp.concatenate([latent, scalars], axis=1))
            latent = (latent + envelope * update) / np.sqrt(2.0)
            if not last:
                mixed = e3nn.flax.Linear(channels * track, force_irreps_out=True, name=f"tensor_mix_{layer}")(products.axis_to_mul())
                tensors = mixed.mul_to_axis(channels)
        pair = mlp((*self.edge_energy_mlp, self.num_outputs), "edge_energy", last_bias=False)(latent) * envelope
        pair_scale = self.param("pair_scale", nn.initializers.ones, (self.num_species, self.num_species), pair.dtype)
        pair = pair * pair_scale[species[senders], species[receivers]][:, None]
        outputs = jax.ops.segment_sum(pair, senders, n_node)
        return NodeOutputs(self.num_species, name="outputs")(outputs, species)
