"""Long-range benchmark: a data set a local model cannot fit, and the cost of electrostatics.

    python benchmarks/long_range.py data      # (re)write data/ion_pairs.xyz (400 frames)
    python benchmarks/long_range.py compare   # train with and without electrostatics, same budget
    python benchmarks/long_range.py cost      # E+F time of Ewald / PME vs the local model, 1k/10k atoms

The data (`mpnn.data.synthetic.ion_pairs`, see its docstring): a cation LiH⁺ and an anion
HF⁻ 6.5–14 Å apart, labelled by Morse bonds + Coulomb between fixed charges. With a 4 Å
cutoff a local model sees two isolated fragments and cannot know their distance.
"""

from __future__ import annotations

import argparse
import json
import math
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
    """The same model and schedule with and without the electrostatic term (and the term
    without dipole labels: charges learned from energies and forces alone); test errors."""
    variants = (
        ("local only", ["model.long_range=null"]),
        ("+ electrostatics", ["model.long_range=electrostatics"]),
        ("+ electrostatics, no dipole labels", ["model.long_range=electrostatics", "train.dipole_weight=0"]),
    )
    rows = []
    for k, (name, overrides) in enumerate(variants):
        run_dir = ROOT / "runs" / f"ion_pairs_{k}"
        cmd = [
            sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "ion_pairs.yaml"),
            *overrides, f"train.max_time={budget}", f"run.dir={run_dir}", "run.overwrite=true",
            "train.progress=false", *extra,
        ]
        subprocess.run(cmd, check=True, cwd=ROOT)
        rows.append((name, json.loads((run_dir / "results.json").read_text())))
    print(f"\nion pairs (configs/ion_pairs.yaml), test set; max_time {budget:.0f} s or max_epochs, whichever first:")
    print("| model | E MAE meV/atom | F MAE meV/Å | dipole MAE me·Å | charge MAE me | epochs | train s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, results in rows:
        test = results["test"]

        def fmt(key):
            return "–" if test.get(key) is None else f"{test[key]:.1f}"

        print(
            f"| {name} | {fmt('energy_mae_mev_atom')} | {fmt('forces_mae_mev_A')} | {fmt('dipole_mae_me_A')} | "
            f"{fmt('charges_mae_me')} | {results['epochs']:.0f} | {results['train_time_s']:.0f} |"
        )


def cost(sizes: list[int], repeats: int) -> None:
    """E+F wall time of a periodic rock-salt NaCl cell (two elements: the charges are not
    all equal): the local model alone, and with electrostatics by Ewald and by PME (same
    model, same random weights, so the same charges)."""
    import ase.build
    import jax

    import mpnn
    from mpnn.data.graphs import batch_and_pad

    print(f"E+F time, float32, jax {jax.__version__}, {os.cpu_count()} cores, median of {repeats} after warm-up (compile apart)")
    print("| atoms | local NequIP ms | + Ewald ms (k-vectors) | + PME ms (mesh) | PME − Ewald, relative to the term |")
    print("|---:|---:|---:|---:|---:|")
    for n_target in sizes:
        reps = max(1, math.ceil((n_target / 8) ** (1 / 3) - 1e-9))  # 8·reps³ atoms ≥ n_target
        atoms = ase.build.bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat(reps)
        atoms.rattle(0.05, seed=0)
        times, energies, sizes_of = {}, {}, {}
        for method in (None, "ewald", "pme"):
            config = {"name": "nequip", "num_features": 16, "num_layers": 2, "l_max": 1}
            if method:
                config.update(long_range="electrostatics", electrostatics_method=method)
            potential = mpnn.build_potential(config, [11, 17], avg_num_neighbors=40.0, seed=0)
            graph = batch_and_pad([potential.to_graph(atoms)], n_graph=2)
            t0 = time.perf_counter()
            out = jax.block_until_ready(potential.predict_graph(graph))
            compile_s = time.perf_counter() - t0
            samples = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(potential.predict_graph(graph))
                samples.append(time.perf_counter() - t0)
            times[method], energies[method] = 1000 * float(np.median(samples)), float(out["energy"][0])
            if method:
                term = potential.global_terms[0]
                sizes_of[method] = (np.prod([2 * g + 1 for g in term.k_grid]) - 1) // 2 if method == "ewald" else "×".join(map(str, term.mesh))
            print(f"  {len(atoms)} atoms, {method or 'local'}: {times[method]:.0f} ms (compile {compile_s:.1f} s)", file=sys.stderr)
        jax_pme_ms = _jax_pme_time(atoms, repeats)
        gap = abs(energies["pme"] - energies["ewald"]) / abs(energies["ewald"] - energies[None])
        print(
            f"| {len(atoms)} | {times[None]:.0f} | {times['ewald']:.0f} ({sizes_of['ewald']}) | "
            f"{times['pme']:.0f} ({sizes_of['pme']}) | {gap:.1e} |"
            + ("" if jax_pme_ms is None else f" jax-pme PME alone: {jax_pme_ms:.0f} ms |")
        )


def _jax_pme_time(atoms, repeats: int) -> float | None:
    """E+F ms of jax-pme's PME calculator alone (point charges ±1, same mesh spacing and
    splitting width as ours, real-space cutoff 6 Å), if jax-pme is installed; else None."""
    try:
        import jaxpme
    except ImportError:
        return None
    import jax

    eta = math.sqrt(2.0)
    charges = np.where(np.arange(len(atoms)) % 2 == 0, 1.0, -1.0).astype(np.float32)
    calculator = jaxpme.PME()
    inputs = calculator.prepare(atoms, charges, 6.0, eta / 3.0, eta)
    inputs = [np.asarray(x, np.float32) if isinstance(x, np.ndarray) and x.dtype == np.float64 else x for x in inputs]
    fn = jax.jit(calculator.energy_forces)
    jax.block_until_ready(fn(*inputs))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        samples.append(time.perf_counter() - t0)
    return 1000 * float(np.median(samples))


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
