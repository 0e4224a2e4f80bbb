"""Reading labelled frames and checking them before anything is trained on them.

A `Frame` is one structure with its reference labels, in eV, Å, eV/Å and eV/Å³ (ASE's
stress sign). Every problem is reported as a `DataError` naming file, frame and cause.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import ase
import ase.io
import numpy as np
from ase.data import chemical_symbols


class DataError(ValueError):
    """Bad input data; the message names the file, the frame index and the problem."""


@dataclass
class Frame:
    positions: np.ndarray  # [n_atom, 3] Å
    numbers: np.ndarray  # [n_atom] atomic numbers
    cell: np.ndarray  # [3, 3] Å, rows are lattice vectors (zeros if not periodic)
    pbc: np.ndarray  # [3] bool
    energy: float | None = None  # eV
    forces: np.ndarray | None = None  # [n_atom, 3] eV/Å
    stress: np.ndarray | None = None  # [3, 3] eV/Å³, ASE sign convention
    source: str = "?"  # "file:frame" for error messages
    charge: float = 0.0  # total charge, e (atoms.info["charge"]); used by electrostatics
    dipole: np.ndarray | None = None  # [3] e·Å (atoms.info["dipole"]), label for molecules
    charges: np.ndarray | None = None  # [n_atom] e (atoms.arrays["charges"]), label

    @property
    def n_atom(self) -> int:
        return len(self.numbers)

    @classmethod
    def from_atoms(cls, atoms: ase.Atoms, source: str = "?") -> "Frame":
        """An unlabelled frame (for prediction), with its total charge (atoms.info["charge"], default 0)."""
        charge = atoms.info.get("charge", 0.0)
        try:
            charge = float(np.asarray(charge).reshape(()))
        except (TypeError, ValueError):
            raise DataError(f"{source}: total charge atoms.info['charge'] is not a single number: {charge!r}")
        if not np.isfinite(charge):
            raise DataError(f"{source}: total charge atoms.info['charge'] is {charge}")
        return cls(
            positions=np.asarray(atoms.positions, dtype=np.float64),
            numbers=np.asarray(atoms.numbers, dtype=np.int64),
            cell=np.asarray(atoms.cell.array, dtype=np.float64),
            pbc=np.asarray(atoms.pbc, dtype=bool),
            source=source,
            charge=charge,
        )

    def to_atoms(self) -> ase.Atoms:
        return ase.Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell, pbc=self.pbc)


def _calc_result(atoms: ase.Atoms, key: str):
    calc = atoms.calc
    if calc is not None and key in getattr(calc, "results", {}):
        return calc.results[key]
    return None


def _label(atoms: ase.Atoms, key: str, per_atom: bool):
    """Look a label up in arrays/info first, then in an attached (single-point) calculator."""
    if per_atom and key in atoms.arrays:
        return atoms.arrays[key]
    if not per_atom and key in atoms.info:
        return atoms.info[key]
    return _calc_result(atoms, key)


def _voigt_to_matrix(s: np.ndarray) -> np.ndarray:
    xx, yy, zz, yz, xz, xy = s
    return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])


def frame_from_atoms(
    atoms: ase.Atoms,
    source: str,
    energy_key: str = "energy",
    forces_key: str = "forces",
    stress_key: str = "stress",
    virial_key: str = "virial",
) -> Frame:
    """Extract positions and labels (whatever is present) from one `ase.Atoms`."""
    frame = Frame.from_atoms(atoms, source)
    n = frame.n_atom

    energy = _label(atoms, energy_key, per_atom=False)
    if energy is not None:
        try:
            frame.energy = float(np.asarray(energy).reshape(()))
        except (TypeError, ValueError):
            raise DataError(f"{source}: energy '{energy_key}' is not a single number: {energy!r}")

    forces = _label(atoms, forces_key, per_atom=True)
    if forces is not None:
        forces = np.asarray(forces, dtype=np.float64)
        if forces.shape != (n, 3):
            raise DataError(f"{source}: forces '{forces_key}' have shape {forces.shape}, expected ({n}, 3)")
        frame.forces = forces

    dipole = _label(atoms, "dipole", per_atom=False)
    if dipole is not None:
        dipole = np.asarray(dipole, dtype=np.float64).reshape(-1)
        if dipole.shape != (3,) or not np.all(np.isfinite(dipole)):
            raise DataError(f"{source}: dipole must be 3 finite numbers (e·Å), got {dipole.tolist()}")
        frame.dipole = dipole
    charges = _label(atoms, "charges", per_atom=True)
    if charges is not None:
        charges = np.asarray(charges, dtype=np.float64)
        if charges.shape != (n,) or not np.all(np.isfinite(charges)):
            raise DataError(f"{source}: charges must be {n} finite numbers (e), got shape {charges.shape}")
        frame.charges = charges

    stress = _label(atoms, stress_key, per_atom=False)
    virial = _label(atoms, virial_key, per_atom=False) if stress is None else None
    for name, value in ((stress_key, stress), (virial_key, virial)):
        if value is None:
            continue
        value = np.asarray(value, dtype=np.float64)
        if value.shape == (6,):
            value = _voigt_to_matrix(value)
        elif value.shape == (9,):
            value = value.reshape(3, 3)
        if value.shape != (3, 3):
            raise DataError(f"{source}: '{name}' has shape {value.shape}, expected (6,), (9,) or (3, 3)")
        if name == virial_key:
            volume = abs(np.linalg.det(frame.cell))
            if volume < 1e-6:
                raise DataError(f"{source}: virial given but the cell has no volume")
            value = -value / volume
        frame.stress = value
    return frame


def validate_frame(
    frame: Frame,
    need_energy: bool,
    need_forces: bool,
    known_numbers: Sequence[int] | None = None,
    min_distance: float = 0.5,
) -> None:
    """Raise `DataError` for anything that would silently break training."""
    src = frame.source
    n = frame.n_atom
    if n == 0:
        raise DataError(f"{src}: frame has no atoms")
    if frame.positions.shape != (n, 3):
        raise DataError(f"{src}: positions have shape {frame.positions.shape}, expected ({n}, 3)")
    if not np.all(np.isfinite(frame.positions)):
        raise DataError(f"{src}: positions contain NaN or inf")
    if need_energy and frame.energy is None:
        raise DataError(f"{src}: no energy found (energy loss weight > 0)")
    if need_forces and frame.forces is None:
        raise DataError(f"{src}: no forces found (forces loss weight > 0)")
    if frame.energy is not None and not np.isfinite(frame.energy):
        raise DataError(f"{src}: energy is {frame.energy}")
    if frame.forces is not None and not np.all(np.isfinite(frame.forces)):
        bad = int(np.argwhere(~np.isfinite(frame.forces))[0, 0])
        raise DataError(f"{src}: forces contain NaN or inf (atom {bad})")
    if frame.stress is not None and not np.all(np.isfinite(frame.stress)):
        raise DataError(f"{src}: stress contains NaN or inf")
    if known_numbers is not None:
        unknown = sorted(set(frame.numbers.tolist()) - set(known_numbers))
        if unknown:
            names = [chemical_symbols[z] if 0 < z < len(chemical_symbols) else str(z) for z in unknown]
            known = [chemical_symbols[z] for z in known_numbers]
            raise DataError(f"{src}: element(s) {names} not known to the model (knows {known})")
    if frame.pbc.any():
        # Only the periodic lattice vectors must be non-degenerate.
        periodic = frame.cell[frame.pbc]
        singular_values = np.linalg.svd(periodic, compute_uv=False)
        if singular_values.min() < 1e-3 * max(singular_values.max(), 1e-12) or singular_values.max() < 1e-6:
            raise DataError(f"{src}: periodic cell is degenerate (cell={frame.cell.tolist()}, pbc={frame.pbc.tolist()})")
    if n > 1 and min_distance > 0:
        _check_min_distance(frame, min_distance)


def _check_min_distance(frame: Frame, min_distance: float) -> None:
    from mpnn.data.neighbors import neighbor_list

    senders, receivers, shifts = neighbor_list(frame.positions, frame.cell, frame.pbc, min_distance)
    if len(senders):
        vec = frame.positions[receivers] - frame.positions[senders] + shifts @ frame.cell
        dist = np.linalg.norm(vec, axis=1)
        k = int(np.argmin(dist))
        raise DataError(
            f"{frame.source}: atoms {senders[k]} and {receivers[k]} are {dist[k]:.3f} Å apart "
            f"(closer than data.min_distance={min_distance} Å)"
        )


def read_frames(
    path: str | Path,
    energy_key: str = "energy",
    forces_key: str = "forces",
    stress_key: str = "stress",
    virial_key: str = "virial",
    index: str | slice = ":",
) -> list[Frame]:
    """Read every frame of a file `ase.io.read` understands (extxyz first)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        atoms_list = ase.io.read(path, index=index)
    except Exception as e:  # ase raises many kinds; all mean "cannot parse"
        raise DataError(f"{path}: cannot be read by ase.io.read: {type(e).__name__}: {e}") from e
    if isinstance(atoms_list, ase.Atoms):
        atoms_list = [atoms_list]
    if len(atoms_list) == 0:
        raise DataError(f"{path}: contains no frames")
    return [
        frame_from_atoms(atoms, f"{path}:frame {i}", energy_key, forces_key, stress_key, virial_key)
        for i, atoms in enumerate(atoms_list)
    ]


def split_frames(
    frames: list[Frame], valid_fraction: float, test_fraction: float, seed: int
) -> tuple[list[Frame], list[Frame], list[Frame]]:
    """Random train/valid/test split of one list, reproducible by `seed`."""
    if valid_fraction < 0 or test_fraction < 0 or valid_fraction + test_fraction >= 1:
        raise DataError(f"split fractions must be >= 0 and sum to < 1 (valid={valid_fraction}, test={test_fraction})")
    order = np.random.default_rng(seed).permutation(len(frames))
    n_valid = int(round(valid_fraction * len(frames)))
    n_test = int(round(test_fraction * len(frames)))
    valid = [frames[i] for i in order[:n_valid]]
    test = [frames[i] for i in order[n_valid : n_valid + n_test]]
    train = [frames[i] for i in order[n_valid + n_test :]]
    return train, valid, test
