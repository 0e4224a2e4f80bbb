"""Synthetic labelled data with a known answer (benchmarks, tests, notebooks).

`ion_pairs`: frames a local model cannot fit. Each holds a cation LiH⁺ and an anion HF⁻,
6.5–14 Å apart (centre to centre), randomly oriented, bonds thermally stretched. Reference
energy = Morse bonds + the Coulomb energy between the two fragments' fixed point charges
(Li +0.75, H +0.25; F −0.8, H −0.2; k = 14.399645 eV·Å/e²), analytic forces. With a
4 Å cutoff no edge joins the fragments, so a local model sees two isolated fragments and
cannot know how far apart they are: the −k q²/d attraction (1.0–2.2 eV, forces
0.07–0.34 eV/Å) is invisible to it. Frames carry atoms.info["charge"] = 0, the dipole
(e·Å) and the reference charges (e) as labels.
"""

from __future__ import annotations

import numpy as np

COULOMB = 14.399645  # e²/(4πε0), eV·Å; written out: the reference is independent of mpnn
# (Z_a, Z_b, D eV, a 1/Å, r0 Å, q_a, q_b)
CATION = (3, 1, 2.5, 1.2, 1.60, 0.75, 0.25)  # LiH+
ANION = (9, 1, 5.9, 2.2, 0.92, -0.80, -0.20)  # HF-


def _fragment(rng, spec, centre):
    za, zb, _, _, r0, _, _ = spec
    r = r0 + rng.normal(0, 0.05)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    return [za, zb], np.array([centre - 0.5 * r * axis, centre + 0.5 * r * axis])


def reference(positions):
    """(energy eV, forces eV/Å, charges e) of one ion-pair frame (atoms 0-1 cation, 2-3 anion)."""
    charges = np.array([CATION[5], CATION[6], ANION[5], ANION[6]])
    energy, forces = 0.0, np.zeros((4, 3))

    def pair(i, j, e, de_dr):
        nonlocal energy
        vector = positions[i] - positions[j]
        energy += e
        forces[i] -= de_dr * vector / np.linalg.norm(vector)
        forces[j] += de_dr * vector / np.linalg.norm(vector)

    for (i, j), (_, _, depth, a, r0, _, _) in (((0, 1), CATION), ((2, 3), ANION)):
        x = np.exp(-a * (np.linalg.norm(positions[i] - positions[j]) - r0))
        pair(i, j, depth * (1 - x) ** 2 - depth, 2 * depth * a * (1 - x) * x)
    for i in (0, 1):
        for j in (2, 3):
            r = np.linalg.norm(positions[i] - positions[j])
            qq = COULOMB * charges[i] * charges[j]
            pair(i, j, qq / r, -qq / r**2)
    return energy, forces, charges


def ion_pairs(n_frames: int = 400, seed: int = 0, d_range=(6.5, 14.0)):
    """`n_frames` labelled ase.Atoms (see module docstring), reproducible from `seed`."""
    import ase
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n_frames):
        d = rng.uniform(*d_range)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        za, pa = _fragment(rng, CATION, np.zeros(3))
        zb, pb = _fragment(rng, ANION, d * direction)
        numbers, positions = za + zb, np.concatenate([pa, pb]) + 10.0
        energy, forces, charges = reference(positions)
        atoms = ase.Atoms(numbers=numbers, positions=positions)
        atoms.info["charge"] = 0.0
        atoms.info["dipole"] = charges @ positions
        atoms.arrays["charges"] = charges
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        frames.append(atoms)
    return frames


