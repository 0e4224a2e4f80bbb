"""Training-set statistics that set the potential's energy scale and the model's normalisation."""

from __future__ import annotations

from typing import Sequence

import jraph
import numpy as np

from mpnn.data.frames import DataError, Frame


def fit_e0(frames: Sequence[Frame], numbers: Sequence[int]) -> np.ndarray:
    """Per-element reference energies (eV) by least squares: E ≈ Σ_i E0[Z_i].

    Elements that never vary independently are resolved by the minimum-norm solution.
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
    e0, *_ = np.linalg.lstsq(counts, energies, rcond=None)
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
