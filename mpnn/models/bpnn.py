"""Behler–Parrinello network (Behler & Parrinello, PRL 98, 146401, 2007; Behler, JCP 134,
074106, 2011): fixed atom-centred symmetry functions fed to one MLP per element.

Descriptor of atom i, resolved by neighbor elements (a; pairs a ≤ b for angles):
- radial G2_i^a(η, r_s) = Σ_{j∈a} exp(−η (r_ij − r_s)²) f_c(r_ij);
- angular G5_i^ab(η, ζ, λ) = 2^(1−ζ) Σ_{j∈a} Σ_{k∈b, k≠j} (1 + λ cos θ_jik)^ζ
  exp(−η (r_ij² + r_ik²)) f_c(r_ij) f_c(r_ik)  (G5: no r_jk factor).

Default parameters (overridable in the config): radial (η, r_s) on Imbalzano et al.'s
"shifted" grid (JCP 148, 241730, 2018: r_s,k = r_c / n^(k/n), η from neighbouring
spacings), or their "centered" grid (r_s = 0); angular η on the centered grid; ζ ∈ {1,
2, 4}, λ = ±1. The descriptor is standardised per element with mean and standard
deviation over the training set (`fit_statistics`, called by the training setup; kept
with the parameters, with gradients stopped), then fed to the element's MLP (tanh).

How the angular sum is computed: (1 + λ cos θ)^ζ is a polynomial of degree ζ in cos θ,
so a sum of Legendre polynomials P_l(cos θ), l ≤ ζ; by the addition theorem
Σ_{j,k} w_j w_k P_l(cos θ_jk) = |Σ_j w_j Y_l(r̂_ij)|² / (2l + 1) (component-normalised
real harmonics). The double sum over neighbor pairs becomes a sum over edges: no triplet
list (which grows as neighbors², padded), the same values to rounding (the j = k terms
are subtracted exactly: P_l(1) = 1). tests/test_models.py checks it against a plain
triplet loop.

An atom without neighbors has G = 0; its energy is MLP(Ĝ) − MLP(Ĝ(G = 0)), exactly 0
then (`mpnn.nn.relative_to_isolated`; the subtracted term is a per-element constant).
The cutoff function defaults to the polynomial envelope (zero with two derivatives at
r_c); `cutoff_function: cosine` gives the papers' ½(cos(πr/r_c) + 1), whose second
derivative jumps at the cutoff.
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
from mpnn.nn import NodeOutputs, polynomial_envelope, relative_to_isolated, safe_norm
from mpnn.nn.radial import masked_edge_vectors


@dataclass
class BPNNConfig(ModelConfig):
    """Behler–Parrinello hyperparameters (defaults: 8 shifted radial and 4 × 3 × 2 angular
    functions per element (pair), two hidden layers of 40 tanh units as in the 2007 paper)."""

    name: str = "bpnn"
    num_radial: int = 8  # G2 functions per neighbor element
    radial_grid: str = "shifted"  # "shifted" or "centered" (Imbalzano et al. 2018)
    radial_shifts: tuple[float, ...] | None = None  # Å; with radial_etas, replaces the grid
    radial_etas: tuple[float, ...] | None = None  # Å⁻²
    num_angular: int = 4  # angular η values (centered grid)
    angular_etas: tuple[float, ...] | None = None  # Å⁻²; replaces the grid
    zetas: tuple[int, ...] = (1, 2, 4)
    lambdas: tuple[float, ...] = (-1.0, 1.0)
    hidden: tuple[int, ...] = (40, 40)
    cutoff_function: str = "polynomial"  # "polynomial" (C², p = envelope_p) or "cosine"
    envelope_p: int = 6

    def __post_init__(self):
        super().__post_init__()
        where = "model (bpnn)"
        if self.radial_grid not in ("shifted", "centered"):
            raise ConfigError(f"{where}.radial_grid: {self.radial_grid!r} is not shifted or centered")
        if self.cutoff_function not in ("polynomial", "cosine"):
            raise ConfigError(f"{where}.cutoff_function: {self.cutoff_function!r} is not polynomial or cosine")
        if (self.radial_shifts is None) != (self.radial_etas is None):
            raise ConfigError(f"{where}: give radial_shifts and radial_etas together")
        if self.radial_shifts is not None and len(self.radial_shifts) != len(self.radial_etas):
            raise ConfigError(f"{where}: radial_shifts and radial_etas differ in length")
        if not all(isinstance(z, int) and z >= 1 for z in self.zetas):
            raise ConfigError(f"{where}.zetas: integers >= 1 needed, got {self.zetas}")
        if self.radial_shifts is None and self.num_radial < 2 or self.angular_etas is None and self.num_angular < 2:
            raise ConfigError(f"{where}: num_radial and num_angular must be >= 2")


def shifted_grid(cutoff: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Imbalzano et al.'s shifted grid: n centres r_s (ascending, Å) and widths η (Å⁻²)."""
    centres = cutoff / n ** (np.arange(n + 1) / n)  # r_c, ..., r_c / n (descending)
    etas = 1.0 / (centres[:-1] - centres[1:]) ** 2
    return centres[1:][::-1].copy(), etas[::-1].copy()


def centered_grid(cutoff: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Imbalzano et al.'s centered grid: r_s = 0, η_k = ((n−1)^(k/(n−1)) / r_c)², k < n."""
    k = np.arange(n)
    return np.zeros(n), ((n - 1) ** (k / (n - 1)) / cutoff) ** 2


def angular_legendre_coefficients(zetas: Sequence[int], lambdas: Sequence[float]) -> np.ndarray:
    """2^(1−ζ) (1 + λx)^ζ = Σ_l c_l P_l(x): [len(zetas) · len(lambdas), max ζ + 1]."""
    l_max = max(zetas)
    rows = []
    for zeta in zetas:
        for lam in lambdas:
            power = np.polynomial.Polynomial([1.0, lam]) ** zeta
            coefficients = np.polynomial.legendre.poly2leg(power.coef) * 2.0 ** (1 - zeta)
            rows.append(np.pad(coefficients, (0, l_max + 1 - len(coefficients))))
    return np.array(rows)


def cutoff_values(lengths: jnp.ndarray, cutoff: float, kind: str, p: int) -> jnp.ndarray:
    if kind == "cosine":
        return jnp.where(lengths < cutoff, 0.5 * (jnp.cos(jnp.pi * lengths / cutoff) + 1.0), 0.0)
    return polynomial_envelope(lengths, cutoff, p)


def symmetry_functions(
    edge_vectors: jnp.ndarray,
    edge_mask: jnp.ndarray,
    neighbor_species: jnp.ndarray,
    centres: jnp.ndarray,
    n_node: int,
    num_species: int,
    cutoff: float,
    radial_shifts: Sequence[float],
    radial_etas: Sequence[float],
    angular_etas: Sequence[float],
    zetas: Sequence[int],
    lambdas: Sequence[float],
    cutoff_function: str = "polynomial",
    envelope_p: int = 6,
) -> jnp.ndarray:
    """G2 and G5 of every atom: [n_node, S·K + S(S+1)/2 · M · Z] (S elements, K radial
    functions, M angular η, Z = (ζ, λ) pairs; element-pair channels a ≤ b).

    edge_vectors [n_edge, 3] Å from centre to neighbor (or the reverse: only even powers
    of directions enter); neighbor_species [n_edge] species index of the neighbor;
    centres [n_edge] node index of the centre atom; edge_mask [n_edge] bool.
    """
    vectors = masked_edge_vectors(edge_vectors, edge_mask)
    r = safe_norm(vectors)
    fc = jnp.where(edge_mask, cutoff_values(r, cutoff, cutoff_function, envelope_p), 0.0)
    onehot = jax.nn.one_hot(neighbor_species, num_species, dtype=r.dtype)  # [E, S]

    shifts, etas = jnp.asarray(radial_shifts, r.dtype), jnp.asarray(radial_etas, r.dtype)
    radial = jnp.exp(-etas * (r[:, None] - shifts) ** 2) * fc[:, None]  # [E, K]
    g2 = jax.ops.segment_sum(onehot[:, :, None] * radial[:, None, :], centres, n_node)  # [N, S, K]

    l_max = max(zetas)
    directions = vectors / r[:, None]
    harmonics = e3nn.spherical_harmonics(e3nn.Irreps.spherical_harmonics(l_max), directions, normalize=False, normalization="component")
    weights = jnp.exp(-jnp.asarray(angular_etas, r.dtype) * r[:, None] ** 2) * fc[:, None]  # [E, M]
    # ρ_i^a,m = Σ_{j∈a} w_m(r_ij) Y(r̂_ij): [N, S, M, (l_max+1)²]
    density = jax.ops.segment_sum(
        onehot[:, :, None, None] * weights[:, None, :, None] * harmonics.array[:, None, None, :], centres, n_node
    )
    self_pairs = jax.ops.segment_sum(onehot[:, :, None] * weights[:, None, :] ** 2, centres, n_node)  # [N, S, M]
    legendre_sums = []
    for l in range(l_max + 1):
        block = density[..., l * l : (l + 1) ** 2]
        pairs = jnp.einsum("namd,nbmd->nabm", block, block) / (2 * l + 1)
        legendre_sums.append(pairs - jnp.eye(num_species, dtype=r.dtype)[None, :, :, None] * self_pairs[:, :, None, :])
    legendre_sums = jnp.stack(legendre_sums, axis=-1)  # [N, S, S, M, l_max + 1]
    coefficients = jnp.asarray(angular_legendre_coefficients(zetas, lambdas), r.dtype)  # [Z, l_max + 1]
    g5 = jnp.einsum("nabml,zl->nabmz", legendre_sums, coefficients)
    a, b = np.triu_indices(num_species)
    g5 = g5[:, a, b]  # [N, S(S+1)/2, M, Z]
    return jnp.concatenate([g2.reshape(n_node, -1), g5.reshape(n_node, -1)], axis=1)


def build(config: BPNNConfig, num_species: int, avg_num_neighbors: float) -> "BPNN":
    if config.radial_shifts is not None:
        shifts, etas = np.asarray(config.radial_shifts), np.asarray(config.radial_etas)
    else:
        grid = shifted_grid if config.radial_grid == "shifted" else centered_grid
        shifts, etas = grid(config.cutoff, config.num_radial)
    angular = config.angular_etas if config.angular_etas is not None else centered_grid(config.cutoff, config.num_angular)[1]
    return BPNN(
        num_species=num_species,
        cutoff=config.cutoff,
        radial_shifts=tuple(float(x) for x in shifts),
        radial_etas=tuple(float(x) for x in etas),
        angular_etas=tuple(float(x) for x in angular),
        zetas=tuple(config.zetas),
        lambdas=tuple(config.lambdas),
        hidden=tuple(config.hidden),
        cutoff_function=config.cutoff_function,
        envelope_p=config.envelope_p,
        num_outputs=config.num_outputs,
        avg_num_neighbors=avg_num_neighbors,
    )


class ElementMLP(nn.Module):
    """One tanh MLP per element: x [n, F], species [n] → [n, num_outputs]. Every element's
    layer is applied to all rows and the row's own element picked (no weight gather)."""

    num_species: int
    hidden: Sequence[int]
    num_outputs: int

    @nn.compact
    def __call__(self, x, species):
        select = jax.nn.one_hot(species, self.num_species, dtype=x.dtype)
        widths = (*self.hidden, self.num_outputs)
        for k, width in enumerate(widths):
            scale = 1.0 / np.sqrt(x.shape[-1])
            w = self.param(f"w_{k}", nn.initializers.normal(1.0), (self.num_species, x.shape[-1], width), x.dtype)
            b = self.param(f"b_{k}", nn.initializers.zeros, (self.num_species, width), x.dtype)
            x = jnp.einsum("nf,sfh,ns->nh", x, w * scale, select) + select @ b
            if k < len(widths) - 1:
                x = jnp.tanh(x)
        return x


class BPNN(nn.Module):
    """Per-atom energies (unscaled) from edge vectors and species.

    Call: (edge_vectors [n_edge, 3] Å, species [n_node] int, senders [n_edge],
    receivers [n_edge], edge_mask [n_edge] bool) → [n_node] ([n_node, 2] with num_outputs=2).
    """

    num_species: int
    cutoff: float
    radial_shifts: Sequence[float]
    radial_etas: Sequence[float]
    angular_etas: Sequence[float]
    zetas: Sequence[int] = (1, 2, 4)
    lambdas: Sequence[float] = (-1.0, 1.0)
    hidden: Sequence[int] = (40, 40)
    cutoff_function: str = "polynomial"
    envelope_p: int = 6
    num_outputs: int = 1
    avg_num_neighbors: float = 1.0  # not used (descriptors are standardised instead); saved with every model

    def descriptors(self, edge_vectors, species, senders, receivers, edge_mask) -> jnp.ndarray:
        """Raw symmetry functions [n_node, F] (centre = receiver, neighbor = sender)."""
        return symmetry_functions(
            edge_vectors, edge_mask, species[senders], receivers, species.shape[0], self.num_species, self.cutoff,
            self.radial_shifts, self.radial_etas, self.angular_etas, self.zetas, self.lambdas,
            self.cutoff_function, self.envelope_p,
        )

    @nn.compact
    def __call__(self, edge_vectors, species, senders, receivers, edge_mask) -> jnp.ndarray:
        g = self.descriptors(edge_vectors, species, senders, receivers, edge_mask)
        n_features = g.shape[1]
        # Training-set statistics (fit_statistics); fixed, not trained.
        mean = jax.lax.stop_gradient(self.param("descriptor_mean", nn.initializers.zeros, (self.num_species, n_features), g.dtype))
        inv_std = jax.lax.stop_gradient(self.param("descriptor_inv_std", nn.initializers.ones, (self.num_species, n_features), g.dtype))
        standardised = (g - mean[species]) * inv_std[species]
        isolated = -mean[species] * inv_std[species]  # the descriptor of an atom without neighbors
        mlp = ElementMLP(self.num_species, tuple(self.hidden), self.num_outputs, name="element_mlp")
        both_species = jnp.concatenate([species, species])
        outputs = relative_to_isolated(lambda x: mlp(x, both_species), standardised, isolated)
        return NodeOutputs(self.num_species, name="outputs")(outputs, species)


def graph_descriptors(model: BPNN, params: dict, graph) -> jnp.ndarray:
    """Raw symmetry functions [n_node, F] of a (padded) graph, edge vectors from its
    positions, shifts and cell."""
    from mpnn.potential import edge_vectors

    nodes, edges = graph.nodes, graph.edges
    vectors = edge_vectors(nodes["positions"], graph.globals["cell"], edges["shifts"], graph.senders, graph.receivers, graph.n_edge)
    return model.apply(
        {"params": params}, vectors, nodes["species"], graph.senders, graph.receivers, edges["mask"], method=BPNN.descriptors
    )


def fit_statistics(model: BPNN, params: dict, graphs, batch_size: int = 64) -> dict:
    """params with descriptor_mean / descriptor_inv_std set to each element's mean and
    1/std over the atoms of `graphs` (numpy GraphsTuples, one frame each). Elements absent
    from the graphs, and features constant over an element's atoms, keep 0 and 1."""
    from mpnn.data.graphs import fixed_batch_shape, iterate_batches
    from mpnn.potential import cast_graph

    descriptors = jax.jit(lambda graph: graph_descriptors(model, params, graph))
    dtype = np.asarray(params["descriptor_mean"]).dtype
    n_features = params["descriptor_mean"].shape[1]
    count = np.zeros(model.num_species)
    total, squares = np.zeros((model.num_species, n_features)), np.zeros((model.num_species, n_features))
    shape = fixed_batch_shape(graphs, batch_size)
    for batch in iterate_batches(graphs, batch_size, shape=shape):
        g = np.asarray(descriptors(cast_graph(batch, dtype)), np.float64)
        mask, species = batch.nodes["mask"], batch.nodes["species"]
        for s in range(model.num_species):
            rows = g[mask & (species == s)]
            count[s] += len(rows)
            total[s] += rows.sum(0)
            squares[s] += (rows**2).sum(0)
    seen = count > 0
    mean = np.where(seen[:, None], total / np.maximum(count, 1)[:, None], 0.0)
    std = np.sqrt(np.maximum(squares / np.maximum(count, 1)[:, None] - mean**2, 0.0))
    inv_std = np.where(std > 1e-6 * (1.0 + np.abs(mean)), 1.0 / np.where(std > 0, std, 1.0), 1.0)
    return {**params, "descriptor_mean": jnp.asarray(mean, dtype), "descriptor_inv_std": jnp.asarray(inv_std, dtype)}
