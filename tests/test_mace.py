"""MACE and its symmetric contraction (float64). Generic physics: tests/test_physics.py."""

from __future__ import annotations

from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import ase
import e3nn_jax as e3nn
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from mpnn.config import load_config
from mpnn.nn import SymmetricContraction
from mpnn.nn.symmetric_contraction import num_couplings, symmetric_basis
from mpnn.potential import build_potential
from tests.conftest import tiny_model_config

IRREPS_IN = "0e + 1o + 2e"
NUM_SPECIES, NUM_CHANNELS, NUM_NODES = 3, 4, 6


@pytest.fixture(scope="module")
def contraction():
    """(module, params, x [n, C, d], species [n]) for correlation 3."""
    module = SymmetricContraction(e3nn.Irreps("0e + 1o + 2e + 0o"), correlation=3, num_species=NUM_SPECIES)
    x = e3nn.normal(IRREPS_IN, jax.random.PRNGKey(0), (NUM_NODES, NUM_CHANNELS), dtype=jnp.float64)
    species = jnp.array([0, 2, 1, 2, 0, 1])
    params = module.init(jax.random.PRNGKey(1), x, species)
    apply = jax.jit(module.apply)
    return apply, params, x, species


def test_contraction_is_equivariant(contraction):
    apply, params, x, species = contraction
    out = apply(params, x, species)
    assert out.irreps == e3nn.Irreps("0e + 1o + 2e")  # no symmetric power of 0e+1o+2e reaches 0o
    assert out.shape == (NUM_NODES, NUM_CHANNELS, 9)
    for seed, reflect in [(0, False), (1, True)]:
        matrix = Rotation.random(random_state=seed).as_matrix() * (-1.0 if reflect else 1.0)
        rotated = apply(params, x.transform_by_matrix(matrix), species)
        np.testing.assert_allclose(rotated.array, out.transform_by_matrix(matrix).array, atol=1e-12)


def test_contraction_matches_direct_sum(contraction):
    """Horner evaluation == Σ_ν Σ_k w[z_n, k, c] U[i1..iν, k, M] x_i1 ··· x_iν written out."""
    apply, params, x, species = contraction
    out = apply(params, x, species)
    a = x.array
    for ir, chunk in zip(out.irreps, out.chunks):
        expected = 0.0
        for order in (1, 2, 3):
            u = symmetric_basis(str(x.irreps), order, str(ir.ir))
            if u is None:
                continue
            w = params["params"][f"w{order}_{ir.ir}"][species]  # [n, K, C]
            operands = {1: "nci->nckm", 2: "nci,ncj->nckm", 3: "nci,ncj,ncl->nckm"}[order]
            inputs, result = operands.split("->")
            u_indices = "ijl"[:order] + "km"
            monomials = jnp.einsum(f"{u_indices},{inputs}->{result}", u, *([a] * order))
            expected = expected + jnp.einsum("nckm,nkc->ncm", monomials, w)
        np.testing.assert_allclose(chunk[:, :, 0, :], expected, atol=1e-12)


def test_contraction_of_zero_is_exactly_zero(contraction):
    apply, params, x, species = contraction
    out = apply(params, e3nn.zeros(x.irreps, x.shape[:-1], jnp.float64), species)
    assert np.all(np.asarray(out.array) == 0.0)
    grads = jax.grad(lambda x: jnp.sum(apply(params, x, species).array ** 2))(e3nn.zeros(x.irreps, x.shape[:-1]))
    assert np.all(np.isfinite(np.asarray(grads.array)))


@pytest.mark.parametrize("correlation, per_element_channel", [(1, 2), (2, 5), (3, 9)])
def test_number_of_weights(correlation, per_element_channel):
    """For inputs 0e + 1o and outputs 0e + 1o, counted by hand from symmetric powers of (0e + 1o):
    ν=1: 0e, 1o → 1 + 1;  ν=2: 0e·0e, 1o·1o | 0e·1o → 2 + 1;  ν=3: 0e³, 0e·(1o·1o) | 0e²·1o, (1o·1o)·1o → 2 + 2.
    """
    module = SymmetricContraction(e3nn.Irreps("0e + 1o"), correlation=correlation, num_species=NUM_SPECIES)
    x = e3nn.normal("0e + 1o", jax.random.PRNGKey(0), (2, NUM_CHANNELS))
    params = jax.eval_shape(module.init, jax.random.PRNGKey(0), x, jnp.zeros(2, jnp.int32))
    count = sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params))
    assert count == NUM_SPECIES * NUM_CHANNELS * per_element_channel
    assert num_couplings(e3nn.Irreps("0e + 1o + 2e + 3o"), 3, e3nn.Irrep("0e")) == 8


# --- the model ------------------------------------------------------------------------------

NUMBERS = [1, 8, 29]
E0 = [-13.6, -2040.0, -3.5]


@pytest.fixture(scope="module")
def potential():
    return build_potential(tiny_model_config("mace", "float64"), NUMBERS, avg_num_neighbors=4.0, e0=E0, scale=0.7)


def test_lone_atom_is_exactly_e0_and_neighbors_matter(potential):
    lone = ase.Atoms("Cu", positions=[[0.0, 0.0, 0.0]])
    dimer = ase.Atoms("CuO", positions=[[0.0, 0.0, 0.0], [1.9, 0.3, -0.2]])
    water = ase.Atoms("OH2", positions=[[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
    lone_out, dimer_out, water_out = potential.predict([lone, dimer, water])
    assert lone_out["energy"] == E0[2]
    assert np.all(lone_out["forces"] == 0.0)
    assert abs(dimer_out["energy"] - (E0[2] + E0[1])) > 1e-6  # the model is not trivially zero
    assert np.abs(water_out["forces"]).max() > 1e-6


def test_layers_and_parameters(potential):
    params = potential.variables["model"]
    assert set(params) >= {"embedding", "layer_0", "layer_1", "readout_0", "readout"}
    assert "self_connection" not in params["layer_0"] and "self_connection" in params["layer_1"]
    # The last layer keeps scalars only; earlier layers carry l <= max_L (= 1 here) with correlation 2.
    assert set(params["layer_1"]["symmetric_contraction"]) == {"w1_0e", "w2_0e"}
    assert set(params["layer_0"]["symmetric_contraction"]) == {"w1_0e", "w2_0e", "w1_1o", "w2_1o"}


def test_first_self_connection_is_mace_torch_s_and_keeps_lone_atoms_at_e0(potential):
    config = tiny_model_config("mace", "float64", first_self_connection=True)
    residual = build_potential(config, NUMBERS, avg_num_neighbors=4.0, e0=E0, scale=0.7)
    params = residual.variables["model"]
    # mace-torch's count for this block: one C x C matrix per element (C = 4 here).
    weights = jax.tree_util.tree_leaves(params["layer_0"]["self_connection"])
    assert sum(w.size for w in weights) == len(NUMBERS) * 4 * 4
    size = lambda p: sum(w.size for w in jax.tree_util.tree_leaves(p))
    assert size(params) == size(potential.variables["model"]) + len(NUMBERS) * 4 * 4
    lone = ase.Atoms("Cu", positions=[[0.0, 0.0, 0.0]])
    dimer = ase.Atoms("CuO", positions=[[0.0, 0.0, 0.0], [1.9, 0.3, -0.2]])
    # The block acts: scaling its weights changes a dimer's energy, never a lone atom's.
    scaled = jax.tree_util.tree_map(lambda w: w, params)
    scaled["layer_0"]["self_connection"] = jax.tree_util.tree_map(lambda w: 3.0 * w, params["layer_0"]["self_connection"])
    dimer_energies = []
    for variables in (params, scaled):
        lone_out, dimer_out = residual.replace(variables={**residual.variables, "model": variables}).predict([lone, dimer])
        assert lone_out["energy"] == E0[2] and np.all(lone_out["forces"] == 0.0)
        dimer_energies.append(dimer_out["energy"])
    assert abs(dimer_energies[1] - dimer_energies[0]) > 1e-6


@pytest.mark.parametrize("name", ["mace_ethanol", "mace_cu", "mace_rmd17"])
def test_configs_resolve(name):
    config = load_config(Path(__file__).parent.parent / "configs" / f"{name}.yaml")
    assert config.model.name == "mace"
    if name == "mace_cu":
        assert config.train.stress_weight > 0
