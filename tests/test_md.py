"""MD with a trained model: NVE energy conservation through jax-md (with a neighbor-list
overflow handled mid-run), the `python -m mpnn.md` entry point (NPT, multi-image cell),
and the ASE calculator's compile count over a long Langevin run.

One tiny NequIP is trained in-process on EMT Cu (session-scoped, ~1 minute on 2 cores,
almost all of it XLA compilation) and shared by the tests here.
"""

from __future__ import annotations

from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import units
from ase.build import bulk

pytest.importorskip("jax_md")

import mpnn  # noqa: E402
from tests.conftest import tiny_train_config  # noqa: E402

@pytest.fixture(scope="session")
def trained_cu_model(cu_file, tmp_path_factory) -> Path:
    """A tiny NequIP trained for 30 epochs on 36 EMT Cu frames (one batch per epoch: one shape)."""
    from mpnn.training.loop import train

    run_dir = tmp_path_factory.mktemp("md_runs") / "run"
    overrides = {
        "train.max_epochs": 30, "train.batch_size": 36, "train.lr": 0.02,
        "train.checkpoint_every": 1000, "train.keep_checkpoints": 1,
    }
    results = train(tiny_train_config(cu_file, run_dir, **overrides))
    assert results["valid"]["forces_rmse_mev_A"] < 400  # trained (untrained: ~590 meV/Å)
    return run_dir / "model"


def test_nve_conserves_energy(trained_cu_model):
    """Velocity Verlet in float64, 32 Cu atoms at 600 K, 2 fs steps, 1 ps.

    Bounds, per atom: |linear drift of E_tot| < 2e-5 eV/ps and max − min of E_tot < 5e-4 eV.
    Velocity Verlet is symplectic: for a smooth potential E_tot oscillates by O(dt²) and
    does not drift; what could make it drift here is the cutoff (the envelope is C² at
    r_c), pairs entering the cutoff during a step before the list is rebuilt (both
    contribute ~u(1 − δ/r_c) ∝ δ³ for a step length δ ~ 0.02 Å), and float64 round-off
    (~1e-12). Measured: drift ~1e-6 eV/atom/ps, spread ~1e-4 eV/atom (with E_pot itself
    moving by ~60 meV/atom as the crystal heats the lattice from a perfect start). An
    error in forces (e.g. a missed periodic image, or padding leaking into real atoms)
    shows up as a drift orders of magnitude larger.

    capacity_multiplier=1.0 from a perfect lattice makes the neighbor list overflow as
    second-shell pairs (3.61 Å) come inside the 3.5 Å cutoff: the run must reallocate and
    redo those steps without breaking conservation.
    """
    from mpnn.md import run_md

    potential = mpnn.load(trained_cu_model, dtype="float64")
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    run = run_md(
        potential, atoms, ensemble="nve", temperature=600.0, timestep=2.0, steps=500, log_every=10,
        write_every=500, progress=False, capacity_multiplier=1.0,
    )
    assert [row["step"] for row in run.log] == list(range(0, 501, 10))
    assert 1 <= run.n_reallocations <= 3
    # One compiled program per neighbor-list capacity, nothing else.
    assert run.n_compiles == 1 + run.n_reallocations
    time_ps = np.array([row["time_fs"] for row in run.log]) / 1000
    e_tot = np.array([row["E_tot_eV"] for row in run.log]) / len(atoms)
    drift = np.polyfit(time_ps, e_tot, 1)[0]
    assert abs(drift) < 2e-5, drift
    assert np.ptp(e_tot) < 5e-4, np.ptp(e_tot)
    assert np.ptp([row["E_pot_eV"] for row in run.log]) / len(atoms) > 0.01  # it did move
    assert 150 < np.mean([row["T_K"] for row in run.log[10:]]) < 600  # equipartition: ~300 K


def test_md_command_line_npt(trained_cu_model, tmp_path, capsys):
    """`python -m mpnn.md` end to end: NPT on a 4-atom cell (smaller than 2 × cutoff, so a
    multi-image neighbor list and the strain derivative through it), trajectory + log."""
    structure = tmp_path / "cu.xyz"
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.rattle(0.05, seed=0)
    ase.io.write(structure, atoms)
    out = tmp_path / "traj.extxyz"
    from mpnn.md import main  # what `python -m mpnn.md` runs; in-process saves the imports

    argv = [
        "--model", str(trained_cu_model), "--structure", str(structure), "--ensemble", "npt", "--temperature", "300",
        "--pressure", "1000", "--timestep", "2", "--steps", "40", "--log-every", "10", "--write-every", "20", "--out", str(out),
    ]
    assert main(argv) == 0
    stderr = capsys.readouterr().err
    assert "steps/s" in stderr and "µs/atom/step" in stderr and "40/40" in stderr  # summary and progress bar
    frames = ase.io.read(out, index=":")
    assert [f.info["step"] for f in frames] == [0, 20, 40]
    for frame in frames:
        assert len(frame) == 4 and frame.pbc.all()
        assert np.all(np.isfinite(frame.get_forces())) and np.isfinite(frame.get_potential_energy())
        assert frame.get_momenta().shape == (4, 3)
    assert not np.allclose(frames[0].cell.array, frames[-1].cell.array)  # the cell moved
    # Cell and positions come back in the input's frame (cubic cell stays axis-aligned).
    assert np.allclose(frames[-1].cell.array, np.diag(np.diag(frames[-1].cell.array)), atol=1e-5)

    lines = out.with_suffix(".log").read_text().splitlines()
    header = lines[0].lstrip("# ").split()
    assert header == ["step", "time_fs", "T_K", "E_pot_eV", "E_kin_eV", "E_tot_eV", "E_cons_eV", "volume_A3", "pressure_bar"]
    table = np.array([[float(x) for x in line.split()] for line in lines[1:]])
    assert table[:, 0].tolist() == [0, 10, 20, 30, 40]
    assert np.allclose(table[:, 1], table[:, 0] * 2)
    assert np.allclose(table[:, 5], table[:, 3] + table[:, 4], atol=1e-5)
    assert np.ptp(table[:, 6]) < 3e-3  # the NPT extended energy is conserved (float32, 80 fs; measured 3e-4 eV)


def test_ase_langevin_compiles_few_programs(trained_cu_model):
    """1000 Langevin steps of 108-atom fcc Cu through the ASE calculator: grow-only shape
    buckets keep compilations to a handful although atoms (and pair counts) keep moving."""
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(3)
    atoms.calc = mpnn.MPNNCalculator(trained_cu_model)
    MaxwellBoltzmannDistribution(atoms, temperature_K=600, rng=np.random.default_rng(0))
    dyn = Langevin(atoms, 2 * units.fs, temperature_K=600, friction=0.02, rng=np.random.default_rng(1))
    dyn.run(1000)
    assert 1 <= atoms.calc.potential.n_compiles <= 3
    assert np.all(np.isfinite(atoms.get_forces()))
    assert 300 < atoms.get_temperature() < 1000
