"""Neighbor lists on the host (vesin), in the form the model consumes.

Edges are directed and full (both i→j and j→i). For edge k the vector from sender to
receiver is `positions[receivers[k]] - positions[senders[k]] + shifts[k] @ cell`, computed
later inside the traced function so that forces and stress come from autodiff.
"""

from __future__ import annotations

import numpy as np
import vesin


def neighbor_list(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All directed pairs closer than `cutoff` (Å), including periodic images.

    Works for periodicity in any subset of directions, triclinic cells and cells smaller
    than twice the cutoff (an atom may then neighbor several images of another atom, or
    its own images).

    Returns:
        senders [n_edge] int32, receivers [n_edge] int32, shifts [n_edge, 3] float64
        (integer cell shifts, stored as floats so they multiply the cell directly).
    """
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    cell = np.asarray(cell, dtype=np.float64)
    if not pbc.any():
        cell = np.zeros((3, 3))
    calculator = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
    i, j, shifts = calculator.compute(points=positions, box=cell, periodic=pbc, quantities="ijS")
    # vesin's pair (i, j, S) is the vector r_j - r_i + S @ cell (as in ASE): i sends, j receives.
    senders = np.asarray(i, dtype=np.int32)
    receivers = np.asarray(j, dtype=np.int32)
    return senders, receivers, np.asarray(shifts, dtype=np.float64)
