"""MACE (Batatia et al., NeurIPS 2022): higher body order through symmetric contraction.

Species embedding → `num_layers` × [linear_up → edge tensor product weighted by a radial
MLP, summed over neighbors / avg_num_neighbors (the atomic basis A) → linear →
element-dependent symmetric contraction of A up to power `correlation` (the product basis
B, body order correlation + 1) → linear (+ element-dependent self-connection after the
first layer)] → one energy readout per layer, summed.

Irreps: the edge harmonics and A carry l = 0..l_max per channel; node features between
layers carry l = 0..max_L; the last layer keeps only scalars (nothing reads anything else).
Readouts: a linear map to 0e after every layer but the last, a small MLP after the last.

An atom without neighbors gets A = 0, hence B = 0 (no constant term), no self-connection in
the first layer and no biases: its model energy is exactly zero and its energy is E0. With
`first_self_connection` (the MACE paper's residual first block) a lone atom's features are
an element-only constant; the model's output for each element alone is then subtracted
(computed on one extra edgeless node per element), so a lone atom's energy stays E0.
Everything is polynomial in A or linear, so outputs vary smoothly as the last neighbor
leaves the cutoff.

Differences from the reference PyTorch code (mace-torch 0.3.16): `mace_run_train` builds
its first layer with an element-dependent linear map of A (RealAgnosticInteractionBlock's
`skip_tp`), which ours leaves out (no gain measured, see benchmarks/mace_torch_params.py);
the MACE paper's residual first block adds an element-only self-connection instead, which
`first_self_connection: true` adds (with the lone-atom subtraction above); and the
symmetric contraction keeps one weight per independent symmetric coupling where mace-torch
also keeps redundant permuted paths (same functions, fewer weights). Every other block
matches it weight for weight. The species embedding starts at unit variance (mace-torch's
at variance 1/num_species; see nn.species_embedding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import e3nn_jax as e3nn
import flax.linen as nn
import jax.numpy as jnp

from mpnn.config import ModelConfig
from mpnn.models.nequip import hidden_irreps
from mpnn.nn import MessagePassing, NodeOutputs, ScalarReadout, SpeciesLinear, edge_geometry, species_embedding
from mpnn.nn.symmetric_contraction import SymmetricContraction


@dataclass
class MACEConfig(ModelConfig):
    """MACE hyperparameters; defaults are mace-torch's (2 interactions, 128x0e + 128x1o
    hidden features, l ≤ 3 harmonics, correlation 3, 8 Bessel functions, p = 5 envelope,
    radial MLP 3 × 64, readout MLP 16)."""

    name: str = "mace"
    num_layers: int = 2  # interactions
    num_features: int = 128  # channels
    l_max: int = 3  # edge spherical harmonics and atomic basis A
    max_L: int = 1  # node features between layers
    correlation: int = 3  # highest power of A: body order correlation + 1
    parity: bool = False  # also carry pseudo-tensor features
    num_radial: int = 8
    envelope_p: int = 5
    radial_mlp: tuple[int, ...] = (64, 64, 64)
    readout_mlp: int = 16
    # the MACE paper's residual first block: an element-only self-connection in layer 0
    # too (num_species × num_features² more weights).
    first_self_connection: bool = False


def build(config: MACEConfig, num_species: int, avg_num_neighbors: float) -> "MACE":
    return MACE(
        num_species=num_species,
        cutoff=config.cutoff,
        avg_num_neighbors=avg_num_neighbors,
        num_layers=config.num_layers,
        num_features=config.num_features,
        l_max=config.l_max,
        max_L=config.max_L,
        correlation=config.correlation,
        parity=config.parity,
        num_radial=config.num_radial,
        envelope_p=config.envelope_p,
        radial_mlp=tuple(config.radial_mlp),
        readout_mlp=config.readout_mlp,
        num_outputs=config.num_outputs,
        first_self_connection=config.first_self_connection,
    )


class MACELayer(nn.Module):
    """One interaction + product layer.

    Call: (node_feats IrrepsArray [n_node, irreps_in], species [n_node], edge_sh [n_edge, sh],
    edge_radial [n_edge, num_radial], senders, receivers) → IrrepsArray [n_node, num_features x irreps_out].

    interaction_irreps / irreps_out are per channel (multiplicity 1), e.g. "0e+1o+2e+3o" / "0e+1o".
    """

    interaction_irreps: e3nn.Irreps
    irreps_out: e3nn.Irreps
    num_features: int
    num_species: int
    correlation: int
    radial_mlp: Sequence[int]
    avg_num_neighbors: float
    self_connection: bool

    @nn.compact
    def __call__(
        self,
        node_feats: e3nn.IrrepsArray,
        species: jnp.ndarray,
        edge_sh: e3nn.IrrepsArray,
        edge_radial: jnp.ndarray,
        senders: jnp.ndarray,
        receivers: jnp.ndarray,
    ) -> e3nn.IrrepsArray:
        interaction = e3nn.Irreps(self.interaction_irreps)
        target = self.num_features * e3nn.Irreps(self.irreps_out)
        h = e3nn.flax.Linear(node_feats.irreps, name="linear_up")(node_feats)
        # Atomic basis A: [n_node, C x interaction irreps]
        a = MessagePassing(interaction, self.radial_mlp, self.avg_num_neighbors)(
            h, edge_sh, edge_radial, senders, receivers
        )
        a = e3nn.flax.Linear(self.num_features * interaction, force_irreps_out=True, name="linear")(a)
        # Product basis B per channel: [n_node, C, d] → [n_node, C, irreps_out.dim]
        b = SymmetricContraction(self.irreps_out, self.correlation, self.num_species, name="symmetric_contraction")(
            a.mul_to_axis(self.num_features), species
        )
        out = e3nn.flax.Linear(target, force_irreps_out=True, name="linear_down")(b.axis_to_mul())
        if self.self_connection:
            out = out + SpeciesLinear(target, self.num_species, name="self_connection")(species, node_feats)
        return out


class MACE(nn.Module):
    """Per-atom energies (unscaled) from edge vectors and species.

    Call: (edge_vectors [n_edge, 3] Å, species [n_node] int, senders [n_edge],
    receivers [n_edge], edge_mask [n_edge] bool) → [n_node] ([n_node, 2] with num_outputs=2).
    """

    num_species: int
    cutoff: float
    avg_num_neighbors: float = 1.0
    num_layers: int = 2
    num_features: int = 32
    l_max: int = 3  # edge spherical harmonics and atomic basis A
    max_L: int = 1  # node features between layers
    correlation: int = 3
    parity: bool = False
    num_radial: int = 8
    envelope_p: int = 5
    radial_mlp: Sequence[int] = (64, 64, 64)
    readout_mlp: int = 16
    num_outputs: int = 1  # 2: energy and raw charge (model.long_range=electrostatics)
    first_self_connection: bool = False

    @nn.compact
    def __call__(self, edge_vectors, species, senders, receivers, edge_mask) -> jnp.ndarray:
        n_node = species.shape[0]
        if self.first_self_connection:
            # One edgeless node per element after the real ones: what the model gives each
            # element alone, subtracted below (nn.relative_to_isolated's idea, carried
            # through every layer since a lone atom's features change from layer to layer).
            species = jnp.concatenate([species, jnp.arange(self.num_species, dtype=species.dtype)])
        edge_sh, edge_radial = edge_geometry(
            edge_vectors, edge_mask, self.cutoff, self.num_radial, self.envelope_p, self.l_max
        )
        node_feats = species_embedding(species, self.num_species, self.num_features)
        interaction = hidden_irreps(1, self.l_max, self.parity)
        outputs = jnp.zeros((species.shape[0], self.num_outputs), dtype=edge_vectors.dtype)
        for layer in range(self.num_layers):
            last = layer == self.num_layers - 1
            node_feats = MACELayer(
                interaction_irreps=interaction,
                irreps_out=e3nn.Irreps("0e") if last else hidden_irreps(1, self.max_L, self.parity),
                num_features=self.num_features,
                num_species=self.num_species,
                correlation=self.correlation,
                radial_mlp=tuple(self.radial_mlp),
                avg_num_neighbors=self.avg_num_neighbors,
                self_connection=layer > 0 or self.first_self_connection,
                name=f"layer_{layer}",
            )(node_feats, species, edge_sh, edge_radial, senders, receivers)
            if last:
                outputs = outputs + ScalarReadout(self.readout_mlp, self.num_outputs, name="readout")(node_feats)
            else:
                outputs = outputs + e3nn.flax.Linear(f"{self.num_outputs}x0e", name=f"readout_{layer}")(node_feats).array
        if self.first_self_connection:
            species = species[:n_node]
            outputs = outputs[:n_node] - outputs[n_node:][species]
        return NodeOutputs(self.num_species, name="outputs")(outputs, species)

