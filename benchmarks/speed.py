"""Speed of our MACE and NequIP beside their peers, same hyperparameters, same run.

    python benchmarks/speed.py                                   # ours + every peer that imports
    python benchmarks/speed.py --impls ours-mace,mace-torch --rows ef_cu108,train_cu
    python benchmarks/speed.py --python mace-torch=/path/venv/bin/python --python mlip-mace=/other/bin/python
    python benchmarks/speed.py --threads 2 --json out.json

Each (implementation, row) runs in a fresh subprocess pinned to `--threads` cores
(taskset; XLA single-threaded Eigen at 1 thread; torch.set_num_threads), so compile
caches, allocators and peak memory never leak from one row into the next. A row:
build the model (random weights, seed 0), prepare the workload (graphs, neighbor lists
and optimiser state are built outside the timing), call once (compile time, reported
apart), once more (warm-up), then `--repeats` timed calls: the median is reported.

Implementations (peers are optional: `pip install -e .[bench]`, or a separate
interpreter per peer with --python NAME=PATH when their pins clash with ours):
    ours-mace, ours-nequip   mpnn (this repository)
    mace-torch               mace-torch (MACE; ScaleShiftMACE with the same blocks)
    nequip                   nequip (PyTorch)
    jaxmd-nequip             jax-md's NequIP (jax_md._nn.nequip, a dependency of ours)
    mlip-mace, mlip-nequip   instadeep's mlip (JAX)

Workloads (deterministic: ase builders, rattle with seed 0; float32):
    ef_ethanol      E+F of one ethanol (9 atoms): per-call latency
    ef_ethanol32    E+F of 32 ethanol molecules in one batch (288 atoms)
    ef_cu108        E+F+stress of fcc Cu, 108 atoms (3×3×3 cubic cells, a = 3.61 Å)
    ef_cu864        E+F+stress of fcc Cu, 864 atoms (6×6×6)
    ef_water192     E+F+stress of 64 water molecules in a 12.42 Å box (1 g/cm³)
    train_ethanol   one training step (E+F loss, backward, Adam) on 5 ethanol molecules
    train_cu        one training step on 2 × Cu108
    md_cu108        NVE MD, 1 fs, ms per step (reported per step of a 20-step chunk)
    md_cu864        NVE MD, ms per step (10-step chunk)
    ef_cu864_paper  E+F+stress of Cu864 with the "paper" MACE size (256 channels, max_L 2, l_max 3):
                    time and peak memory
Hyperparameters (--model-size default): 2 layers, 64x0e+64x1o hidden features, harmonics
l ≤ 2, correlation 3 (MACE), 8 Bessel functions, radial MLP 3 × 64, cutoff 5 Å.
Peak memory: the rise of the process's peak RSS over its RSS before the model was built.

Ours runs as mpnn's command-line tools do, with `mpnn.keep_freed_memory()` (glibc never
mmaps, JAX computes on the calling thread: mpnn/host_memory.py); peers with their defaults.
`--keep-freed-memory` gives every implementation the same settings, as environment
variables; `MPNN_KEEP_FREED_MEMORY=0` turns them off for ours.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

HYPER = {
    "num_layers": 2,
    "num_features": 64,
    "hidden_l_max": 1,  # 64x0e + 64x1o between layers
    "l_max": 2,  # edge harmonics (and MACE's atomic basis A)
    "correlation": 3,
    "num_radial": 8,
    "radial_mlp": (64, 64, 64),
    "cutoff": 5.0,
    "envelope_p": 5,
}
PAPER = {**HYPER, "num_features": 256, "hidden_l_max": 2, "l_max": 3}

IMPLS = {
    "ours-mace": ("speed_impls.ours", "mace"),
    "ours-nequip": ("speed_impls.ours", "nequip"),
    "mace-torch": ("speed_impls.mace_torch", "mace"),
    "nequip": ("speed_impls.nequip_torch", "nequip"),
    "jaxmd-nequip": ("speed_impls.jaxmd_nequip", "nequip"),
    "mlip-mace": ("speed_impls.mlip_models", "mace"),
    "mlip-nequip": ("speed_impls.mlip_models", "nequip"),
}
# Columns of the table: each peer is compared with ours of the same architecture.
OURS = {"mace": "ours-mace", "nequip": "ours-nequip"}

ROWS = {
    # name: (kind, workload, timed repeats)
    "ef_ethanol": ("ef", "ethanol", 50),
    "ef_ethanol32": ("ef", "ethanol32", 7),
    "ef_cu108": ("ef", "cu108", 7),
    "ef_cu864": ("ef", "cu864", 3),
    "ef_water192": ("ef", "water192", 5),
    "train_ethanol": ("train", "ethanol5", 10),
    "train_cu": ("train", "cu108x2", 3),
    "md_cu108": ("md", "cu108", 3),
    "md_cu864": ("md", "cu864", 2),
    "ef_cu864_paper": ("ef", "cu864", 1),  # minutes a call on one core: no separate warm-up
}
MD_STEPS = {"cu108": 20, "cu864": 10}


# --- workloads ---------------------------------------------------------------------------


def ethanol(seed: int):
    from ase.build import molecule

    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=seed)
    return atoms


def fcc_cu(repeats: int):
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeats)
    atoms.rattle(0.05, seed=0)
    return atoms


def water_box(n_side: int = 4, box: float = 12.42):
    """n_side³ water molecules on a grid with random orientations, periodic cube (Å)."""
    from ase import Atoms
    from ase.build import molecule
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(0)
    template = molecule("H2O")
    template.positions -= template.get_center_of_mass()
    positions, symbols = [], []
    spacing = box / n_side
    for i in range(n_side):
        for j in range(n_side):
            for k in range(n_side):
                rotation = Rotation.random(random_state=rng.integers(1 << 31)).as_matrix()
                positions.append(template.positions @ rotation.T + spacing * (np.array([i, j, k]) + 0.5))
                symbols += template.get_chemical_symbols()
    return Atoms(symbols, positions=np.concatenate(positions), cell=np.eye(3) * box, pbc=True)


def workload(name: str) -> list:
    """The structures of a workload, with deterministic labels (energy, forces) for training."""
    if name == "ethanol":
        structures = [ethanol(0)]
    elif name == "ethanol32":
        structures = [ethanol(seed) for seed in range(32)]
    elif name == "ethanol5":
        structures = [ethanol(seed) for seed in range(5)]
    elif name == "cu108":
        structures = [fcc_cu(3)]
    elif name == "cu864":
        structures = [fcc_cu(6)]
    elif name == "cu108x2":
        structures = [fcc_cu(3), fcc_cu(3)]
        structures[1].rattle(0.05, seed=1)
    elif name == "water192":
        structures = [water_box()]
    else:
        raise KeyError(name)
    rng = np.random.default_rng(1)
    for atoms in structures:
        atoms.info["energy"] = float(rng.normal()) - 3.0 * len(atoms)
        atoms.arrays["forces"] = rng.normal(scale=0.3, size=(len(atoms), 3))
    return structures


# --- one row in this process ---------------------------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_row(impl: str, row: str, repeats: int | None) -> dict:
    module_name, model = IMPLS[impl]
    sys.path.insert(0, str(HERE))
    module = importlib.import_module(module_name)
    kind, load, default_repeats = ROWS[row]
    repeats = repeats or default_repeats
    structures = workload(load)
    hyper = PAPER if row.endswith("_paper") else HYPER
    if row.endswith("_paper") and model != "mace":
        raise NotImplementedError("the paper size is a MACE row")
    base_rss = rss_mb()
    start = time.perf_counter()
    bench = module.build(model, hyper, structures)
    if kind == "ef":
        fn = bench.energy_forces(structures)
    elif kind == "train":
        fn = bench.train_step(structures)
    else:
        fn = bench.md(structures[0], MD_STEPS[load])
    prepare_s = time.perf_counter() - start
    start = time.perf_counter()
    fn()
    compile_s = time.perf_counter() - start
    if repeats > 1:
        fn()  # warm-up: allocator, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    per_call = 1 if kind != "md" else MD_STEPS[load]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "impl": impl,
        "row": row,
        "ms": 1e3 * statistics.median(times) / per_call,
        "ms_min": 1e3 * min(times) / per_call,
        "compile_s": compile_s,
        "prepare_s": prepare_s,
        "peak_mb": peak - base_rss,
        "n_params": int(bench.n_params),
        "n_atoms": sum(len(a) for a in structures),
        "repeats": repeats,
        "note": getattr(bench, "note", ""),
    }


# --- the orchestrator ---------------------------------------------------------------------


def pinned_env(threads: int, hugepages: bool = False, keep_freed_memory: bool = False) -> dict:
    env = dict(os.environ)
    if hugepages:  # glibc backs its large (mmap) allocations with transparent huge pages
        env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
    if keep_freed_memory:  # what mpnn.keep_freed_memory() sets, for any implementation's process
        from mpnn.host_memory import environment

        env.update(environment())
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = env["OPENBLAS_NUM_THREADS"] = str(threads)
    env["MPNN_BENCH_THREADS"] = str(threads)
    flags = env.get("XLA_FLAGS", "")
    if threads == 1:
        flags += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    env["XLA_FLAGS"] = flags.strip()
    env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS", "cpu")
    return env


def run_subprocess(
    python: str,
    impl: str,
    row: str,
    threads: int,
    repeats: int | None,
    timeout: float,
    hugepages: bool = False,
    keep_freed_memory: bool = False,
) -> dict:
    cores = ",".join(str(c) for c in range(threads))
    command = ["taskset", "-c", cores, python, str(Path(__file__).resolve()), "--worker", impl, row]
    if repeats:
        command += ["--repeats", str(repeats)]
    try:
        done = subprocess.run(command, env=pinned_env(threads, hugepages, keep_freed_memory), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "row": row, "error": f"timeout {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    lines = (done.stderr or done.stdout).strip().splitlines()
    return {"impl": impl, "row": row, "error": lines[-1] if lines else f"exit {done.returncode}"}


def table(results: list[dict], impls: list[str], rows: list[str], key: str = "ms") -> str:
    by = {(r["impl"], r["row"]): r for r in results}
    lines = ["| " + key + " | " + " | ".join(impls) + " |", "|---|" + "---:|" * len(impls)]
    for row in rows:
        cells = []
        for impl in impls:
            r = by.get((impl, row))
            if r is None or "error" in r:
                cells.append("–")
                continue
            value = r[key]
            cell = f"{value:.3g}" if key != "ms" or value < 100 else f"{value:.0f}"
            ours = OURS[IMPLS[impl][1]]
            mine = by.get((ours, row))
            if impl != ours and mine is not None and "error" not in mine and key == "ms":
                cell += f" ({mine['ms'] / value:.2f}×)"
            cells.append(cell)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_tables(results: list[dict], impls: list[str], rows: list[str]) -> None:
    print("\n## median ms per call (MD: per step); in brackets ours / theirs (< 1: ours faster)\n")
    print(table(results, impls, rows))
    for key in ("compile_s", "peak_mb", "n_params"):
        print(f"\n## {key}\n")
        print(table(results, impls, rows, key))
    notes = {r["impl"]: r["note"] for r in results if r.get("note")}
    for impl, note in notes.items():
        print(f"- {impl}: {note}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row (default: per row)")
    parser.add_argument("--python", action="append", default=[], help="NAME=PATH: interpreter for an implementation")
    parser.add_argument("--hugepages", action="store_true", help="GLIBC_TUNABLES=glibc.malloc.hugetlb=1 for every implementation")
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="give every implementation the host-memory settings mpnn applies to itself (mpnn/host_memory.py)",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per row")
    parser.add_argument("--json", default=None, help="also write every result here")
    parser.add_argument("--from-json", nargs="+", default=None, help="print the tables of earlier --json files, merged")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "ROW"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        threads = int(os.environ.get("MPNN_BENCH_THREADS", "1"))
        try:
            import torch

            torch.set_num_threads(threads)
            torch.set_num_interop_threads(1)
        except ImportError:
            pass
        try:
            print(json.dumps(run_row(*args.worker, args.repeats)))
        except NotImplementedError as e:
            print(json.dumps({"impl": args.worker[0], "row": args.worker[1], "error": f"not available: {e}"}))
        return 0

    impls, rows = args.impls.split(","), args.rows.split(",")
    if args.from_json:
        results = [r for path in args.from_json for r in json.loads(Path(path).read_text())]
        present = {r["impl"] for r in results}
        print_tables(results, [i for i in IMPLS if i in present], [r for r in ROWS if any(x["row"] == r for x in results)])
        return 0
    pythons = dict(item.split("=", 1) for item in args.python)
    print(
        f"# {time.strftime('%Y-%m-%d')} · {platform.processor() or platform.machine()} · {os.cpu_count()} CPUs · "
        f"{args.threads} thread(s) pinned (taskset) · medians after warm-up · float32"
        + (" · glibc.malloc.hugetlb=1" if args.hugepages else "")
        + (" · every implementation keeps freed memory" if args.keep_freed_memory else ""),
        flush=True,
    )
    results = []
    for impl in impls:
        for row in rows:
            r = run_subprocess(
                pythons.get(impl, sys.executable),
                impl,
                row,
                args.threads,
                args.repeats,
                args.timeout,
                args.hugepages,
                args.keep_freed_memory,
            )
            results.append(r)
            if "error" in r:
                print(f"{impl:13s} {row:15s} – {r['error'][:160]}", flush=True)
            else:
                print(
                    f"{impl:13s} {row:15s} {r['ms']:9.2f} ms  compile {r['compile_s']:6.1f} s  "
                    f"peak +{r['peak_mb']:7.0f} MB  {r['n_params']:8d} params",
                    flush=True,
                )
    print_tables(results, impls, rows)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
