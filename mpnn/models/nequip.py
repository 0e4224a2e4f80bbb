"""NequIP (Batzner et al., Nat. Commun. 13, 2453, 2022).

Species embedding → `num_layers` × [linear → edge tensor product weighted by a radial MLP
→ neighbor sum / avg_num_neighbors → element-dependent linear (+ element-dependent
self-connection after the first layer) → gate] → scalar readout per atom.

The first layer has no self-connection on purpose: then an atom without neighbors gets
zero features and zero model energy, so its energy is exactly E0, and the output varies
smoothly as the last neighbor leaves the cutoff.

Hidden features carry l ≤ `hidden_l_max` (default: `l_max`), edge harmonics l ≤ `l_max`:
the published "64x0e + 64x1o with l ≤ 2 harmonics" setting is num_features=64,
hidden_l_max=1, l_max=2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp

from mpnn.config import ModelConfig
from mpnn.nn import MessagePassing, NodeOutputs, ScalarReadout, SpeciesLinear, edge_geometry, species_embedding


def hidden_irreps(num_features: int, l_max: int, parity: bool) -> e3nn.Irreps:
    """Natural-parity irreps 0e + 1o + 2e ...; with `parity`, also 0o + 1e + 2o ... (pseudo-tensors)."""
    irreps = []
    for l in range(l_max + 1):
        natural = "e" if l % 2 == 0 else "o"
        irreps.append(f"{num_features}x{l}{natural}")
        if parity:
            irreps.append(f"{num_features}x{l}{'o' if natural == 'e' else 'e'}")
    return e3nn.Irreps("+".join(irreps))


def gated_irreps(irreps: e3nn.Irreps, pseudoscalar_gates: bool = False) -> e3nn.Irreps:
    """The input irreps `e3nn.gate` needs to produce `irreps`: one extra even gate scalar
    per non-scalar irrep, after the activated scalars.

    `e3nn.gate` takes the *last* scalars as gates, so the order matters: sorting (regroup)
    would move the 0o scalars behind the 0e gates and make them gates, which flips the
    parity of what they gate (0o·1o = 1e) and drops the 1o features. `pseudoscalar_gates`
    rebuilds that old order, only to load models saved with it (format ≤ 2 with parity).
    """
    scalars = e3nn.Irreps([(mul, ir) for mul, ir in irreps if ir.l == 0])
    nonscalars = e3nn.Irreps([(mul, ir) for mul, ir in irreps if ir.l > 0])
    gates = e3nn.Irreps(f"{nonscalars.num_irreps}x0e") if nonscalars.num_irreps else e3nn.Irreps("")
    if pseudoscalar_gates:
        return (scalars + gates + nonscalars).regroup()
    return (scalars + gates + nonscalars).simplify()  # merges 32x0e+32x0e without reordering


@dataclass
class NequIPConfig(ModelConfig):
    """NequIP hyperparameters. Defaults follow the nequip package's example configuration
    (4 interaction blocks, 32 features, l ≤ 1 hidden features with both parities, 8 Bessel
    functions, polynomial cutoff p = 6, radial MLP 2 × 64)."""

    name: str = "nequip"
    num_layers: int = 4
    num_features: int = 32  # channels per irrep in hidden layers
    l_max: int = 1  # edge spherical harmonics
    hidden_l_max: int | None = None  # hidden features; None = l_max
    parity: bool = True  # also carry pseudo-tensor features (0o, 1e, 2o, ...) in hidden layers
    num_radial: int = 8  # Bessel functions
    envelope_p: int = 6  # polynomial envelope exponent
    radial_mlp: tuple[int, ...] = (64, 64)
    readout_mlp: int = 16  # hidden width of the scalar readout MLP
    # Set by mpnn.load for models saved before format 3 with parity: true, whose layers used
    # the 0o scalars as gates (see gated_irreps); never needed for a new model.
    pseudoscalar_gates: bool = False


def build(config: NequIPConfig, num_species: int, avg_num_neighbors: float) -> "NequIP":
    return NequIP(
        num_species=num_species,
        cutoff=config.cutoff,
        avg_num_neighbors=avg_num_neighbors,
        num_layers=config.num_layers,
        num_features=config.num_features,
        l_max=config.l_max,
        hidden_l_max=config.hidden_l_max,
        parity=config.parity,
        num_radial=config.num_radial,
        envelope_p=config.envelope_p,
        radial_mlp=tuple(config.radial_mlp),
        readout_mlp=config.readout_mlp,
        pseudoscalar_gates=config.pseudoscalar_gates,
        num_outputs=config.num_outputs,
    )


class NequIPLayer(nn.Module):
    irreps_out: e3nn.Irreps
    num_species: int
    radial_mlp: Sequence[int]
    avg_num_neighbors: float
    self_connection: bool
    pseudoscalar_gates: bool = False

    @nn.compact
    def __call__(self, node_feats, species, edge_sh, edge_radial, senders, receivers):
        target = gated_irreps(e3nn.Irreps(self.irreps_out), self.pseudoscalar_gates)
        h = e3nn.flax.Linear(node_feats.irreps, name="linear_up")(node_feats)
        aggregated = MessagePassing(target, self.radial_mlp, self.avg_num_neighbors)(
            h, edge_sh, edge_radial, senders, receivers
        )
        out = SpeciesLinear(target, self.num_species, name="linear_down")(species, aggregated)
        if self.self_connection:
            out = out + SpeciesLinear(target, self.num_species, name="self_connection")(species, node_feats)
        return e3nn.gate(out, even_act=jax.nn.silu, odd_act=jnp.tanh, even_gate_act=jax.nn.sigmoid)


class NequIP(nn.Module):
    """Per-atom energies (unscaled, eV-less) from edge vectors and species.

    Call: (edge_vectors [n_edge, 3] Å, species [n_node] int, senders [n_edge],
    receivers [n_edge], edge_mask [n_edge] bool) → [n_node] ([n_node, 2] with num_outputs=2).
    """

    num_species: int
    cutoff: float
    avg_num_neighbors: float = 1.0
    num_layers: int = 3
    num_features: int = 32
    l_max: int = 2
    hidden_l_max: int | None = None
    parity: bool = False
    num_radial: int = 8
    envelope_p: int = 6
    radial_mlp: Sequence[int] = (64, 64)
    readout_mlp: int = 16
    pseudoscalar_gates: bool = False
    num_outputs: int = 1  # 2: energy and raw charge (model.long_range=electrostatics)

    @nn.compact
    def __call__(self, edge_vectors, species, senders, receivers, edge_mask) -> jnp.ndarray:
        edge_sh, edge_radial = edge_geometry(
            edge_vectors, edge_mask, self.cutoff, self.num_radial, self.envelope_p, self.l_max
        )
        node_feats = species_embedding(species, self.num_species, self.num_features)
        hidden_l_max = self.l_max if self.hidden_l_max is None else self.hidden_l_max
        irreps = hidden_irreps(self.num_features, hidden_l_max, self.parity)
        for layer in range(self.num_layers):
            node_feats = NequIPLayer(
                irreps_out=irreps,
                num_species=self.num_species,
                radial_mlp=tuple(self.radial_mlp),
                avg_num_neighbors=self.avg_num_neighbors,
                self_connection=layer > 0,
                pseudoscalar_gates=self.pseudoscalar_gates,
                name=f"layer_{layer}",
            )(node_feats, species, edge_sh, edge_radial, senders, receivers)
        outputs = ScalarReadout(self.readout_mlp, self.num_outputs, name="readout")(node_feats)
        return NodeOutputs(self.num_species, name="outputs")(outputs, species)

