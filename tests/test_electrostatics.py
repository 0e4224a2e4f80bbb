"""Electrostatics of learned charges (mpnn/terms/electrostatics.py), in float64.

Reference values: the rock-salt Madelung constant; the free-space sum that a neutral
molecule's periodic energy approaches as its box grows; independence of the Ewald split;
−k q²/d between charged fragments beyond the cutoff. Then the physics battery of
DESIGN.md for a model with the term switched on (random weights: consistency and
symmetry hold for any weights).
"""

from __future__ import annotations

import ase
import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest
from ase.build import bulk, molecule
from ase.neighborlist import neighbor_list
from scipy.spatial.transform import Rotation
from scipy.special import erf

from mpnn.data.graphs import pad_graph
from mpnn.models import MODELS
from mpnn.potential import build_potential
from mpnn.terms.electrostatics import COULOMB, ewald_energies, free_space_energies, k_grid_size
from tests.conftest import tiny_model_config

MADELUNG_NACL = 1.747564594633


def _ewald_total(positions, charges, cell, sigma, eta, real_cutoff=None, accuracy=1e-12):
    n = len(charges)
    pairs = None
    if real_cutoff is not None:
        atoms = ase.Atoms(positions=positions, cell=cell, pbc=True)
        i, j, shifts = neighbor_list("ijS", atoms, real_cutoff)
        vectors = positions[j] - positions[i] + shifts @ cell
        pairs = (jnp.asarray(i), jnp.asarray(j), jnp.asarray(vectors), jnp.ones(len(i), bool))
    energies = ewald_energies(
        jnp.asarray(positions), jnp.asarray(charges), jnp.asarray(cell)[None], jnp.ones(n, bool), jnp.zeros(n, jnp.int32),
        1, sigma, eta, k_grid_size(cell[None], eta, accuracy), pairs,
    )
    return float(energies.sum())


@pytest.mark.parametrize("cubic", [True, False], ids=["cubic", "primitive-triclinic"])
def test_madelung_energy_of_rock_salt(cubic):
    a = 5.64
    atoms = bulk("NaCl", "rocksalt", a=a, cubic=cubic)
    charges = np.where(atoms.numbers == 11, 1.0, -1.0)
    cutoff = 9.0
    energy = _ewald_total(atoms.positions, charges, atoms.cell.array, sigma=0.0, eta=cutoff / 6.5, real_cutoff=cutoff)
    per_ion_pair = energy / (len(atoms) / 2)
    assert per_ion_pair == pytest.approx(-COULOMB * MADELUNG_NACL / (a / 2), rel=1e-6)


def test_ewald_does_not_depend_on_the_split_and_handles_net_charge():
    rng = np.random.default_rng(0)
    cell = np.array([[6.0, 0.3, 0.0], [1.2, 5.5, 0.4], [-0.7, 0.9, 7.0]])  # triclinic
    positions = rng.uniform(0, 1, (7, 3)) @ cell
    charges = rng.normal(size=7)
    charges += 0.3 / 7 - charges.mean()  # net charge 0.3 e: neutralising background
    sigma = 0.8
    reciprocal_only = _ewald_total(positions, charges, cell, sigma, np.sqrt(2) * sigma)
    for eta in (0.6, 1.0):
        split = _ewald_total(positions, charges, cell, sigma, eta, real_cutoff=12.0)
        assert split == pytest.approx(reciprocal_only, rel=1e-9)


def test_periodic_energy_of_a_neutral_molecule_tends_to_free_space():
    """E(L) = E_free + c/L³ + ... (image dipoles): Richardson-extrapolated boxes give the free sum."""
    rng = np.random.default_rng(1)
    positions = rng.normal(size=(5, 3)) * 1.5
    charges = rng.normal(size=5)
    charges -= charges.mean()
    sigma = 0.8
    free = float(
        free_space_energies(jnp.asarray(positions), jnp.asarray(charges), jnp.ones(5, bool), jnp.zeros(5, jnp.int32), sigma).sum()
    )
    box = {L: _ewald_total(positions, charges, np.eye(3) * L, sigma, np.sqrt(2) * sigma, accuracy=1e-8) for L in (24.0, 48.0)}
    extrapolated = (8 * box[48.0] - box[24.0]) / 7
    # The finite box matters (0.05 %), its extrapolated limit is the free sum (20x closer).
    assert abs(box[24.0] - free) > 2e-4 * abs(free)
    assert abs(extrapolated - free) < 0.05 * abs(box[24.0] - free)


def test_pme_agrees_with_ewald():
    """Smooth PME (large cells) against the Ewald sum: energies, per-atom energies, forces
    and the cell derivative (stress), triclinic cell with a net charge; padding atoms and
    a second frame in the batch change nothing."""
    from mpnn.terms.electrostatics import Electrostatics, mesh_size, pme_energies

    rng = np.random.default_rng(2)
    cell = np.array([[9.0, 0.3, 0.0], [1.2, 8.5, 0.4], [-0.7, 0.9, 10.0]])
    n = 24
    positions = np.concatenate([rng.uniform(0, 1, (n, 3)) @ cell, rng.normal(0, 5, (3, 3))])  # 3 padding atoms
    charges = np.concatenate([rng.normal(size=n), [0.7, -0.2, 0.1]])
    mask = np.arange(n + 3) < n
    graph = np.where(mask, 0, 1)
    cells = np.stack([cell, np.eye(3) * 7.0])
    sigma = 1.0
    term = Electrostatics(sigma=sigma).covering(cells)
    fine_grid = k_grid_size(cells, term.eta, 1e-10)

    def total(method, positions, cells):
        args = (positions, jnp.asarray(charges), cells, jnp.asarray(mask), jnp.asarray(graph), 2, sigma, term.eta)
        if method == "pme":
            return pme_energies(*args, term.mesh)
        return ewald_energies(*args, fine_grid)

    grads = {}
    for method in ("ewald", "pme"):
        energies = total(method, jnp.asarray(positions), jnp.asarray(cells))
        grads[method] = (energies, *jax.grad(lambda p, c: total(method, p, c).sum(), argnums=(0, 1))(jnp.asarray(positions), jnp.asarray(cells)))
    (e_ewald, f_ewald, c_ewald), (e_pme, f_pme, c_pme) = grads["ewald"], grads["pme"]
    assert float(e_pme.sum()) == pytest.approx(float(e_ewald.sum()), rel=2e-4)
    assert np.abs(e_pme - e_ewald).max() < 2e-3 * np.abs(e_ewald).max()
    assert np.abs(f_pme - f_ewald).max() < 3e-3 * np.abs(f_ewald).max()
    assert np.abs(c_pme[0] - c_ewald[0]).max() < 3e-3 * np.abs(c_ewald[0]).max()
    assert np.all(np.asarray(e_pme)[~mask] == 0.0) and term.mesh == mesh_size(cells, term.mesh_spacing)
    # "auto" keeps Ewald for small cells and takes PME for large ones.
    assert not term.uses_pme(n + 3, 2)
    assert Electrostatics().covering(np.eye(3)[None] * 50.0).uses_pme(10000, 2)


# --- a model with the term ---------------------------------------------------------------

NUMBERS = [1, 8, 11, 17, 29]
E0 = [-13.6, -2040.0, -4.4, -9.8, -3.5]


@pytest.fixture(scope="module")
def potential():
    config = tiny_model_config("nequip", long_range="electrostatics", charge_sigma=0.9)
    potential = build_potential(config, NUMBERS, avg_num_neighbors=8.0, e0=E0, scale=0.7, seed=1)
    # Non-zero per-element charge offsets (trained ones are): lone ions get charges too.
    params = potential.variables["model"]
    offsets = jnp.asarray(np.random.default_rng(3).normal(0, 0.5, len(NUMBERS)))
    params = {**params, "outputs": {"charge_offset": offsets}}
    potential = potential.replace(variables={**potential.variables, "model": params})
    # Size the Ewald grid once for every cell below (strained ones too): one compilation.
    return potential.covering(np.stack([salt_cell().cell.array, salt_cell().repeat((2, 1, 2)).cell.array]), margin=1.05)


SHAPE = (96, 768, 17)  # (n_node, n_edge, n_graph) of every batch in this module: one compile


def predict(potential, structures, garbage_padding=False):
    """Potential.predict with one fixed padded shape (results per structure)."""
    graphs = [potential.to_graph(a) for a in structures]
    batch = pad_graph(jraph.batch_np(graphs), *SHAPE)
    if garbage_padding:  # masks, not positions, keep padding out
        real = int(batch.n_node[:-1].sum())
        batch.nodes["positions"][real:] = np.random.default_rng(0).normal(0, 0.3, (SHAPE[0] - real, 3))
    out = jax.device_get(potential.predict_graph(batch, virials=True))  # stress of each (0 for molecules)
    results, offset = [], 0
    for k, atoms in enumerate(structures):
        n = len(atoms)
        result = {key: out[key][offset : offset + n] for key in ("forces", "charges") if key in out}
        result["energy"], result["stress"] = float(out["energy"][k]), out["stress"][k]
        results.append(result)
        offset += n
    return results


def water_ion(charge=0.0) -> ase.Atoms:
    atoms = molecule("H2O") + ase.Atoms("Na", positions=[[2.6, 0.3, -0.4]])
    atoms.rattle(0.05, seed=2)
    atoms.info["charge"] = charge
    return atoms


def salt_cell() -> ase.Atoms:
    atoms = bulk("NaCl", "rocksalt", a=5.0)  # primitive, triclinic, 2 atoms
    atoms.set_cell(atoms.cell.array @ np.array([[1.0, 0.04, 0.0], [0.0, 1.0, -0.03], [0.02, 0.0, 1.0]]), scale_atoms=True)
    atoms.positions[1] += [0.1, -0.07, 0.05]
    return atoms


def test_charges_sum_to_the_total_charge(potential):
    structures = [water_ion(0.0), water_ion(1.0), salt_cell(), ase.Atoms("O", positions=[[0, 0, 0]], info={"charge": -2.0})]
    results = predict(potential, structures)
    for atoms, result in zip(structures, results):
        assert result["charges"].sum() == pytest.approx(atoms.info.get("charge", 0.0), abs=1e-12)
        assert np.ptp(result["charges"]) > 1e-3 or len(atoms) == 1  # learned, not uniform
    # A lone atom carries the whole charge; with zero charge its energy is exactly E0.
    assert results[3]["charges"][0] == pytest.approx(-2.0)
    lone = predict(potential, [ase.Atoms("O", positions=[[0, 0, 0]])])[0]
    assert lone["energy"] == E0[1] and np.all(lone["forces"] == 0.0)
    # The total charge changes charges and energy: a cation is not the neutral molecule.
    assert abs(results[1]["energy"] - results[0]["energy"]) > 1e-3


def test_invariance(potential):
    rotation = Rotation.random(random_state=4).as_matrix() @ np.diag([1.0, 1.0, -1.0])  # with a reflection
    for atoms in (water_ion(1.0), salt_cell()):
        moved = atoms.copy()
        moved.positions = atoms.positions @ rotation.T + np.array([0.4, -1.1, 2.3])
        moved.set_cell(atoms.cell.array @ rotation.T, scale_atoms=False)
        perm = np.random.default_rng(0).permutation(len(atoms))
        ref, out, permuted = predict(potential, [atoms, moved, moved[perm]])
        for other, order in ((out, np.arange(len(atoms))), (permuted, perm)):
            assert other["energy"] == pytest.approx(ref["energy"], rel=1e-10)
            assert np.allclose(other["forces"], (ref["forces"] @ rotation.T)[order], rtol=0, atol=1e-9)
            assert np.allclose(other["charges"], ref["charges"][order], atol=1e-10)
        if atoms.pbc.all():
            assert np.allclose(out["stress"], rotation @ ref["stress"] @ rotation.T, atol=1e-10)


def test_forces_and_stress_match_finite_differences(potential):
    """Charges move with the atoms: this checks the charge derivative route too."""
    h = 1e-5
    for atoms in (water_ion(1.0), salt_cell()):
        moves = [(0, 0), (1, 2), (len(atoms) - 1, 1)]
        batch = [atoms]
        for i, d in moves:
            for sign in (1, -1):
                a = atoms.copy()
                a.positions[i, d] += sign * h
                batch.append(a)
        components = [(0, 0), (1, 1), (0, 2)] if atoms.pbc.all() else []
        for a, b in components:
            strain = np.zeros((3, 3))
            strain[a, b] = strain[b, a] = h / 2 if a != b else h
            for s in (strain, -strain):
                moved = atoms.copy()
                moved.set_cell(atoms.cell.array @ (np.eye(3) + s), scale_atoms=True)
                batch.append(moved)
        results = predict(potential, batch)
        forces = results[0]["forces"]
        for k, (i, d) in enumerate(moves):
            fd = -(results[1 + 2 * k]["energy"] - results[2 + 2 * k]["energy"]) / (2 * h)
            assert fd == pytest.approx(forces[i, d], rel=1e-6, abs=1e-7)
        volume = abs(np.linalg.det(atoms.cell.array))
        offset = 1 + 2 * len(moves)
        for k, (a, b) in enumerate(components):
            fd = (results[offset + 2 * k]["energy"] - results[offset + 2 * k + 1]["energy"]) / (2 * h) / volume
            assert fd == pytest.approx(results[0]["stress"][a, b], rel=1e-6, abs=1e-8)


def test_periodic_cell_matches_supercell_and_padding_changes_nothing(potential):
    cell = salt_cell()
    small, big = predict(potential, [cell, cell.repeat((2, 1, 2))])
    assert big["energy"] / 4 == pytest.approx(small["energy"], rel=1e-10)
    assert np.allclose(big["forces"], np.tile(small["forces"], (4, 1)), atol=1e-9)
    assert np.allclose(big["charges"], np.tile(small["charges"], 4), atol=1e-10)
    assert np.allclose(big["stress"], small["stress"], atol=1e-10)
    # A structure alone (much padding, garbage padding positions) = the same in a batch.
    alone = predict(potential, [water_ion(1.0)], garbage_padding=True)[0]
    batched = predict(potential, [cell, water_ion(1.0), water_ion(0.0)])[1]
    assert alone["energy"] == pytest.approx(batched["energy"], rel=1e-12)
    assert np.allclose(alone["forces"], batched["forces"], atol=1e-12)
    assert np.allclose(alone["charges"], batched["charges"], atol=1e-12)


def test_charged_fragments_beyond_the_cutoff_attract_as_minus_k_q2_over_d(potential):
    """Na and Cl far apart in a neutral frame carry ±q (equal share) and attract (Cl is
    pulled back towards Na) as
    −k q² erf(d/2σ)/d (= −k q²/d beyond a few σ); the same model without the term sees nothing."""
    local = potential.replace(global_terms=())
    distances = np.array([5.0, 8.0, 12.0, 20.0, 40.0])
    frames = [ase.Atoms("NaCl", positions=[[0.0, 0.0, 0.0], [d, 0.0, 0.0]]) for d in distances]
    results = predict(potential, frames)
    q = results[0]["charges"][0]
    assert abs(q) > 1e-3
    sigma = potential.global_terms[0].sigma
    lone = E0[NUMBERS.index(11)] + E0[NUMBERS.index(17)]
    for d, result in zip(distances, results):
        assert np.allclose(result["charges"], [q, -q], atol=1e-12)  # local: independent of d
        assert result["energy"] - lone == pytest.approx(-COULOMB * q**2 * erf(d / (2 * sigma)) / d, rel=1e-9)
        assert result["forces"][1, 0] == pytest.approx(-COULOMB * q**2 / d**2, rel=1e-3 if d > 8 else 0.2)
    assert results[-1]["energy"] - lone == pytest.approx(-COULOMB * q**2 / distances[-1], rel=1e-12)
    assert np.ptp([r["energy"] for r in predict(local, frames)]) == 0.0  # no long range without the term


def test_partially_periodic_frames_are_refused(potential):
    atoms = salt_cell()
    atoms.pbc = (True, True, False)
    with pytest.raises(ValueError, match="periodic in all three directions or none"):
        predict(potential, [atoms])


@pytest.mark.parametrize("name", sorted(set(MODELS) - {"nequip"}))
def test_every_model_carries_charges(name):
    """The other models of the registry (NequIP is the fixture above): total charge kept,
    forces exact with the charges' position dependence, invariant under rotation."""
    config = tiny_model_config(name, long_range="electrostatics")
    potential = build_potential(config, NUMBERS, avg_num_neighbors=8.0, e0=E0, scale=0.7, seed=2)
    atoms, h = water_ion(1.0), 1e-5
    rotated = atoms.copy()
    rotated.positions = atoms.positions @ Rotation.random(random_state=1).as_matrix().T
    batch = [atoms, rotated]
    for sign in (1, -1):
        moved = atoms.copy()
        moved.positions[0, 1] += sign * h
        batch.append(moved)
    results = predict(potential, batch)
    assert results[0]["charges"].sum() == pytest.approx(1.0, abs=1e-12)
    assert np.ptp(results[0]["charges"]) > 1e-4
    assert results[1]["energy"] == pytest.approx(results[0]["energy"], rel=1e-10)
    fd = -(results[2]["energy"] - results[3]["energy"]) / (2 * h)
    assert fd == pytest.approx(results[0]["forces"][0, 1], rel=1e-6, abs=1e-7)


# --- jax-md ------------------------------------------------------------------------------


@pytest.mark.parametrize("structure", ["cell", "molecule"])
def test_jaxmd_matches_the_potential(potential, structure):
    """jax-md's energy (forces by autodiff, stress by its `perturbation` route) and
    properties_fn equal the potential's, with the long-range term inside the jitted function."""
    pytest.importorskip("jax_md")
    import mpnn.jaxmd as J

    atoms = salt_cell().repeat((2, 1, 2)) if structure == "cell" else water_ion(1.0)
    system = J.system_from_atoms(atoms)
    reference = predict(potential, [atoms])[0]
    nbr_fns = J.neighbor_list(potential, system.displacement_fn, system.box)
    nbrs = nbr_fns.allocate(system.positions)
    charge = atoms.info.get("charge", 0.0)
    energy = J.energy_fn(potential, system.displacement_fn, system.numbers, box=system.box, total_charge=charge)
    props = J.properties_fn(potential, system.displacement_fn, system.numbers, system.box, total_charge=charge)

    @jax.jit
    def compute(R, nbrs):
        def U(R, eps):
            return energy(R, neighbor=nbrs, perturbation=jnp.eye(3) + eps)

        e, (g_R, g_eps) = jax.value_and_grad(U, argnums=(0, 1))(R, jnp.zeros((3, 3)))
        return e, -g_R, g_eps, props(R, neighbor=nbrs)

    e, forces, de_deps, out = compute(system.positions, nbrs)
    assert float(e) == pytest.approx(reference["energy"], rel=1e-10)
    assert float(out["energy"]) == pytest.approx(reference["energy"], rel=1e-10)
    assert np.allclose(system.to_original_frame(forces), reference["forces"], atol=1e-9)
    assert np.allclose(system.to_original_frame(out["forces"]), reference["forces"], atol=1e-9)
    assert np.allclose(out["charges"], reference["charges"], atol=1e-10)
    if structure == "cell":
        volume = abs(np.linalg.det(atoms.cell.array))
        assert np.allclose(np.asarray(de_deps) / volume, np.asarray(out["stress"]), atol=1e-9)


def test_nve_with_electrostatics_conserves_energy(potential):
    """Velocity Verlet, float64, a 16-ion salt cell (Ewald inside the jitted step)."""
    pytest.importorskip("jax_md")
    from mpnn.md import run_md

    atoms = bulk("NaCl", "rocksalt", a=5.0, cubic=True).repeat((2, 1, 1))
    atoms.rattle(0.02, seed=0)
    run = run_md(potential, atoms, ensemble="nve", temperature=300.0, timestep=0.5, steps=200, log_every=10, progress=False)
    total = np.array([row["E_pot_eV"] + row["E_kin_eV"] for row in run.log])
    kinetic = np.array([row["E_kin_eV"] for row in run.log])
    assert kinetic.max() > 0.01  # atoms move
    assert np.ptp(total) < 1e-4 * len(atoms)


# --- training, saving, the ASE calculator --------------------------------------------------


def test_training_on_charged_fragments_end_to_end(tmp_path):
    """Train with electrostatics on ion pairs (energy, forces, dipoles), save, reload,
    predict charges with the ASE calculator, export: the whole user path."""
    import csv

    import ase.io

    import mpnn
    from mpnn.data.synthetic import ion_pairs
    from mpnn.training.loop import train
    from tests.conftest import tiny_train_config

    data = tmp_path / "ion_pairs.xyz"
    ase.io.write(data, ion_pairs(32, seed=1))
    config = tiny_train_config(
        str(data), tmp_path / "run", **{
            "model.cutoff": 4.0, "model.long_range": "electrostatics", "train.max_epochs": 4,
            "train.batch_size": 8, "train.stress_weight": 0.0, "train.dipole_weight": 10.0,
        }
    )
    results = train(config)
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(5))
    # Charges are learned from energies, forces and dipoles: the dipole error falls.
    assert float(rows[-1]["valid_dipole_mae_me_A"]) < 0.7 * float(rows[0]["valid_dipole_mae_me_A"])
    assert results["test"]["dipole_mae_me_A"] is not None and results["test"]["charges_mae_me"] is not None

    potential = mpnn.load(tmp_path / "run" / "model", dtype="float64")
    atoms = ion_pairs(1, seed=7)[0]
    atoms.calc = mpnn.MPNNCalculator(potential)
    atoms.get_potential_energy()
    charges = atoms.calc.results["charges"]
    assert charges.sum() == pytest.approx(0.0, abs=1e-10)
    assert np.allclose(atoms.calc.results["dipole"], charges @ atoms.positions, atol=1e-10)
    cation = ion_pairs(1, seed=7)[0][:2]
    cation.info["charge"] = 1.0
    cation.calc = mpnn.MPNNCalculator(potential)
    cation.get_potential_energy()
    assert cation.calc.results["charges"].sum() == pytest.approx(1.0, abs=1e-10)

    # Export: the total charge is an input, the charges an output, and the numbers match.
    from mpnn.export import export_model, graph_inputs, load_exported

    manifest = export_model(potential, tmp_path / "model.mpnnx", buckets=[(8, 64)], platforms=["cpu"])
    assert [i["name"] for i in manifest["inputs"]][-1] == "charge"
    _, functions = load_exported(tmp_path / "model.mpnnx")
    outputs = functions[(8, 64)].call(*graph_inputs(potential, cation, 8, 64))
    assert float(outputs[0]) == pytest.approx(cation.get_potential_energy(), rel=1e-10)
    assert np.allclose(np.asarray(outputs[-1])[:2], cation.calc.results["charges"], atol=1e-10)
