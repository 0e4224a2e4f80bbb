"""Dimer curves of trained models: is short range repulsive?

    python benchmarks/dimer_curves.py RUN_A/model [RUN_B/model ...] [--out benchmarks/dimer_curves.png]

For every element pair a model knows, the energy of an isolated dimer minus the energy
of the two atoms apart (eV) from 0.3 Å to 3 Å, one panel per pair, one line per model.
Prints E(0.5 Å) − E(2.5 Å) and whether the curve is monotonically repulsive below 1.2 Å.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import ase
import numpy as np
from ase.data import chemical_symbols


def dimer_energies(potential, z1: int, z2: int, distances: np.ndarray) -> np.ndarray:
    """E(r) − E(∞) (eV) of the dimer z1–z2 in free space at `distances` (Å)."""
    dimers = [ase.Atoms(numbers=[z1, z2], positions=[[0, 0, 0], [r, 0, 0]]) for r in distances]
    apart = ase.Atoms(numbers=[z1, z2], positions=[[0, 0, 0], [100.0, 0, 0]])
    energies = np.array([r["energy"] for r in potential.predict(dimers + [apart], batch_size=len(dimers) + 1)])
    return energies[:-1] - energies[-1]


def main() -> None:
    import mpnn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--out", default="benchmarks/dimer_curves.png")
    args = parser.parse_args()
    potentials = {path: mpnn.load(path) for path in args.models}
    numbers = sorted(set().union(*(p.numbers for p in potentials.values())))
    pairs = list(itertools.combinations_with_replacement(numbers, 2))
    distances = np.linspace(0.3, 3.0, 136)
    curves = {}
    for path, potential in potentials.items():
        m = potential.config.model
        label = f"{m.name}, ZBL {m.zbl_r_inner:g}–{m.zbl_r_outer:g} Å" if m.pair_repulsion else f"{m.name}, no ZBL"
        for z1, z2 in pairs:
            if z1 in potential.numbers and z2 in potential.numbers:
                e = dimer_energies(potential, z1, z2, distances)
                curves[(path, z1, z2)] = (label, e)
                short = distances <= 1.2
                monotone = bool(np.all(np.diff(e[short]) < 0))
                drop = float(np.interp(0.5, distances, e) - np.interp(2.5, distances, e))
                name = f"{chemical_symbols[z1]}-{chemical_symbols[z2]}"
                print(f"{label:40s} {name:6s} E(0.5)-E(2.5) = {drop:9.2f} eV   repulsive below 1.2 Å: {monotone}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(pairs))
    rows = -(-len(pairs) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.0 * rows), squeeze=False)
    axes = axes.ravel()
    for ax in axes[len(pairs):]:
        ax.set_visible(False)
    for ax, (z1, z2) in zip(axes, pairs):
        for (path, a, b), (label, e) in curves.items():
            if (a, b) == (z1, z2):
                ax.plot(distances, e, label=label)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(f"{chemical_symbols[z1]}–{chemical_symbols[z2]}")
        ax.set_xlabel("r (Å)")
        ax.set_ylim(-5, 30)
        ax.axvline(1.2, color="grey", lw=0.5, ls=":")
    for ax in axes[::columns]:
        ax.set_ylabel("E(r) − E(∞) (eV)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
