"""Reading, validation (clear errors naming file, frame and problem), neighbor lists,
padding and config resolution. No model is compiled here."""

from __future__ import annotations

import ase
import ase.io
import numpy as np
import pytest
from ase.build import bulk, fcc111, molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.neighborlist import primitive_neighbor_list

from mpnn.config import ConfigError, load_config
from mpnn.data.dataset import label_warnings, load_splits
from mpnn.data.frames import DataError, read_frames, split_frames
from mpnn.data.graphs import batch_and_pad, bucket_size, frame_to_graph, iterate_batches
from mpnn.data.neighbors import neighbor_list
from tests.conftest import emt_cu_frames


def write(path, frames):
    ase.io.write(path, frames, format="extxyz")
    return str(path)


def labelled(atoms, energy=-1.0, forces=None, stress=None):
    atoms = atoms.copy()
    forces = np.zeros((len(atoms), 3)) if forces is None else forces
    kwargs = dict(energy=energy, forces=forces)
    if stress is not None:
        kwargs["stress"] = stress
    atoms.calc = SinglePointCalculator(atoms, **kwargs)
    return atoms


# --- reading ---------------------------------------------------------------------------


def test_reads_calculator_labels_and_custom_keys(tmp_path):
    frames = emt_cu_frames(3, seed=1)
    path = write(tmp_path / "cu.xyz", frames)
    read = read_frames(path)
    assert len(read) == 3
    assert read[1].energy == pytest.approx(frames[1].get_potential_energy())
    assert np.allclose(read[1].forces, frames[1].get_forces())
    voigt = frames[1].get_stress()
    assert read[1].stress[0, 1] == pytest.approx(voigt[5]) and read[1].stress[1, 2] == pytest.approx(voigt[3])

    # Labels stored under custom keys in info/arrays, stress given as a virial.
    atoms = frames[0].copy()
    atoms.calc = None
    atoms.info["REF_energy"] = -7.0
    atoms.arrays["REF_forces"] = np.ones((len(atoms), 3))
    atoms.info["REF_virial"] = np.eye(3).reshape(-1) * 2.0
    custom = write(tmp_path / "custom.xyz", [atoms])
    frame = read_frames(custom, energy_key="REF_energy", forces_key="REF_forces", stress_key="REF_stress", virial_key="REF_virial")[0]
    assert frame.energy == -7.0 and np.all(frame.forces == 1.0)
    assert np.allclose(frame.stress, -2.0 * np.eye(3) / atoms.get_volume())


def test_split_is_reproducible_and_disjoint(tmp_path):
    frames = read_frames(write(tmp_path / "cu.xyz", emt_cu_frames(20, seed=2)))
    a = split_frames(frames, 0.2, 0.1, seed=7)
    b = split_frames(frames, 0.2, 0.1, seed=7)
    assert [len(x) for x in a] == [14, 4, 2]
    assert [f.source for f in a[1]] == [f.source for f in b[1]]
    sources = [f.source for part in a for f in part]
    assert len(set(sources)) == 20


# --- validation: each bad input gets a clear error -------------------------------------


def expect_error(tmp_path, atoms_list, match, **load_kwargs):
    path = write(tmp_path / "bad.xyz", atoms_list)
    config = load_config(None, [f"data.train={path}", "data.valid_fraction=0", "data.test_fraction=0"])
    with pytest.raises(DataError, match=match) as info:
        load_splits(config.data, config.train, **load_kwargs)
    assert "bad.xyz" in str(info.value)
    return str(info.value)


def test_missing_energy(tmp_path):
    good = labelled(molecule("H2O"))
    bad = molecule("H2O")
    bad.arrays["forces"] = np.zeros((3, 3))
    message = expect_error(tmp_path, [good, bad], "no energy")
    assert "frame 1" in message


def test_missing_forces(tmp_path):
    bad = molecule("H2O")
    bad.info["energy"] = -3.0
    assert "frame 1" in expect_error(tmp_path, [labelled(molecule("H2O")), bad], "no forces")


def test_wrong_force_shape():
    from mpnn.data.frames import frame_from_atoms

    atoms = molecule("H2O")
    atoms.calc = SinglePointCalculator(atoms, energy=1.0, forces=np.zeros((2, 3)))
    with pytest.raises(DataError, match=r"file.xyz:frame 4: forces .* shape \(2, 3\), expected \(3, 3\)"):
        frame_from_atoms(atoms, "file.xyz:frame 4")


def test_nan_forces(tmp_path):
    forces = np.zeros((3, 3))
    forces[2, 1] = np.nan
    message = expect_error(tmp_path, [labelled(molecule("H2O"), forces=forces)], "NaN or inf")
    assert "frame 0" in message and "atom 2" in message


def test_infinite_energy(tmp_path):
    expect_error(tmp_path, [labelled(molecule("H2O")), labelled(molecule("H2O"), energy=np.inf)], "energy is inf")


def test_unknown_element(tmp_path):
    message = expect_error(tmp_path, [labelled(molecule("H2O")), labelled(molecule("CH4"))], "not known", known_numbers=[1, 8])
    assert "'C'" in message and "frame 1" in message


def test_degenerate_cell(tmp_path):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    cell = atoms.cell.array.copy()
    cell[2] = cell[0] + cell[1]  # coplanar lattice vectors
    atoms.set_cell(cell)
    expect_error(tmp_path, [labelled(atoms)], "degenerate")


def test_atoms_too_close(tmp_path):
    atoms = molecule("H2O")
    atoms.positions[1] = atoms.positions[0] + [0.1, 0.0, 0.0]
    message = expect_error(tmp_path, [labelled(molecule("H2O")), labelled(atoms)], "apart")
    assert "frame 1" in message and "0.100 Å" in message


def test_too_close_through_periodic_image(tmp_path):
    atoms = ase.Atoms("Cu2", positions=[[0, 0, 0], [3.95, 0, 0]], cell=[4.0, 4.0, 4.0], pbc=True)
    expect_error(tmp_path, [labelled(atoms)], "apart")


def test_unreadable_and_missing_file(tmp_path):
    path = tmp_path / "broken.xyz"
    path.write_text("3\nnot a comment line\nH 0 0\n")
    with pytest.raises(DataError, match="broken.xyz"):
        read_frames(path)
    with pytest.raises(DataError, match="not found"):
        read_frames(tmp_path / "nope.xyz")


# --- neighbor lists ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "atoms",
    [
        bulk("Cu", "fcc", a=3.6),  # 1 atom, cell much smaller than the cutoff
        bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1)),
        fcc111("Cu", (2, 2, 3), vacuum=5.0),  # slab: periodic in x, y only
        molecule("CH3CH2OH"),
    ],
    ids=["primitive", "triclinic-free", "slab", "molecule"],
)
def test_neighbor_list_matches_ase(atoms):
    atoms = atoms.copy()
    atoms.rattle(0.05, seed=3)
    if atoms.pbc.any():
        cell = atoms.cell.array @ np.array([[1.0, 0.1, 0.0], [0.0, 1.0, 0.05], [0.0, 0.0, 1.0]])
        atoms.set_cell(cell, scale_atoms=True)
    cutoff = 5.0
    senders, receivers, shifts = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)
    vectors = atoms.positions[receivers] - atoms.positions[senders] + shifts @ atoms.cell.array
    i, j, d = primitive_neighbor_list("ijD", atoms.pbc, atoms.cell.array, atoms.positions, cutoff)
    ours = sorted(zip(senders, receivers, *np.round(vectors, 8).T))
    theirs = sorted(zip(i, j, *np.round(d, 8).T))
    assert ours == theirs
    assert np.all(np.linalg.norm(vectors, axis=1) < cutoff)
    assert np.allclose(shifts, np.round(shifts))


# --- graphs and padding ------------------------------------------------------------------


def test_bucket_sizes_are_few_and_bounded():
    sizes = {bucket_size(n) for n in range(1, 5000)}
    assert len(sizes) <= 4 * 13
    for n in range(1, 5000):
        assert n <= bucket_size(n) <= max(8, 1.25 * n + 1)


def test_padded_batches_have_few_shapes(tmp_path):
    frames = read_frames(write(tmp_path / "cu.xyz", emt_cu_frames(40, seed=4)))
    graphs = [frame_to_graph(f, 3.5, {29: 0}) for f in frames]
    shapes = set()
    for epoch in range(3):
        for batch in iterate_batches(graphs, 8, shuffle=True, seed=epoch):
            shapes.add((batch.nodes["positions"].shape[0], batch.senders.shape[0], batch.n_node.shape[0]))
            assert batch.n_node[-1] > 0 and batch.globals["weight_energy"][-1] == 0
            # Padding edges stay within the padding graph.
            real_nodes = int(batch.n_node[:-1].sum())
            real_edges = int(batch.n_edge[:-1].sum())
            assert np.all(batch.senders[real_edges:] >= real_nodes)
    assert len(shapes) <= 4


def test_batch_keeps_labels_in_place(tmp_path):
    frames = read_frames(write(tmp_path / "cu.xyz", emt_cu_frames(3, seed=5)))
    graphs = [frame_to_graph(f, 3.5, {29: 0}) for f in frames]
    batch = batch_and_pad(graphs)
    assert np.allclose(batch.globals["energy"][:3], [f.energy for f in frames])
    n0 = frames[0].n_atom
    assert np.allclose(batch.nodes["forces"][n0 : n0 + frames[1].n_atom], frames[1].forces)


def test_unused_stress_is_reported_with_counts(tmp_path):
    """stress_weight > 0 without stress labels, and stress on frames that are not periodic
    in 3D, are said out loud (with counts) instead of silently training without them."""
    slab = fcc111("Cu", (2, 2, 2), a=3.61, vacuum=3.0)
    slab.pbc = (True, True, False)
    frames = [labelled(bulk("Cu", cubic=True).repeat(2)) for _ in range(4)] + [labelled(slab, stress=np.ones(6) * 0.01)]
    config = load_config(None, [f"data.train={write(tmp_path / 'a.xyz', frames)}", "data.valid_fraction=0", "data.test_fraction=0"])
    messages = label_warnings(load_splits(config.data, config.train), config.data, config.train)
    assert any("1 of 5 frames carry stress but are not periodic in 3D" in m for m in messages), messages
    assert any("none of the 4 periodic training frames" in m and "training without stress" in m for m in messages), messages
    config.train.stress_weight = 0.0
    messages = label_warnings(load_splits(config.data, config.train), config.data, config.train)
    assert not any("training without stress" in m for m in messages)


# --- config --------------------------------------------------------------------------------


def test_config_overrides_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: nequip\n  num_features: 16\ntrain:\n  lr: 0.01\n")
    config = load_config(path, ["model.num_features=8", "train.max_time=60", "model.radial_mlp=[16,16]", "seed=3"])
    assert config.model.num_features == 8 and config.train.lr == 0.01 and config.train.max_time == 60.0
    assert config.model.radial_mlp == (16, 16) and config.seed == 3
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(path, ["model.num_featurs=8"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(path, ["model.num_features=many"])


def test_e0_fit_recovers_e0_and_warns_when_compositions_cannot_separate_elements(tmp_path, caplog):
    """Energies made as Σ E0[Z] + small noise: varied compositions give back E0 (no
    warning); a single composition (as rMD17, 3BPA, the bundled ethanol) cannot, and
    the fit says so."""
    from mpnn.data.statistics import fit_e0

    e0 = {1: -13.6, 6: -1030.0, 8: -2040.0}
    rng = np.random.default_rng(0)

    def made(name):
        atoms = molecule(name)
        atoms.calc = SinglePointCalculator(
            atoms, energy=sum(e0[int(z)] for z in atoms.numbers) + rng.normal(0, 1e-3), forces=np.zeros((len(atoms), 3))
        )
        return atoms

    numbers = [1, 6, 8]
    mixed = read_frames(write(tmp_path / "mixed.xyz", [made(n) for n in ("CH4", "H2O", "CO2", "CH3CH2OH", "H2")]))
    with caplog.at_level("WARNING", logger="mpnn"):
        np.testing.assert_allclose(fit_e0(mixed, numbers), [e0[z] for z in numbers], atol=0.01)
    assert "minimum-norm" not in caplog.text
    same = read_frames(write(tmp_path / "same.xyz", [made("CH3CH2OH") for _ in range(4)]))
    with caplog.at_level("WARNING", logger="mpnn"):
        fitted = fit_e0(same, numbers)
    assert "determine only 1 of the 3" in caplog.text and "['H', 'C', 'O']" in caplog.text
    assert fitted @ [6, 2, 1] == pytest.approx(sum(e0[int(z)] for z in molecule("CH3CH2OH").numbers), abs=0.01)
