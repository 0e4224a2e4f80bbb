"""Batching by count vs by size on a mixed set: 9-atom molecules with ~200-atom cells.

    python benchmarks/batching.py [--molecules 400] [--cells 40] [--epochs 3] [--workdir DIR]

Builds the set (bundled xTB ethanol frames + EMT-labelled fcc Cu cells of 192 atoms, ±
vacancies), trains the same small NequIP by count (train.batch_size) and by node/edge
budgets (train.batch_nodes / batch_edges), and prints per epoch: compiled programs,
padding fraction of nodes and edges, training seconds. Same data, same epochs.
"""

from __future__ import annotations

import argparse
import csv
import logging
import tempfile
from pathlib import Path

import ase.io
import numpy as np
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from mpnn.config import load_config
from mpnn.training.loop import train

ROOT = Path(__file__).resolve().parents[1]


def copper_cells(n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((4, 4, 3))  # 192 atoms
        if rng.random() < 0.5:
            del atoms[int(rng.integers(len(atoms)))]
        atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
        atoms.calc = EMT()
        labels = dict(energy=atoms.get_potential_energy(), forces=atoms.get_forces())
        atoms.calc = SinglePointCalculator(atoms, **labels)
        frames.append(atoms)
    return frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--molecules", type=int, default=400)
    parser.add_argument("--cells", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batch-nodes", type=int, default=512)
    parser.add_argument("--batch-edges", type=int, default=8192)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="mpnn-batching-"))
    work.mkdir(parents=True, exist_ok=True)
    molecules = ase.io.read(ROOT / "data" / "ethanol_xtb.xyz", f":{args.molecules}")
    frames = molecules + copper_cells(args.cells)
    np.random.default_rng(0).shuffle(frames)
    data = work / "mixed.xyz"
    ase.io.write(data, frames)
    sizes = np.array([len(f) for f in frames])
    print(f"{len(frames)} frames: {int((sizes < 20).sum())} of 9 atoms, {int((sizes >= 20).sum())} of 191–192 atoms ({data})")

    common = [
        f"data.train={data}", "model.num_layers=2", "model.num_features=8", "model.l_max=1", "model.cutoff=4.0",
        f"train.max_epochs={args.epochs}", "train.progress=false", "run.overwrite=true", "train.eval_batch_size=16",
    ]
    modes = {
        f"by count (batch_size={args.batch_size})": [f"train.batch_size={args.batch_size}"],
        f"by size (batch_nodes={args.batch_nodes}, batch_edges={args.batch_edges})": [
            f"train.batch_nodes={args.batch_nodes}", f"train.batch_edges={args.batch_edges}",
        ],
    }
    print(f"\n| batching | epoch | steps | compiles | padding nodes | padding edges | train s |\n|---|---:|---:|---:|---:|---:|---:|")
    for k, (name, overrides) in enumerate(modes.items()):
        run_dir = work / f"run{k}"
        train(load_config(ROOT / "configs" / "default.yaml", common + overrides + [f"run.dir={run_dir}"]))
        with open(run_dir / "metrics.csv") as f:
            rows = list(csv.DictReader(f))[1:]
        previous = 0
        for row in rows:
            steps = int(row["step"]) - previous
            previous = int(row["step"])
            print(
                f"| {name} | {row['epoch']} | {steps} | {row['n_compiles']} | {100 * float(row['padding_nodes']):.1f} % | "
                f"{100 * float(row['padding_edges']):.1f} % | {float(row['epoch_train_s']):.1f} |"
            )


if __name__ == "__main__":
    main()
