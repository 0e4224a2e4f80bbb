"""Radial functions of the edge length: Bessel basis times a smooth cutoff envelope."""

from __future__ import annotations

import jax.numpy as jnp


def safe_norm(vectors: jnp.ndarray) -> jnp.ndarray:
    """|v| over the last axis with a finite gradient at v = 0 (padding edges are zero vectors)."""
    squared = jnp.sum(vectors**2, axis=-1)
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def masked_edge_vectors(vectors: jnp.ndarray, edge_mask: jnp.ndarray, fill: float = 1.0) -> jnp.ndarray:
    """Edge vectors [n_edge, 3] with padding edges (mask False) replaced by (fill, 0, 0) Å.

    Every term takes lengths and directions from these, so 1/r, r/|r| and friends stay
    finite on padding edges whatever their stored vectors are, and the gradient that
    reaches a padding edge's vector is exactly zero. Terms still multiply their padding
    edges' contributions by the mask.
    """
    fill_vector = jnp.zeros((1, 3), vectors.dtype).at[0, 0].set(fill)
    return jnp.where(edge_mask[:, None], vectors, fill_vector)


def bessel_basis(r: jnp.ndarray, cutoff: float, num: int) -> jnp.ndarray:
    """sqrt(2/c) sin(nπr/c) / r for n = 1..num; [n_edge] Å → [n_edge, num].

    At r = 0 the limit nπ/c · sqrt(2/c) is used (finite values and gradients).
    """
    n = jnp.arange(1, num + 1, dtype=r.dtype)
    r_safe = jnp.where(r > 0, r, 1.0)[:, None]
    values = jnp.sqrt(2.0 / cutoff) * jnp.sin(n * jnp.pi * r_safe / cutoff) / r_safe
    limit = jnp.sqrt(2.0 / cutoff) * n * jnp.pi / cutoff
    return jnp.where(r[:, None] > 0, values, limit)


def polynomial_envelope(r: jnp.ndarray, cutoff: float, p: int = 6) -> jnp.ndarray:
    """Smooth cutoff u(r/c) (Klicpera et al. 2020): 1 at 0; at the cutoff u, u' and u''
    vanish (for any p), so energies and forces are continuous as atoms cross it."""
    x = r / cutoff
    u = (
        1.0
        - (p + 1) * (p + 2) / 2 * x**p
        + p * (p + 2) * x ** (p + 1)
        - p * (p + 1) / 2 * x ** (p + 2)
    )
    return jnp.where(x < 1.0, u, 0.0)


def radial_features(r: jnp.ndarray, cutoff: float, num: int, p: int = 6) -> jnp.ndarray:
    """Bessel basis × envelope: [n_edge] → [n_edge, num]; exactly zero beyond the cutoff."""
    return bessel_basis(r, cutoff, num) * polynomial_envelope(r, cutoff, p)[:, None]
