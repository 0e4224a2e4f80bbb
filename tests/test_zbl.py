"""ZBL pair repulsion: reference values, C² switch, masked-edge safety, forces, monotonicity.
float64 comes from tests/conftest.py, which enables jax_enable_x64 for the session."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpnn.terms.zbl import switch, zbl_edge_energies, zbl_energy

R_INNER, R_OUTER = 1.0, 1.8


def zbl_reference(r: float, zi: int, zj: int) -> float:
    """Independent numpy ZBL straight from Ziegler, Biersack & Littmark (1985)."""
    a = 0.8854 * 0.529177 / (zi**0.23 + zj**0.23)
    x = r / a
    phi = (0.18175 * np.exp(-3.19980 * x) + 0.50986 * np.exp(-0.94229 * x)
           + 0.28022 * np.exp(-0.40290 * x) + 0.02817 * np.exp(-0.20162 * x))
    return 14.399645 * zi * zj / r * phi


def f64(x):
    return jnp.asarray(x, dtype=jnp.float64)


def test_hh_value():
    assert float(zbl_energy(f64(0.5), 1, 1)) == pytest.approx(5.91, abs=0.01)


@pytest.mark.parametrize("zi,zj,r", [(1, 1, 0.5), (6, 8, 1.0), (29, 29, 2.0), (8, 6, 0.3)])
def test_against_reference(zi, zj, r):
    got = float(zbl_energy(f64(r), jnp.asarray(zi), jnp.asarray(zj)))
    np.testing.assert_allclose(got, zbl_reference(r, zi, zj), rtol=1e-10)


def test_broadcast_and_symmetric():
    r = f64([0.4, 0.9, 1.5])
    e = zbl_energy(r, jnp.array([1, 6, 29]), jnp.array([8, 8, 1]))
    np.testing.assert_allclose(e, zbl_energy(r, jnp.array([8, 8, 1]), jnp.array([1, 6, 29])), rtol=1e-14)
    np.testing.assert_allclose(e, [zbl_reference(0.4, 1, 8), zbl_reference(0.9, 6, 8),
                                   zbl_reference(1.5, 29, 1)], rtol=1e-10)


def test_switch_is_c2():
    s = lambda r: switch(r, R_INNER, R_OUTER)
    ds, d2s = jax.grad(s), jax.grad(jax.grad(s))
    eps = 1e-9
    for r0, expected in [(R_INNER, 1.0), (R_OUTER, 0.0)]:
        for r in (r0 - eps, r0, r0 + eps):
            r = f64(r)
            assert float(s(r)) == pytest.approx(expected, abs=1e-12)
            assert float(ds(r)) == pytest.approx(0.0, abs=1e-6)
            assert float(d2s(r)) == pytest.approx(0.0, abs=1e-6)
    # Clipped well outside the window.
    np.testing.assert_array_equal(s(f64([-5.0, 0.0, 0.5, 2.0, 100.0])), [1, 1, 1, 0, 0])
    # Strictly decreasing inside, first derivative negative; halfway value 1/2.
    grid = f64(np.linspace(R_INNER, R_OUTER, 401))
    vals = np.asarray(s(grid))
    assert np.all(np.diff(vals) < 0)
    assert float(s(f64(0.5 * (R_INNER + R_OUTER)))) == pytest.approx(0.5, abs=1e-14)
    assert np.all(np.asarray(jax.vmap(ds)(grid[1:-1])) < 0)


def test_edge_energies_pair_sum_and_cutoff():
    r = f64([0.7, 0.7, 1.3, 1.3, 1.8, 2.5])
    zs = jnp.array([1, 8, 6, 6, 8, 8])
    zr = jnp.array([8, 1, 6, 6, 8, 8])
    mask = jnp.ones(6, bool)
    e = zbl_edge_energies(r, zs, zr, mask, R_INNER, R_OUTER)
    pair = lambda rr, a, b: float(zbl_energy(f64(rr), a, b) * switch(f64(rr), R_INNER, R_OUTER))
    np.testing.assert_allclose(e[0] + e[1], pair(0.7, 1, 8), rtol=1e-12)
    np.testing.assert_allclose(e[2] + e[3], pair(1.3, 6, 6), rtol=1e-12)
    assert float(e[0]) == pytest.approx(0.5 * zbl_reference(0.7, 1, 8), rel=1e-10)  # below r_inner
    assert float(e[4]) == 0.0 and float(e[5]) == 0.0


def test_masked_edges_exactly_zero_with_finite_gradients():
    r = f64([0.0, 0.0, 0.6, 1e-8, 3.0, 1.2, 0.8, 5.0])
    zs = jnp.array([0, 1, 1, 8, 6, 6, 8, 29])
    zr = jnp.array([0, 1, 1, 8, 6, 6, 1, 29])
    mask = jnp.array([False, False, True, False, False, True, True, True])
    total = lambda rr: jnp.sum(zbl_edge_energies(rr, zs, zr, mask, R_INNER, R_OUTER))
    e = zbl_edge_energies(r, zs, zr, mask, R_INNER, R_OUTER)
    g = jax.grad(total)(r)
    assert np.all(np.isfinite(e)) and np.all(np.isfinite(g))
    np.testing.assert_array_equal(np.asarray(e)[~np.asarray(mask)], 0.0)
    np.testing.assert_array_equal(np.asarray(g)[~np.asarray(mask)], 0.0)
    assert float(g[7]) == 0.0 and float(e[7]) == 0.0  # real edge beyond r_outer
    assert np.all(np.asarray(g)[[2, 5, 6]] < 0)  # repulsive: energy falls with distance
    # Second derivatives (used by Hessian-based checks) stay finite too.
    h = jax.hessian(total)(r)
    assert np.all(np.isfinite(h))


@pytest.mark.parametrize("zi,zj,r", [(1, 1, 0.5), (6, 8, 1.0), (29, 29, 2.0), (26, 1, 0.25)])
def test_force_matches_finite_difference(zi, zj, r):
    de = jax.grad(lambda x: zbl_energy(x, zi, zj))(f64(r))
    h = 1e-5
    fd = (zbl_reference(r + h, zi, zj) - zbl_reference(r - h, zi, zj)) / (2 * h)
    np.testing.assert_allclose(float(de), fd, rtol=1e-7)
    # Same for the switched per-edge energy inside the switching window.
    rr = 0.5 * (R_INNER + R_OUTER)
    ee = lambda x: 2.0 * zbl_edge_energies(x[None], jnp.array([zi]), jnp.array([zj]),
                                          jnp.array([True]), R_INNER, R_OUTER)[0]
    fd = (float(ee(f64(rr + h))) - float(ee(f64(rr - h)))) / (2 * h)
    np.testing.assert_allclose(float(jax.grad(ee)(f64(rr))), fd, rtol=1e-7)


@pytest.mark.parametrize("zi,zj", [(1, 1), (8, 8), (29, 29)])
def test_switched_pair_energy_monotone(zi, zj):
    grid = f64(np.linspace(0.3, R_OUTER, 2001))
    e = np.asarray(zbl_energy(grid, zi, zj) * switch(grid, R_INNER, R_OUTER))
    assert np.all(e >= 0)
    assert np.all(np.diff(e) < 0)
