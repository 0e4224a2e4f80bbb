"""Energy + forces through `Potential.predict` (the ASE / inference path, host padding
included): median wall time per call after warm-up.

    python benchmarks/predict_speed.py [--config configs/default.yaml] [--repeats 7]

Workloads: 108-atom fcc Cu (rattled) and one ethanol molecule, with random weights of the
config's architecture (speed does not depend on the weight values), float32.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from ase.build import bulk, molecule

import mpnn
from mpnn.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    config = load_config(args.config)
    potential = mpnn.build_potential(config.model, [1, 6, 8, 29], avg_num_neighbors=20.0, scale=0.05)
    workloads = {"fcc Cu, 108 atoms": bulk("Cu", "fcc", a=3.61, cubic=True).repeat(3), "ethanol, 9 atoms": molecule("CH3CH2OH")}
    for name, atoms in workloads.items():
        atoms.rattle(0.05, seed=0)
        potential.predict([atoms])  # compile
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            potential.predict([atoms])
            times.append(time.perf_counter() - start)
        edges = int(potential.to_graph(atoms).n_edge[0])
        print(f"{name:20s} {edges:6d} edges   E+F median {1e3 * np.median(times):8.1f} ms")


if __name__ == "__main__":
    main()
