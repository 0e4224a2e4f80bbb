"""Training-set statistics that set the potential's energy scale and the model's normalisation."""

from __future__ import annotations

import logging
from typing import Sequence

import jraph
import numpy as np
from ase.data import chemical_symbols

from mpnn.data.frames import DataError, Frame

log = logging.getLogger("mpnn")


def fit_e0(frames: Sequence[Frame], numbers: Sequence[int]) -> np.ndarray:
    """Per-element reference energies (eV) by least squares: E ≈ Σ_i E0[Z_i].

    Elements that never vary independently are resolved by the minimum-norm solution
    (with a warning: see `least_squares_e0`).
    """
    index = {z: k for k, z in enumerate(numbers)}
    labelled = [f for f in frames if f.energy is not None]
    if not labelled:
        raise DataError("cannot fit E0: no training frame has an energy")
    counts = np.zeros((len(labelled), len(numbers)))
    for row, frame in enumerate(labelled):
        for z in frame.numbers:
            counts[row, index[int(z)]] += 1
    energies = np.array([f.energy for f in labelled])
    return least_squares_e0(counts, energies, numbers)


def least_squares_e0(counts: np.ndarray, energies: np.ndarray, numbers: Sequence[int]) -> np.ndarray:
    """E0 [n_elements] eV from element counts [n_frame, n_elements] and energies [n_frame].

    When the compositions cannot tell the elements apart (one composition, as in rMD17 or
    3BPA, or elements always in a fixed ratio), the minimum-norm E0 still gives every
    training composition its right offset, but not isolated atoms or other compositions:
    say so, since a model fine-tuned or run on those would carry the error.
    """
    e0, _, rank, _ = np.linalg.lstsq(counts, energies, rcond=None)
    if rank < len(numbers):
        symbols = [chemical_symbols[int(z)] for z in numbers]
        log.warning(
            "model.e0=fit: the training compositions (%d distinct element-count patterns) determine only %d of the %d "
            "independent combinations of the per-element energies of %s; the fitted E0 are the minimum-norm split, right "
            "for these compositions but not for isolated atoms or other compositions. Give model.e0 as a mapping "
            "(isolated-atom energies, eV) where that matters.",
            len(np.unique(counts, axis=0)), rank, len(numbers), symbols,
        )
    return e0


def residual_per_atom(frames: Sequence[Frame], e0: np.ndarray, numbers: Sequence[int]) -> np.ndarray:
    """(E − Σ E0) / n_atom for every labelled frame (eV/atom)."""
    index = {z: k for k, z in enumerate(numbers)}
    return np.array(
        [(f.energy - sum(e0[index[int(z)]] for z in f.numbers)) / f.n_atom for f in frames if f.energy is not None]
    )


def forces_rms(frames: Sequence[Frame]) -> float:
    """Root mean square of all force components (eV/Å)."""
    forces = [f.forces for f in frames if f.forces is not None]
    if not forces:
        return 0.0
    return float(np.sqrt(np.mean(np.concatenate(forces) ** 2)))


def average_num_neighbors(graphs: Sequence[jraph.GraphsTuple]) -> float:
    """Mean number of edges per atom; divides neighbor sums so layers see O(1) inputs."""
    n_edge = sum(int(g.n_edge.sum()) for g in graphs)
    n_node = sum(int(g.n_node.sum()) for g in graphs)
    return max(n_edge / max(n_node, 1), 1.0)
