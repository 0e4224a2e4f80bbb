"""SchNet (Schütt et al., J. Chem. Phys. 148, 241722, 2018): invariant message passing
with continuous-filter convolutions.

Species embedding x⁰ → `num_layers` × interaction [x ← x + v, with
v_i = MLP( Σ_j x_j W x ⊙ filter(r_ij) )], the filter an MLP of Gaussian radial features
times a smooth cutoff → per-atom energy MLP. Distances only: no angles, no directions,
so it is the invariant two-body rung of the ladder.

Two departures from the paper, both to keep the physics every model here keeps:
- The cutoff is the polynomial envelope (p = `envelope_p`), zero with its first two
  derivatives at the cutoff, where later SchNet versions use the cosine cutoff (whose
  second derivative jumps): forces stay smooth as atoms cross it.
- The energy is readout(xᴸ) − readout(x⁰): without neighbors xᴸ = x⁰, so a lone atom has
  model energy exactly 0 and total energy E0. The subtracted term depends only on the
  element, a constant per element that E0 absorbs (`mpnn.nn.relative_to_isolated`).
  For the same reason the interaction's atom-wise layers have no biases.
"""

from __future__ import annotations

from dataclasses import dataclass
import flax.linen as nn
import jax
import jax.numpy as jnp

from mpnn.config import ModelConfig
from mpnn.nn import NodeOutputs, polynomial_envelope, relative_to_isolated, safe_norm, shifted_softplus
from mpnn.nn.radial import masked_edge_vectors


@dataclass
class SchNetConfig(ModelConfig):
    """SchNet hyperparameters; defaults follow the paper (64 features, 3 interactions,
    Gaussians every 0.1 Å with γ = 10 Å⁻², a 32-unit readout, shifted softplus)."""

    name: str = "schnet"
    num_layers: int = 3  # interaction blocks
    num_features: int = 64
    num_filters: int = 64  # width of the filter network
    num_radial: int = 50  # Gaussians with centres evenly spaced on [0, cutoff]
    gaussian_gamma: float = 10.0  # Å⁻²: exp(−γ (r − μ_k)²)
    envelope_p: int = 6
    readout_mlp: int = 32


def build(config: SchNetConfig, num_species: int, avg_num_neighbors: float) -> "SchNet":
    return SchNet(
        num_species=num_species,
        cutoff=config.cutoff,
        avg_num_neighbors=avg_num_neighbors,
        num_layers=config.num_layers,
        num_features=config.num_features,
        num_filters=config.num_filters,
        num_radial=config.num_radial,
        gaussian_gamma=config.gaussian_gamma,
        envelope_p=config.envelope_p,
        readout_mlp=config.readout_mlp,
        num_outputs=config.num_outputs,
    )


def gaussian_basis(lengths: jnp.ndarray, cutoff: float, num: int, gamma: float) -> jnp.ndarray:
    """exp(−γ (r − μ_k)²), μ_k evenly spaced on [0, cutoff]: [n_edge] Å → [n_edge, num]."""
    centres = jnp.linspace(0.0, cutoff, num, dtype=lengths.dtype)
    return jnp.exp(-gamma * (lengths[:, None] - centres) ** 2)


class Interaction(nn.Module):
    """v_i = f2out( Σ_j in2f(x_j) ⊙ W(r_ij) ) / avg_num_neighbors; W = filter MLP × envelope."""

    num_features: int
    num_filters: int
    avg_num_neighbors: float

    @nn.compact
    def __call__(self, x, edge_basis, edge_envelope, senders, receivers):
        filters = nn.Dense(self.num_filters, name="filter_0")(edge_basis)
        filters = nn.Dense(self.num_filters, name="filter_1")(shifted_softplus(filters))
        filters = filters * edge_envelope[:, None]  # 0 beyond the cutoff and on padding edges
        h = nn.Dense(self.num_filters, use_bias=False, name="in2f")(x)
        messages = h[senders] * filters
        y = jax.ops.segment_sum(messages, receivers, x.shape[0]) / self.avg_num_neighbors
        y = shifted_softplus(nn.Dense(self.num_features, use_bias=False, name="f2out_0")(y))
        return nn.Dense(self.num_features, use_bias=False, name="f2out_1")(y)


class SchNet(nn.Module):
    """Per-atom energies (unscaled) from edge vectors and species.

    Call: (edge_vectors [n_edge, 3] Å, species [n_node] int, senders [n_edge],
    receivers [n_edge], edge_mask [n_edge] bool) → [n_node] ([n_node, 2] with num_outputs=2).
    """

    num_species: int
    cutoff: float
    avg_num_neighbors: float = 1.0
    num_layers: int = 3
    num_features: int = 64
    num_filters: int = 64
    num_radial: int = 50
    gaussian_gamma: float = 10.0
    envelope_p: int = 6
    readout_mlp: int = 32
    num_outputs: int = 1

    @nn.compact
    def __call__(self, edge_vectors, species, senders, receivers, edge_mask) -> jnp.ndarray:
        lengths = safe_norm(masked_edge_vectors(edge_vectors, edge_mask))
        edge_basis = gaussian_basis(lengths, self.cutoff, self.num_radial, self.gaussian_gamma)
        edge_envelope = jnp.where(edge_mask, polynomial_envelope(lengths, self.cutoff, self.envelope_p), 0.0)
        x0 = nn.Embed(self.num_species, self.num_features, name="embedding")(species)
        x = x0
        for layer in range(self.num_layers):
            x = x + Interaction(self.num_features, self.num_filters, self.avg_num_neighbors, name=f"interaction_{layer}")(
                x, edge_basis, edge_envelope, senders, receivers
            )
        hidden, out = nn.Dense(self.readout_mlp, name="readout_0"), nn.Dense(self.num_outputs, name="readout_1")
        readout = lambda h: out(shifted_softplus(hidden(h)))
        outputs = relative_to_isolated(readout, x, x0)
        return NodeOutputs(self.num_species, name="outputs")(outputs, species)
