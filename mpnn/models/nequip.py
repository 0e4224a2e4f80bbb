"""NequIP (Batzner et al., Nat. Commun. 13, 2453, 2022).

Species embedding → `num_layers` × [linear → edge tensor product weighted by a radial MLP
→ neighbor sum / avg_num_neighbors → element-dependent linear (+ element-dependent
self-connection after the first layer) → gate] → scalar readout per atom.

The first layer has no self-connection on purpose: then an atom without neighbors gets
zero features and zero model energy, so its energy is exactly E0, and the output varies
smoothly as the last neighbor leaves the cutoff.
"""

from __future__ import annotations

from typing import Sequence

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp

from mpnn.nn import MessagePassing, ScalarReadout, edge_geometry, species_embedding


def hidden_irreps(num_features: int, l_max: int, parity: bool) -> e3nn.Irreps:
    """Natural-parity irreps 0e + 1o + 2e ...; with `parity`, also 0o + 1e + 2o ... (pseudo-tensors)."""
    irreps = []
    for l in range(l_max + 1):
        natural = "e" if l % 2 == 0 else "o"
        irreps.append(f"{num_features}x{l}{natural}")
        if parity:
            irreps.append(f"{num_features}x{l}{'o' if natural == 'e' else 'e'}")
    return e3nn.Irreps("+".join(irreps))


def gated_irreps(irreps: e3nn.Irreps) -> e3nn.Irreps:
    """The input irreps `e3nn.gate` needs to produce `irreps`: one extra gate scalar per non-scalar irrep."""
    scalars = e3nn.Irreps([(mul, ir) for mul, ir in irreps if ir.l == 0])
    nonscalars = e3nn.Irreps([(mul, ir) for mul, ir in irreps if ir.l > 0])
    gates = e3nn.Irreps(f"{nonscalars.num_irreps}x0e") if nonscalars.num_irreps else e3nn.Irreps("")
    return (scalars + gates + nonscalars).regroup()


class NequIPLayer(nn.Module):
    irreps_out: e3nn.Irreps
    num_species: int
    radial_mlp: Sequence[int]
    avg_num_neighbors: float
    self_connection: bool

    @nn.compact
    def __call__(self, node_feats, species, edge_sh, edge_radial, senders, receivers):
        target = gated_irreps(e3nn.Irreps(self.irreps_out))
        h = e3nn.flax.Linear(node_feats.irreps, name="linear_up")(node_feats)
        aggregated = MessagePassing(target, self.radial_mlp, self.avg_num_neighbors)(
            h, edge_sh, edge_radial, senders, receivers
        )
        out = e3nn.flax.Linear(target, num_indexed_weights=self.num_species, force_irreps_out=True, name="linear_down")(
            species, aggregated
        )
        if self.self_connection:
            out = out + e3nn.flax.Linear(
                target, num_indexed_weights=self.num_species, force_irreps_out=True, name="self_connection"
            )(species, node_feats)
        return e3nn.gate(out, even_act=jax.nn.silu, odd_act=jnp.tanh, even_gate_act=jax.nn.sigmoid)


class NequIP(nn.Module):
    """Per-atom energies (unscaled, eV-less) from edge vectors and species.

    Call: (edge_vectors [n_edge, 3] Å, species [n_node] int, senders [n_edge],
    receivers [n_edge]) → [n_node].
    """

    num_species: int
    cutoff: float
    avg_num_neighbors: float = 1.0
    num_layers: int = 3
    num_features: int = 32
    l_max: int = 2
    parity: bool = False
    num_radial: int = 8
    envelope_p: int = 6
    radial_mlp: Sequence[int] = (64, 64)
    readout_mlp: int = 16

    @nn.compact
    def __call__(self, edge_vectors, species, senders, receivers) -> jnp.ndarray:
        edge_sh, edge_radial = edge_geometry(edge_vectors, self.cutoff, self.num_radial, self.envelope_p, self.l_max)
        node_feats = species_embedding(species, self.num_species, self.num_features)
        irreps = hidden_irreps(self.num_features, self.l_max, self.parity)
        for layer in range(self.num_layers):
            node_feats = NequIPLayer(
                irreps_out=irreps,
                num_species=self.num_species,
                radial_mlp=tuple(self.radial_mlp),
                avg_num_neighbors=self.avg_num_neighbors,
                self_connection=layer > 0,
                name=f"layer_{layer}",
            )(node_feats, species, edge_sh, edge_radial, senders, receivers)
        return ScalarReadout(self.readout_mlp, name="readout")(node_feats)

