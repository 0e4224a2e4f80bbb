"""Physics every registered model must keep (README, "Physics tests"), in float64
with tight tolerances, for every model × {no pair term, ZBL repulsion}. The global-term
route (derivatives through positions and strain) is checked with the electrostatic term
in tests/test_electrostatics.py.

One tiny potential per case (module-scoped) with random weights: symmetry and
consistency hold for any weights, so no training is needed here.
"""

from __future__ import annotations

import ase
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk, fcc111, molecule
from scipy.spatial.transform import Rotation

from mpnn.data.graphs import batch_and_pad, frame_to_graph, pad_graph
from mpnn.models import MODELS
from mpnn.potential import build_potential, cast_graph, energy_and_derivatives
from tests.conftest import tiny_model_config

MODEL_NAMES = sorted(MODELS)
NUMBERS = [1, 6, 8, 29]  # H, C, O, Cu
E0 = [-13.6, -1030.0, -2040.0, -3.5]


def make_potential(name: str, dtype: str = "float64", seed: int = 0, **model_kwargs):
    # Non-trivial scale and E0 so the energy assembly is exercised too.
    return build_potential(
        tiny_model_config(name, dtype, **model_kwargs), NUMBERS, avg_num_neighbors=8.0, e0=E0, scale=0.7, seed=seed
    )


# Every model with the ZBL pair term on (it exercises the model and the pair term together);
# one model without it keeps the plain path covered: MACE with mace-torch's first-layer
# self-connection (its lone-atom subtraction is what test_lone_atom_* checks).
# Every prediction pads to this one shape: one compilation per case instead of one per
# batch composition (test_padding_and_batching_change_nothing still varies the padding).
SHAPE = (256, 2048)


def predict(potential, structures):
    return potential.predict(structures, shape=SHAPE)


CASES = [("mace", None)] + [(name, "zbl") for name in MODEL_NAMES]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1] or 'plain'}")
def potential(request):
    name, pair_repulsion = request.param
    # The other tests' tiny NequIP has parity off; here the default (0o, 1e pseudo-tensors too).
    extra = {"parity": True} if name == "nequip" else {}
    if name == "mace" and pair_repulsion is None:
        extra = {"first_self_connection": True}
    return make_potential(name, pair_repulsion=pair_repulsion, **extra)


def ethanol(seed: int = 0) -> ase.Atoms:
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.1, seed=seed)
    return atoms


def copper_cell(seed: int = 0) -> ase.Atoms:
    """Small triclinic-ish periodic cell: a sheared 4-atom fcc cell, rattled."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.set_cell(atoms.cell.array @ np.array([[1.0, 0.05, 0.0], [0.0, 1.0, -0.03], [0.02, 0.0, 1.0]]), scale_atoms=True)
    atoms.rattle(0.1, seed=seed)
    return atoms


def copper_slab(seed: int = 0) -> ase.Atoms:
    atoms = fcc111("Cu", (2, 2, 3), a=3.61, vacuum=4.0)
    atoms.pbc = (True, True, False)
    atoms.rattle(0.08, seed=seed)
    return atoms


def relative_error(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


# --- symmetry --------------------------------------------------------------------------


@pytest.mark.parametrize("reflect", [False, True])
def test_rotation_reflection_translation(potential, reflect):
    rotation = Rotation.random(random_state=3).as_matrix()
    if reflect:
        rotation = rotation @ np.diag([1.0, 1.0, -1.0])
    for atoms in (ethanol(), copper_cell()):
        moved = atoms.copy()
        moved.positions = atoms.positions @ rotation.T + np.array([0.3, -1.7, 2.2])
        moved.set_cell(atoms.cell.array @ rotation.T, scale_atoms=False)
        ref, out = predict(potential, [atoms, moved])
        assert abs(out["energy"] - ref["energy"]) <= 1e-10 * abs(ref["energy"])
        assert relative_error(out["forces"], ref["forces"] @ rotation.T) < 1e-10
        if atoms.pbc.all():
            assert relative_error(out["stress"], rotation @ ref["stress"] @ rotation.T) < 1e-10


def test_permutation(potential):
    for atoms in (ethanol(), copper_cell()):
        perm = np.random.default_rng(0).permutation(len(atoms))
        ref, out = predict(potential, [atoms, atoms[perm]])
        assert abs(out["energy"] - ref["energy"]) <= 1e-10 * abs(ref["energy"])
        assert relative_error(out["forces"], ref["forces"][perm]) < 1e-10
        assert relative_error(out["energies"], ref["energies"][perm]) < 1e-10


def test_float32_invariance():
    """float32 keeps symmetry to ~1e-5 (relative)."""
    potential = make_potential("nequip", dtype="float32")
    rotation = Rotation.random(random_state=5).as_matrix()
    atoms = ethanol()
    moved = atoms.copy()
    moved.positions = atoms.positions @ rotation.T
    ref, out = predict(potential, [atoms, moved])
    assert potential.variables["e0"].dtype == jnp.float32
    assert abs(out["energy"] - ref["energy"]) <= 1e-5 * abs(ref["energy"])
    assert relative_error(out["forces"], ref["forces"] @ rotation.T) < 1e-4


# --- derivatives -----------------------------------------------------------------------


def test_forces_are_minus_energy_gradient(potential):
    h = 1e-4
    for atoms in (ethanol(), copper_cell()):
        displaced = []
        for i, d in [(0, 0), (1, 1), (2, 2), (len(atoms) - 1, 0)]:
            for sign in (1, -1):
                a = atoms.copy()
                a.positions[i, d] += sign * h
                displaced.append(a)
        results = predict(potential, [atoms, *displaced])
        forces = results[0]["forces"]
        for k, (i, d) in enumerate([(0, 0), (1, 1), (2, 2), (len(atoms) - 1, 0)]):
            fd = -(results[1 + 2 * k]["energy"] - results[2 + 2 * k]["energy"]) / (2 * h)
            assert abs(fd - forces[i, d]) < 1e-7 * max(1.0, abs(forces[i, d])), (i, d, fd, forces[i, d])


def strained(atoms: ase.Atoms, strain: np.ndarray) -> ase.Atoms:
    out = atoms.copy()
    out.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
    return out


@pytest.mark.parametrize("structure", ["bulk", "slab"])
def test_stress_is_strain_derivative(potential, structure):
    atoms = copper_cell() if structure == "bulk" else copper_slab()
    h = 1e-5
    components = [(0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (0, 2)]
    batch = [atoms]
    for a, b in components:
        strain = np.zeros((3, 3))
        strain[a, b] = strain[b, a] = h / 2 if a != b else h
        batch += [strained(atoms, strain), strained(atoms, -strain)]
    results = predict(potential, batch)
    stress = results[0]["stress"]
    volume = abs(np.linalg.det(atoms.cell.array))
    for k, (a, b) in enumerate(components):
        fd = (results[1 + 2 * k]["energy"] - results[2 + 2 * k]["energy"]) / (2 * h) / volume
        assert abs(fd - stress[a, b]) < 1e-7 * max(1e-2, np.abs(stress).max()), (a, b, fd, stress[a, b])
    assert np.allclose(stress, stress.T, atol=1e-14)


def test_virials_sum_to_total(potential):
    result = predict(potential, [copper_cell()])[0]
    assert np.allclose(result["virials"].sum(axis=0), result["virial"], atol=1e-12)
    volume = abs(np.linalg.det(copper_cell().cell.array))
    assert np.allclose(-result["virial"] / volume, result["stress"], atol=1e-12)


def test_molecule_reports_no_stress(potential):
    result = predict(potential, [ethanol()])[0]
    assert "stress" not in result
    # The jitted prediction skips the virials of a molecule (no cell volume) unless asked:
    # same energy and forces either way. (Padded as `predict` pads: no new compilation.)
    graph = pad_graph(potential.to_graph(ethanol()), *SHAPE, 17)
    skipped, computed = potential.predict_graph(graph), potential.predict_graph(graph, virials=True)
    assert "virial" not in skipped and "node_virial" in computed
    assert float(skipped["energy"][0]) == pytest.approx(float(computed["energy"][0]), rel=1e-12)
    assert np.allclose(skipped["forces"], computed["forces"], rtol=0, atol=1e-12)
    assert np.allclose(computed["stress"], 0.0)


# --- periodicity -----------------------------------------------------------------------


@pytest.mark.parametrize("cell", ["primitive", "sheared"])
def test_periodic_cell_matches_supercell(potential, cell):
    """Includes a primitive rocksalt cell with lattice vectors shorter than the 3.5 Å cutoff:
    an atom then neighbors many images of itself."""
    if cell == "primitive":
        atoms = bulk("CuO", "rocksalt", a=4.3)  # 2 atoms, 3.04 Å lattice vectors
        atoms.positions[1] += [0.1, -0.05, 0.07]
    else:
        atoms = copper_cell()
    supercell = atoms.repeat((2, 2, 2))
    small, big = predict(potential, [atoms, supercell])
    assert abs(small["energy"] / len(atoms) - big["energy"] / len(supercell)) < 1e-10 * abs(small["energy"])
    assert relative_error(big["forces"], np.tile(small["forces"], (8, 1))) < 1e-9
    assert relative_error(big["stress"], small["stress"]) < 1e-9


# --- locality, padding, isolated atoms ---------------------------------------------------


def test_continuity_across_cutoff(potential):
    """A dimer pulled through the cutoff: energy and force change by O(δ^p) only."""
    cutoff = potential.cutoff
    delta = 1e-4
    dimers = [ase.Atoms("CuO", positions=[[0, 0, 0], [r, 0.0, 0.0]]) for r in (cutoff - delta, cutoff + delta)]
    inside, outside = predict(potential, dimers)
    separate = sum(E0[NUMBERS.index(z)] for z in (29, 8))
    assert outside["energy"] == pytest.approx(separate, abs=1e-12)
    assert abs(inside["energy"] - outside["energy"]) < 1e-10
    assert np.abs(inside["forces"] - outside["forces"]).max() < 1e-8
    assert np.all(outside["forces"] == 0.0)


def test_padding_and_batching_change_nothing(potential):
    structures = [ethanol(0), copper_cell(1), copper_slab(2)]
    alone = [predict(potential, [s])[0] for s in structures]
    together = predict(potential, structures)
    for a, b in zip(alone, together):
        assert a["energy"] == pytest.approx(b["energy"], rel=1e-12)
        assert np.allclose(a["forces"], b["forces"], rtol=0, atol=1e-12)
    # Extra padding of nodes, edges and graphs.
    graph = potential.to_graph(ethanol(0))
    n_node, n_edge = int(graph.n_node[0]), int(graph.n_edge[0])
    tight = potential.predict_graph(pad_graph(graph, n_node + 1, n_edge, 2))
    loose = potential.predict_graph(pad_graph(graph, n_node + 37, n_edge + 101, 5))
    assert float(tight["energy"][0]) == pytest.approx(float(loose["energy"][0]), rel=1e-12)
    assert np.allclose(tight["forces"][:n_node], loose["forces"][:n_node], atol=1e-12)
    # Masks, not zero lengths, keep padding out: garbage padding positions change nothing.
    garbage = pad_graph(graph, n_node + 37, n_edge + 101, 5)
    garbage.nodes["positions"][n_node:] = np.random.default_rng(0).normal(0, 0.3, (37, 3))
    noisy = potential.predict_graph(garbage)
    assert float(noisy["energy"][0]) == pytest.approx(float(loose["energy"][0]), rel=1e-12)
    assert np.allclose(noisy["forces"][:n_node], loose["forces"][:n_node], atol=1e-12)


def test_distant_fragments_are_additive(potential):
    a = ethanol(0)
    b = ethanol(1)
    b.positions += np.array([potential.cutoff + 6.0, 0.0, 0.0])
    both = a + b
    ra, rb, rab = predict(potential, [a, b, both])
    assert rab["energy"] == pytest.approx(ra["energy"] + rb["energy"], rel=1e-12)
    assert np.allclose(rab["forces"], np.concatenate([ra["forces"], rb["forces"]]), atol=1e-12)


def test_lone_atom_is_exactly_e0_without_nan(potential):
    atoms = ase.Atoms("O", positions=[[0.0, 0.0, 0.0]])
    result = predict(potential, [atoms])[0]
    assert result["energy"] == E0[NUMBERS.index(8)]
    assert np.all(result["forces"] == 0.0)

    # Gradients (parameters and positions) through a padded batch stay finite: padding
    # edges of zero length meet 1/r in ZBL and r/|r| in the harmonics.
    graphs = [frame_to_graph(_frame(a), potential.cutoff, potential.species_index) for a in (atoms, ethanol())]
    graph = jax.tree_util.tree_map(jnp.asarray, cast_graph(batch_and_pad(graphs, n_graph=4), np.float64))

    def loss(params, positions):
        batch = graph._replace(nodes={**graph.nodes, "positions": positions})
        out = energy_and_derivatives(potential, {**potential.variables, "model": params}, batch)
        return jnp.sum(out["energy"] ** 2) + jnp.sum(out["forces"] ** 2) + jnp.sum(out["stress"] ** 2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(potential.variables["model"], graph.nodes["positions"])
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))


def _frame(atoms):
    from mpnn.data.frames import Frame

    return Frame.from_atoms(atoms)
