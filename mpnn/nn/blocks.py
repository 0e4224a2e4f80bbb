"""Equivariant building blocks over e3nn-jax `IrrepsArray`s.

Every block maps zero input features to zero output (no biases on anything that feeds
the energy), so an atom without neighbors has a model energy of exactly zero and its
total energy is its E0.
"""

from __future__ import annotations

from typing import Sequence

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp

from mpnn.nn.radial import masked_edge_vectors, radial_features, safe_norm
from mpnn.nn.tensor_product import channelwise_messages, is_channelwise, message_irreps


def edge_geometry(
    edge_vectors: jnp.ndarray, edge_mask: jnp.ndarray, cutoff: float, num_radial: int, envelope_p: int, l_max: int
) -> tuple[e3nn.IrrepsArray, jnp.ndarray]:
    """Spherical harmonics of edge directions (up to l_max) and radial features.

    edge_vectors [n_edge, 3] Å, edge_mask [n_edge] bool (False = padding) →
    (Y [n_edge, (l_max+1)²] as IrrepsArray, R [n_edge, num_radial]).
    """
    vectors = masked_edge_vectors(edge_vectors, edge_mask)
    lengths = safe_norm(vectors)
    directions = vectors / jnp.where(lengths > 0, lengths, 1.0)[:, None]
    sh = e3nn.spherical_harmonics(
        e3nn.Irreps.spherical_harmonics(l_max), directions, normalize=False, normalization="component"
    )
    # Padding edges carry no message. Otherwise a padding node sums hundreds of them, and
    # products of that sum (MACE's A^correlation) overflow float32 to inf, turning the
    # zero-weighted padding into NaN losses.
    radial = jnp.where(edge_mask[:, None], radial_features(lengths, cutoff, num_radial, envelope_p), 0.0)
    return sh, radial


def species_embedding(species: jnp.ndarray, num_species: int, num_features: int, name: str = "embedding"):
    """Learned per-element scalars: [n_node] → IrrepsArray [n_node, num_features x 0e].

    Initialised N(0, 1): the e3nn layers downstream are normalised for unit-variance
    inputs, so every layer starts at its designed scale whatever the number of elements.
    (flax's default, N(0, 1/num_features), started MACE's atomic basis 8× smaller at 64
    channels; on rMD17 ethanol at 10 epochs unit variance gave 8 % lower force errors over
    three seeds, mace-torch's 1/sqrt(num_species) 6 %; README, Accuracy.)
    """
    table = nn.Embed(num_species, num_features, embedding_init=nn.initializers.normal(stddev=1.0), name=name)
    return e3nn.IrrepsArray(f"{num_features}x0e", table(species))


class MessagePassing(nn.Module):
    """A_i = 1/avg_num_neighbors · Σ_{j→i} R(r_ij) ⊙ (h_j ⊗ Y(r̂_ij)).

    The tensor product of sender features with edge harmonics keeps the irreps in
    `irreps_out`; every output irrep (channel, path) gets its own weight from an MLP of
    the radial features (a "uvu" tensor product). No biases: zero radial features
    (beyond the cutoff) give zero messages.
    """

    irreps_out: e3nn.Irreps
    radial_mlp: Sequence[int]
    avg_num_neighbors: float

    @nn.compact
    def __call__(
        self,
        node_feats: e3nn.IrrepsArray,  # [n_node, irreps]
        edge_sh: e3nn.IrrepsArray,  # [n_edge, sh irreps]
        edge_radial: jnp.ndarray,  # [n_edge, num_radial]
        senders: jnp.ndarray,
        receivers: jnp.ndarray,
    ) -> e3nn.IrrepsArray:
        channelwise = is_channelwise(node_feats.irreps)  # the usual case: dense contractions, same result
        if channelwise:
            num_weights = message_irreps(node_feats.irreps, edge_sh.irreps, self.irreps_out).num_irreps
        else:
            messages = e3nn.tensor_product(node_feats[senders], edge_sh, filter_ir_out=e3nn.Irreps(self.irreps_out)).regroup()
            num_weights = messages.irreps.num_irreps
        weights = e3nn.flax.MultiLayerPerceptron(
            tuple(self.radial_mlp) + (num_weights,), act=jax.nn.silu, output_activation=False
        )(edge_radial)
        if channelwise:
            summed = channelwise_messages(node_feats, edge_sh, weights, senders, receivers, self.irreps_out)
        else:
            summed = e3nn.scatter_sum(messages * weights, dst=receivers, output_size=node_feats.shape[0])
        return summed / self.avg_num_neighbors


class ScalarReadout(nn.Module):
    """Scalars of the node features → per-node outputs via a small MLP (no biases):
    [n_node, num_outputs] (energy first, then e.g. a raw charge)."""

    hidden: int
    num_outputs: int = 1

    @nn.compact
    def __call__(self, node_feats: e3nn.IrrepsArray) -> jnp.ndarray:
        x = e3nn.flax.Linear(f"{self.hidden}x0e")(node_feats.filter(keep="0e"))
        x = e3nn.scalar_activation(x, [jax.nn.silu])
        return e3nn.flax.Linear(f"{self.num_outputs}x0e")(x).array


def relative_to_isolated(readout, features: jnp.ndarray, isolated: jnp.ndarray) -> jnp.ndarray:
    """readout(features) − readout(isolated), both rows through one call: an atom whose
    features equal those it has without neighbors gets exactly 0 (so its energy is E0).

    For models whose per-atom features are not zero without neighbors (SchNet's embedding,
    BPNN's normalised descriptors): the subtracted value depends only on the element, so
    it is a per-element constant that E0 absorbs. features, isolated: [n_node, F].
    """
    both = readout(jnp.concatenate([features, isolated]))
    return both[: features.shape[0]] - both[features.shape[0] :]


def shifted_softplus(x: jnp.ndarray) -> jnp.ndarray:
    """ln(1 + eˣ) − ln 2: SchNet's activation, zero at zero."""
    return jax.nn.softplus(x) - jnp.log(2.0).astype(x.dtype)


class NodeOutputs(nn.Module):
    """[n_node, num_outputs] readout sums → what a model returns: [n_node] energies when
    that is all, else [n_node, 2] (energy, raw charge). The raw charge gets a learned
    per-element offset (an electronegativity, initialised to 0): a lone atom's features
    are zero, so without it every isolated ion would have the same raw charge."""

    num_species: int

    @nn.compact
    def __call__(self, outputs: jnp.ndarray, species: jnp.ndarray) -> jnp.ndarray:
        if outputs.shape[1] == 1:
            return outputs[:, 0]
        offset = self.param("charge_offset", nn.initializers.zeros, (self.num_species,), outputs.dtype)
        return outputs.at[:, 1].add(offset[species])


# Up to this many elements SpeciesLinear computes every element's output densely; above,
# it gathers a weight matrix per node as e3nn-jax does (see SpeciesLinear).
DENSE_MAX_SPECIES = 16


class SpeciesLinear(nn.Module):
    """Equivariant linear map with one set of weights per element:
    `e3nn.flax.Linear(irreps_out, num_indexed_weights=num_species, force_irreps_out=True)`
    with the same parameters (names, shapes, initialisation: models saved with either
    load in the other), computed differently.

    e3nn-jax gathers a weight matrix for every node and multiplies node by node: 19 ms
    on one CPU core for 320 nodes of 128x0e+192x1o → 128x0e+64x1o (NequIP's
    linear_down), where one matrix shared by all nodes takes 0.34 ms. Here every
    element's matrix is applied to every node in one dense product and each node keeps
    its element's row: num_species × the shared cost, so up to DENSE_MAX_SPECIES
    elements (forward and backward break even near 32 there); beyond, e3nn-jax's gather.
    Figures: `python benchmarks/species_linear.py`. Call: (species [n_node] int,
    x [n_node, irreps]) → [n_node, irreps_out].
    """

    irreps_out: e3nn.Irreps
    num_species: int

    @nn.compact
    def __call__(self, species: jnp.ndarray, x: e3nn.IrrepsArray) -> e3nn.IrrepsArray:
        x = x.remove_zero_chunks().regroup()  # what e3nn.flax.Linear does first
        linear = e3nn.FunctionalLinear(x.irreps, e3nn.Irreps(self.irreps_out).simplify())
        weights = [
            self.param(
                f"w[{ins.i_in},{ins.i_out}] {linear.irreps_in[ins.i_in]},{linear.irreps_out[ins.i_out]}",
                nn.initializers.normal(stddev=ins.weight_std),
                (self.num_species,) + ins.path_shape,
                x.dtype,
            )
            for ins in linear.instructions
        ]
        if self.num_species > DENSE_MAX_SPECIES:
            return e3nn.utils.vmap(linear)([w[species] for w in weights], x)
        over_nodes = lambda w, x: e3nn.utils.vmap(lambda row: linear(w, row))(x)
        every = jax.vmap(over_nodes, in_axes=(0, None))(weights, x)  # [num_species, n_node, irreps_out]
        one_hot = jax.nn.one_hot(species, self.num_species, dtype=x.dtype)
        # Irreps that no path reaches stay marked as zeros, as e3nn-jax marks them (the next
        # e3nn Linear then has no weights for them); vmap over the weights drops the marks.
        reached = {ins.i_out for ins in linear.instructions if not x.zero_flags[ins.i_in]}
        zero_flags = tuple(i not in reached for i in range(len(linear.irreps_out)))
        return e3nn.IrrepsArray(every.irreps, jnp.einsum("sni,ns->ni", every.array, one_hot), zero_flags=zero_flags)
