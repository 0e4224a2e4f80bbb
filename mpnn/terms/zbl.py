"""ZBL screened nuclear repulsion, a short-range safety net for learned potentials.

The Ziegler-Biersack-Littmark (1985) "universal" potential is the bare Coulomb repulsion of two
nuclei, Z_i Z_j e²/(4πε0 r), damped by a screening function φ(r/a) fitted to many atom pairs:

    E(r) = Z_i Z_j · 14.399645 eV·Å / r · φ(r / a),    a = 0.8854 a0 / (Z_i^0.23 + Z_j^0.23)

with a0 the Bohr radius. Units: r in Å, energies in eV, Z are atomic numbers.

Why: a learned model only knows the distances present in its training data. Closer than that it
may predict anything, including attraction, and MD then collapses atoms onto each other. Adding
ZBL makes very close approach strongly repulsive whatever the model says there.

It is switched off smoothly by a C² quintic ``switch`` between ``r_inner`` and ``r_outer`` so
that it does not perturb the physics the model learned at bonding distances. The potential adds
``zbl_edge_energies`` per directed edge: each direction carries half the pair energy, so summing
over both directions of a pair gives ZBL(r)·switch(r) once.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

COULOMB = 14.399645  # e²/(4πε0) in eV·Å
BOHR = 0.529177  # Bohr radius a0 in Å
_PHI_C = (0.18175, 0.50986, 0.28022, 0.02817)
_PHI_D = (3.19980, 0.94229, 0.40290, 0.20162)


def zbl_energy(r: jnp.ndarray, z_i: jnp.ndarray, z_j: jnp.ndarray) -> jnp.ndarray:
    """Unswitched ZBL universal screened Coulomb repulsion of two nuclei (eV); r in Å, any shape (broadcast), r > 0."""
    r = jnp.asarray(r)
    dtype = r.dtype if jnp.issubdtype(r.dtype, jnp.floating) else jnp.result_type(float)
    r = r.astype(dtype)
    z_i, z_j = jnp.asarray(z_i).astype(dtype), jnp.asarray(z_j).astype(dtype)
    a = 0.8854 * BOHR / (z_i**0.23 + z_j**0.23)
    x = r / a
    phi = sum(c * jnp.exp(-d * x) for c, d in zip(_PHI_C, _PHI_D))
    return COULOMB * z_i * z_j / r * phi


def switch(r: jnp.ndarray, r_inner: float, r_outer: float) -> jnp.ndarray:
    """C² smooth step: 1 for r <= r_inner, 0 for r >= r_outer, quintic 1 - 10t³ + 15t⁴ - 6t⁵ in between (t = (r - r_inner)/(r_outer - r_inner)); value, first and second derivatives continuous."""
    t = jnp.clip((jnp.asarray(r) - r_inner) / (r_outer - r_inner), 0.0, 1.0)
    return 1.0 - t**3 * (10.0 - 15.0 * t + 6.0 * t**2)


def zbl_edge_energies(
    lengths: jnp.ndarray,
    z_senders: jnp.ndarray,
    z_receivers: jnp.ndarray,
    edge_mask: jnp.ndarray,
    r_inner: float,
    r_outer: float,
) -> jnp.ndarray:
    """Energy per directed edge [n_edge] (eV): ½ · ZBL(r) · switch(r) so that the two directions of a pair add up to the pair energy. Exactly zero (value AND gradient, no NaN anywhere) for edges where edge_mask is False, whatever their length (padding edges may have r = 0 or any value), and for r >= r_outer.

    lengths [n_edge] in Å; z_senders, z_receivers [n_edge] atomic numbers; edge_mask [n_edge] bool.
    """
    # "Double where": substitute a harmless length before dividing so masked or out-of-range edges
    # produce neither inf nor NaN in the backward pass, then zero their result.
    active = edge_mask & (lengths < r_outer)
    safe_r = jnp.where(active, lengths, 1.0)
    e = 0.5 * zbl_energy(safe_r, z_senders, z_receivers) * switch(safe_r, r_inner, r_outer)
    return jnp.where(active, e, 0.0)


@dataclass(frozen=True)
class ZBLRepulsion:
    """ZBL as a pair term of `mpnn.potential.Potential` (`model.pair_repulsion: zbl`).

    Full ZBL below r_inner, switched smoothly (C²) to zero at r_outer (Å). No parameters:
    the learned model fits the reference energy minus this term.
    """

    r_inner: float = 1.0
    r_outer: float = 1.8

    def edge_energies(self, lengths, z_senders, z_receivers, edge_mask) -> jnp.ndarray:
        """eV per directed edge [n_edge]; half the pair energy, zero on padding edges."""
        return zbl_edge_energies(lengths, z_senders, z_receivers, edge_mask, self.r_inner, self.r_outer)
