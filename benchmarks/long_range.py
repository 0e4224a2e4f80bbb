"""Long-range benchmark: a data set a local model cannot fit, and the cost of electrostatics.

    python benchmarks/long_range.py data      # (re)write data/ion_pairs.xyz (400 frames)
    python benchmarks/long_range.py compare   # train with and without electrostatics, same budget
    python benchmarks/long_range.py cost      # E+F time of the term vs the local model, 1k/10k atoms

The data (`mpnn.data.synthetic.ion_pairs`, see its docstring): a cation LiH⁺ and an anion
HF⁻ 6.5–14 Å apart, labelled by Morse bonds + Coulomb between fixed charges. With a 4 Å
cutoff a local model sees two isolated fragments and cannot know their distance.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mpnn.data.synthetic import ion_pairs

ROOT = Path(__file__).resolve().parents[1]


def write_data(path: Path = ROOT / "data" / "ion_pairs.xyz", n_frames: int = 400) -> Path:
    import ase.io

    ase.io.write(path, ion_pairs(n_frames), format="extxyz")
    return path


def compare(budget: float, extra: list[str]) -> None:
    """Same model, same budget, with and without the electrostatic term; test errors."""
    rows = []
    for name, long_range in (("local only", "null"), ("+ electrostatics", "electrostatics")):
        run_dir = ROOT / "runs" / f"ion_pairs_{long_range}"
        cmd = [
            sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "ion_pairs.yaml"),
            f"model.long_range={long_range}", f"train.max_time={budget}", f"run.dir={run_dir}",
            "run.overwrite=true", "train.progress=false", *extra,
        ]
        subprocess.run(cmd, check=True, cwd=ROOT)
        results = json.loads((run_dir / "results.json").read_text())
        rows.append((name, results["test"], results.get("epochs_completed", results.get("epochs"))))
    print(f"\nion pairs, test set, {budget:.0f} s training each (configs/ion_pairs.yaml):")
    print("| model | E MAE meV/atom | F MAE meV/Å | dipole MAE me·Å | epochs |")
    print("|---|---:|---:|---:|---:|")
    for name, test, epochs in rows:
        dip = test.get("dipole_mae_me_A")
        print(
            f"| {name} | {test['energy_mae_mev_atom']:.1f} | {test['forces_mae_mev_A']:.1f} | "
            f"{'–' if dip is None else f'{dip:.1f}'} | {epochs} |"
        )


def cost(sizes: list[int], repeats: int) -> None:
    """E+F wall time of a periodic fcc-like cell with and without the electrostatic term."""
    import ase.build
    import jax

    import mpnn
    from mpnn.data.graphs import batch_and_pad

    print(f"E+F time, float32, jax {jax.__version__}, {os.cpu_count()} cores, median of {repeats} after warm-up")
    print("| atoms | k-vectors | local NequIP ms | + electrostatics ms | term share |")
    print("|---:|---:|---:|---:|---:|")
    for n_target in sizes:
        reps = max(1, round((n_target / 4) ** (1 / 3)))
        atoms = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True).repeat(reps)
        atoms.rattle(0.05, seed=0)
        times = {}
        for long_range in (None, "electrostatics"):
            config = {"name": "nequip", "num_features": 16, "num_layers": 2, "l_max": 1, "long_range": long_range}
            potential = mpnn.build_potential(config, [29], avg_num_neighbors=40.0)
            graph = batch_and_pad([potential.to_graph(atoms)], n_graph=2)
            out = jax.block_until_ready(potential.predict_graph(graph))  # compile
            samples = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(potential.predict_graph(graph))
                samples.append(time.perf_counter() - t0)
            times[long_range] = 1000 * float(np.median(samples))
            grid = potential.global_terms[0].k_grid if potential.global_terms else None
        n_k = (np.prod([2 * g + 1 for g in grid]) - 1) // 2
        base, full = times[None], times["electrostatics"]
        print(f"| {len(atoms)} | {n_k} | {base:.0f} | {full:.0f} | {(full - base) / full:.0%} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["data", "compare", "cost"])
    parser.add_argument("--budget", type=float, default=300.0, help="seconds of training per model (compare)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="atoms (cost)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides (compare)")
    args = parser.parse_args(argv)
    if args.what == "data":
        print(write_data())
    elif args.what == "compare":
        compare(args.budget, args.overrides)
    else:
        cost(args.sizes, args.repeats)


if __name__ == "__main__":
    main()
