"""Regenerate the labelled reference datasets in this folder.

ethanol_xtb.xyz
    Ethanol (``ase.build.molecule('CH3CH2OH')``, 9 atoms, non-periodic) sampled
    by Langevin molecular dynamics at 500 K (timestep 0.5 fs, friction
    0.01 1/fs, centre of mass fixed) and labelled with GFN2-xTB via tblite
    (accuracy 0.01, one OpenMP thread for bitwise reproducibility).
    Initial velocities are Maxwell-Boltzmann at 500 K.  The first 1 ps
    (2000 steps) is discarded as equilibration; afterwards one frame is saved
    every 10 steps (5 fs) until 1000 frames.  Random seed 0.

cu_emt.xyz
    Bulk fcc Cu (a = 3.61 A) labelled with ASE's EMT calculator (energy, forces,
    stress).  400 frames: 300 from the 2x2x2 cubic supercell (32 atoms) and
    100 from the 3x3x3 primitive cell (27 atoms, triclinic).  Each frame gets a
    random symmetric strain (six independent components uniform in +-3 %),
    0-2 random vacancies and Gaussian displacements with a per-frame sigma
    drawn uniformly from [0.03, 0.12] A.  Random seed 1.

All randomness comes from seeded ``np.random.Generator`` objects, so rerunning
``python data/generate.py`` reproduces the files exactly.  Units: eV, A,
eV/A, eV/A^3 (ASE stress convention, Voigt order xx yy zz yz xz xy).
"""

from __future__ import annotations

import os

# tblite's OpenMP reductions are not bitwise reproducible across threads (and a
# 9-atom molecule runs ~10x faster on one thread), so pin it before any import.
os.environ["OMP_NUM_THREADS"] = "1"

import argparse
import time
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixCom
from ase.io import write
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta

ETHANOL_FILE = "ethanol_xtb.xyz"
CU_FILE = "cu_emt.xyz"
DECIMALS = 8  # matches the %16.8f that extxyz uses for per-atom columns

ETHANOL_SEED = 0
ETHANOL_TEMPERATURE_K = 500.0
ETHANOL_TIMESTEP_FS = 0.5
ETHANOL_FRICTION_PER_FS = 0.01
ETHANOL_EQUILIBRATION_STEPS = 2000  # 1 ps
ETHANOL_STRIDE = 10  # 5 fs between saved frames
ETHANOL_N_FRAMES = 1000
ETHANOL_XTB_ACCURACY = 0.01

CU_SEED = 1
CU_LATTICE_A = 3.61
CU_N_CUBIC = 300
CU_N_PRIMITIVE = 100
CU_MAX_STRAIN = 0.03
CU_MAX_VACANCIES = 2
CU_SIGMA_RANGE = (0.03, 0.12)


def labelled_copy(atoms: Atoms, config_type: str, with_stress: bool) -> Atoms:
    """Detach ``atoms`` from its calculator, keeping energy/forces(/stress) as a single point."""
    results = {
        "energy": round(float(atoms.get_potential_energy()), DECIMALS),
        # Raw calculator forces: the FixCom constraint used in MD must not leak into labels.
        "forces": atoms.get_forces(apply_constraint=False).round(DECIMALS),
    }
    if with_stress:
        results["stress"] = atoms.get_stress(voigt=True).round(DECIMALS)
    frame = Atoms(
        symbols=atoms.get_chemical_symbols(),
        positions=atoms.get_positions(),
        cell=atoms.get_cell(),
        pbc=atoms.get_pbc(),
    )
    frame.info["config_type"] = config_type
    frame.calc = SinglePointCalculator(frame, **results)
    return frame


def generate_ethanol(n_frames: int) -> list[Atoms]:
    from tblite.ase import TBLite

    rng = np.random.default_rng(ETHANOL_SEED)
    atoms = molecule("CH3CH2OH")
    atoms.set_constraint(FixCom())
    # Tighter SCC convergence than the default (accuracy=1) keeps force noise ~1e-6 eV/A.
    atoms.calc = TBLite(method="GFN2-xTB", accuracy=ETHANOL_XTB_ACCURACY, verbosity=0)

    thermalize_momenta(atoms, ETHANOL_TEMPERATURE_K, rng=rng)
    Stationary(atoms)
    ZeroRotation(atoms)
    dynamics = Langevin(
        atoms,
        timestep=ETHANOL_TIMESTEP_FS * units.fs,
        temperature_K=ETHANOL_TEMPERATURE_K,
        friction=ETHANOL_FRICTION_PER_FS / units.fs,
        fixcm=False,
        rng=rng,
    )

    start = time.perf_counter()
    dynamics.run(ETHANOL_EQUILIBRATION_STEPS)
    print(
        f"ethanol: equilibrated {ETHANOL_EQUILIBRATION_STEPS} steps in "
        f"{time.perf_counter() - start:.1f} s, T = {atoms.get_temperature():.0f} K"
    )

    config_type = f"md_{ETHANOL_TEMPERATURE_K:.0f}K"
    frames: list[Atoms] = []
    start = time.perf_counter()
    while len(frames) < n_frames:
        dynamics.run(ETHANOL_STRIDE)
        frames.append(labelled_copy(atoms, config_type, with_stress=False))
        if len(frames) % 100 == 0:
            print(
                f"ethanol: {len(frames)}/{n_frames} frames, "
                f"T = {atoms.get_temperature():.0f} K, {time.perf_counter() - start:.1f} s"
            )
    return frames


def random_symmetric_strain(rng: np.random.Generator) -> np.ndarray:
    xx, yy, zz, yz, xz, xy = rng.uniform(-CU_MAX_STRAIN, CU_MAX_STRAIN, size=6)
    return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])


def perturbed_cu(template: Atoms, rng: np.random.Generator) -> tuple[Atoms, str]:
    atoms = template.copy()
    strain = random_symmetric_strain(rng)
    atoms.set_cell(atoms.cell[:] @ (np.eye(3) + strain), scale_atoms=True)

    n_vacancies = int(rng.integers(0, CU_MAX_VACANCIES + 1))
    if n_vacancies:
        del atoms[rng.choice(len(atoms), size=n_vacancies, replace=False).tolist()]

    sigma = rng.uniform(*CU_SIGMA_RANGE)
    atoms.positions += rng.normal(0.0, sigma, size=atoms.positions.shape)
    atoms.wrap()
    # Round the geometry to the precision stored on disk before labelling it.
    atoms.set_cell(atoms.cell[:].round(DECIMALS))
    atoms.positions = atoms.positions.round(DECIMALS)
    return atoms, "strained_vacancy" if n_vacancies else "strained"


def generate_cu() -> list[Atoms]:
    rng = np.random.default_rng(CU_SEED)
    cubic = bulk("Cu", "fcc", a=CU_LATTICE_A, cubic=True).repeat(2)
    primitive = bulk("Cu", "fcc", a=CU_LATTICE_A).repeat(3)
    templates = [cubic] * CU_N_CUBIC + [primitive] * CU_N_PRIMITIVE

    frames: list[Atoms] = []
    start = time.perf_counter()
    for template in templates:
        atoms, config_type = perturbed_cu(template, rng)
        atoms.calc = EMT()
        frames.append(labelled_copy(atoms, config_type, with_stress=True))
    print(f"cu: {len(frames)} frames in {time.perf_counter() - start:.1f} s")
    return frames


def save(frames: list[Atoms], path: Path) -> None:
    write(path, frames, format="extxyz")
    print(f"wrote {len(frames)} frames to {path} ({path.stat().st_size / 1e6:.2f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--which", choices=["ethanol", "cu", "all"], default="all")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument(
        "--n-frames",
        type=int,
        default=ETHANOL_N_FRAMES,
        help="number of ethanol frames (a prefix of the full trajectory)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    if args.which in ("cu", "all"):
        save(generate_cu(), args.out / CU_FILE)
    if args.which in ("ethanol", "all"):
        save(generate_ethanol(args.n_frames), args.out / ETHANOL_FILE)
    print(f"total time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
