"""SymmetricContraction against a brute-force reference (full tensor powers, per-node weights).

float64: tests/conftest.py enables x64 for the session.
"""

from __future__ import annotations

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpnn.nn import SymmetricContraction

IRREPS_IN, IRREPS_OUT, CORRELATION = e3nn.Irreps("0e + 1o + 2e"), e3nn.Irreps("0e + 1o"), 3
NUM_SPECIES, NUM_CHANNELS = 3, 2
SPECIES = np.array([2, 0, 1, 2, 2])


def reference(params, x: np.ndarray, species: np.ndarray) -> dict[e3nn.Irrep, np.ndarray]:
    """{L: [n, C, M]}: B = Σ_ν Σ_k w^(ν,L)[z_n, k, c] Σ_{i1..iν} U^(ν,L)[i1..iν, k, M] x_i1···x_iν,
    with the full ν-fold tensor power of x and U straight from e3nn."""
    out = {ir: np.zeros((len(x), NUM_CHANNELS, ir.dim)) for _, ir in IRREPS_OUT}
    for order in range(1, CORRELATION + 1):
        keep = [ir for _, ir in IRREPS_OUT]
        basis = e3nn.reduced_symmetric_tensor_product_basis(IRREPS_IN, order, keep_ir=keep).regroup()
        for (mul, ir), chunk in zip(basis.irreps, basis.chunks):
            u = np.asarray(chunk).reshape(basis.shape[:-1] + (mul, ir.dim))  # [d]*ν + [K, M]
            for n, z in enumerate(species):
                w = np.asarray(params[f"w{order}_{ir}"])[z]  # [K, C]: this node's element
                for c in range(NUM_CHANNELS):
                    power = x[n, c]
                    for _ in range(order - 1):
                        power = np.multiply.outer(power, x[n, c])  # [d]*ν
                    out[ir][n, c] += np.einsum("ikm,i,k->m", u.reshape(-1, mul, ir.dim), power.reshape(-1), w[:, c])
    return out


@pytest.fixture(scope="module")
def contraction():
    module = SymmetricContraction(IRREPS_OUT, correlation=CORRELATION, num_species=NUM_SPECIES)
    x = e3nn.normal(IRREPS_IN, jax.random.PRNGKey(0), (len(SPECIES), NUM_CHANNELS), dtype=jnp.float64)
    params = module.init(jax.random.PRNGKey(1), x, jnp.asarray(SPECIES))["params"]
    # N(0, 1) weights instead of N(0, 1/K): every coupling matters as much in the comparison
    params = jax.tree_util.tree_map(lambda p: jax.random.normal(jax.random.PRNGKey(p.size), p.shape), params)
    apply = jax.jit(lambda x, species: module.apply({"params": params}, x, species))
    return apply, params, x


def test_parameters_keep_their_names_and_shapes(contraction):
    _, params, _ = contraction
    expected = {}
    for order in range(1, CORRELATION + 1):
        basis = e3nn.reduced_symmetric_tensor_product_basis(IRREPS_IN, order, keep_ir=[ir for _, ir in IRREPS_OUT])
        for mul, ir in basis.irreps.regroup():
            expected[f"w{order}_{ir}"] = (NUM_SPECIES, mul, NUM_CHANNELS)
    assert {name: p.shape for name, p in params.items()} == expected


def test_matches_brute_force_reference(contraction):
    apply, params, x = contraction
    out = apply(x, jnp.asarray(SPECIES))
    assert out.irreps == IRREPS_OUT
    expected = reference(params, np.asarray(x.array), SPECIES)
    for (_, ir), chunk in zip(out.irreps, out.chunks):
        np.testing.assert_allclose(np.asarray(chunk[:, :, 0, :]), expected[ir], rtol=0, atol=1e-10)
        assert np.abs(expected[ir]).max() > 1e-2  # not trivially zero


@pytest.mark.parametrize("parity", [0, 1])
def test_equivariant(contraction, parity):
    apply, _, x = contraction
    angles = (0.7, -1.3, 2.1)
    d_in = np.asarray(IRREPS_IN.D_from_angles(*angles, k=parity))
    d_out = np.asarray(IRREPS_OUT.D_from_angles(*angles, k=parity))
    species = jnp.asarray(SPECIES)
    rotated_in = e3nn.IrrepsArray(IRREPS_IN, x.array @ d_in.T)
    np.testing.assert_allclose(
        np.asarray(apply(rotated_in, species).array), np.asarray(apply(x, species).array) @ d_out.T, atol=1e-12
    )


def test_zero_input_gives_zero_output(contraction):
    apply, _, x = contraction
    out = apply(e3nn.zeros(IRREPS_IN, x.shape[:-1], jnp.float64), jnp.asarray(SPECIES))
    assert np.all(np.asarray(out.array) == 0.0)
