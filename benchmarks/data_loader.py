"""Data loading at scale: HDF5 cache (mpnn.data.cache) vs graphs held in memory.

Generates `--frames` small molecules (5–30 atoms of H, C, N, O on a jittered 1.5 Å grid,
so every pair is ≥ 0.9 Å apart; fake energy and forces) as extxyz in `--files` files,
then, each step in its own process (so peak memory is its own):

    build   build_cache: stream the files, validate, neighbor lists, write the .h5
    cache   shuffled padded batches read from the cache, with and without `prefetch`
    memory  today's path, every run: read_frames, validate_frame (as load_splits),
            frame_to_graph into a list; shuffled batches with iterate_batches

and prints a table: sizes, times, frames/s and batches/s of one shuffled epoch, and peak
RSS (resource.getrusage ru_maxrss). "after imports" is the RSS of a process that has only
imported mpnn/jax: the part of the peak that is the data is the difference.

    taskset -c 1 python benchmarks/data_loader.py --frames 100000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SYMBOLS = {1: "H", 6: "C", 7: "N", 8: "O"}


def molecule(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(numbers [n], positions [n, 3] Å): n in 5..30 atoms on distinct sites of a 4×4×4
    grid of 1.5 Å, each moved by at most 0.3 Å per axis (pairs ≥ 0.9 Å apart)."""
    n = int(rng.integers(5, 31))
    sites = rng.choice(64, size=n, replace=False)
    grid = np.stack(np.unravel_index(sites, (4, 4, 4)), axis=1) * 1.5
    positions = grid + rng.uniform(-0.3, 0.3, (n, 3)) + 5.0
    numbers = rng.choice([1, 6, 7, 8], size=n, p=[0.5, 0.3, 0.1, 0.1])
    return numbers, positions


def frame_text(numbers: np.ndarray, positions: np.ndarray, energy: float, forces: np.ndarray) -> str:
    header = f'{len(numbers)}\nProperties=species:S:1:pos:R:3:forces:R:3 energy={energy:.8f} pbc="F F F"\n'
    lines = [
        f"{SYMBOLS[int(z)]} {p[0]:.8f} {p[1]:.8f} {p[2]:.8f} {f[0]:.8f} {f[1]:.8f} {f[2]:.8f}\n"
        for z, p, f in zip(numbers, positions, forces)
    ]
    return header + "".join(lines)


def generate(workdir: Path, n_frames: int, n_files: int, seed: int) -> list[Path]:
    """`n_frames` molecules with E = Σ E0(Z) + noise (eV) and random forces (eV/Å), in `n_files` files."""
    rng = np.random.default_rng(seed)
    e0 = {1: -13.6, 6: -1030.0, 7: -1480.0, 8: -2040.0}
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, count in enumerate(np.diff(np.linspace(0, n_frames, n_files + 1).astype(int))):
        path = data / f"part{k}.xyz"
        with open(path, "w") as handle:
            for _ in range(count):
                numbers, positions = molecule(rng)
                energy = sum(e0[int(z)] for z in numbers) + rng.normal(0, 0.1 * len(numbers))
                handle.write(frame_text(numbers, positions, energy, rng.normal(0, 1.0, positions.shape)))
        paths.append(path)
    return paths


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def epoch(batches, n_frames: int) -> dict:
    start = time.perf_counter()
    n_batches = sum(1 for _ in batches)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "batches_per_s": n_batches / seconds, "frames_per_s": n_frames / seconds}


def step_build(args) -> dict:
    from mpnn.data.cache import build_cache

    imported = rss_mb()
    start = time.perf_counter()
    path = build_cache(args.data, args.cutoff, args.cache_dir, progress=False)
    built = time.perf_counter() - start
    start = time.perf_counter()
    assert build_cache(args.data, args.cutoff, args.cache_dir, progress=False) == path
    reused = time.perf_counter() - start  # hashing the files' contents
    return {"path": str(path), "seconds": built, "reuse_seconds": reused, "after_imports_mb": imported, "peak_rss_mb": peak_rss_mb()}


def step_cache(args) -> dict:
    from mpnn.data.cache import CachedDataset, prefetch
    from mpnn.data.graphs import iterate_batches

    imported = rss_mb()
    start = time.perf_counter()
    dataset = CachedDataset(args.cache)
    opened = time.perf_counter() - start
    result = {"load_seconds": opened, "after_imports_mb": imported}
    result["prefetch"] = epoch(prefetch(iterate_batches(dataset, args.batch_size, shuffle=True, seed=1), size=4), len(dataset))
    result["plain"] = epoch(iterate_batches(dataset, args.batch_size, shuffle=True, seed=2), len(dataset))
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def step_memory(args) -> dict:
    from mpnn.data.cache import source_files
    from mpnn.data.frames import read_frames, validate_frame
    from mpnn.data.graphs import frame_to_graph, iterate_batches

    imported = rss_mb()
    start = time.perf_counter()
    frames = [frame for path in source_files(args.data) for frame in read_frames(path)]
    numbers = sorted({int(z) for frame in frames for z in frame.numbers})
    for frame in frames:  # as load_splits does on every run
        validate_frame(frame, need_energy=True, need_forces=True, known_numbers=numbers, min_distance=0.5)
    species_index = {z: k for k, z in enumerate(numbers)}
    graphs = [frame_to_graph(frame, args.cutoff, species_index) for frame in frames]
    result = {"load_seconds": time.perf_counter() - start, "after_imports_mb": imported}
    del frames  # training keeps the frames too (statistics); the peak includes them anyway
    result["plain"] = epoch(iterate_batches(graphs, args.batch_size, shuffle=True, seed=1), len(graphs))
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def step_train(args) -> dict:
    """Training steps/s of a small NequIP (configs/default.yaml with 2 layers of 16
    channels: a fast step, so that loading shows) reading batches from
    the cache (`--cache-dir`) or from graphs in memory: setup, then `--steps` steps as
    the training loop takes them (prefetch thread, padding, transfer, jitted step)."""
    import jax
    from mpnn.config import load_config, loss_weights
    from mpnn.data.cache import prefetch
    from mpnn.training.loop import setup

    overrides = [f"data.train={args.data}", f"model.cutoff={args.cutoff}", "model.num_layers=2", "model.num_features=16", f"train.batch_size={args.batch_size}", "train.progress=false",
                 "data.valid_fraction=0.01", "data.test_fraction=0.01"]
    if args.cache_dir:
        overrides.append(f"data.cache_dir={args.cache_dir}")
    start = time.perf_counter()
    s = setup(load_config(Path(__file__).resolve().parents[1] / "configs" / "default.yaml", overrides))
    prepared = time.perf_counter() - start
    dtype = s.potential.np_dtype
    weights = {k: np.asarray(v, dtype) for k, v in loss_weights(s.config.train, 1).items()}
    plan, state = s.plan(1), s.state
    batches = prefetch(((step, *s.batch(step)) for step in plan[: args.steps + 1]), size=2)
    _, batch, _ = next(batches)
    state, loss, _ = s.train_step(state, batch, np.ones((), dtype), weights)  # compile
    jax.block_until_ready(loss)
    start = time.perf_counter()
    for _, batch, _ in batches:
        state, loss, _ = s.train_step(state, batch, np.ones((), dtype), weights)
    jax.block_until_ready(loss)
    return {"setup_seconds": prepared, "steps_per_s": args.steps / (time.perf_counter() - start), "peak_rss_mb": peak_rss_mb()}


def run_step(step: str, **options) -> dict:
    command = [sys.executable, __file__, "--step", step] + [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def size_mb(paths) -> float:
    return sum(os.path.getsize(p) for p in paths) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cutoff", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="keep data and cache here (default: a temporary folder, removed)")
    parser.add_argument("--train-steps", type=int, default=50, help="training steps timed per path (0: skip)")
    parser.add_argument("--step", choices=["build", "cache", "memory", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=50, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps({"build": step_build, "cache": step_cache, "memory": step_memory, "train": step_train}[args.step](args)))
        return

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mpnn-data-loader-"))
    try:
        start = time.perf_counter()
        files = generate(workdir, args.frames, args.files, args.seed)
        generated = time.perf_counter() - start
        data = str(workdir / "data")
        common = dict(data=data, cutoff=args.cutoff, batch_size=args.batch_size)
        shutil.rmtree(workdir / "cache", ignore_errors=True)  # a fresh build, not a reuse
        build = run_step("build", cache_dir=workdir / "cache", **common)
        cache = run_step("cache", cache=build["path"], **common)
        memory = run_step("memory", **common)
        if args.train_steps:
            trained = {
                "cache": run_step("train", cache_dir=workdir / "cache", steps=args.train_steps, **common),
                "memory": run_step("train", steps=args.train_steps, **common),
            }
        xyz_mb, cache_mb = size_mb(files), size_mb([build["path"]])
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"{args.frames} frames in {args.files} extxyz files: {xyz_mb:.1f} MiB (generated in {generated:.1f} s); "
          f"cache file {cache_mb:.1f} MiB; batch size {args.batch_size}, cutoff {args.cutoff} Å; one shuffled epoch per row")
    rows = [
        ("build cache (stream, validate, neighbors, write)", f"{build['seconds']:.1f} s", "", "", f"{build['peak_rss_mb']:.0f}",
         f"{build['after_imports_mb']:.0f}"),
        ("build again (reused: hashes the files)", f"{build['reuse_seconds']:.1f} s", "", "", "", ""),
        ("cache + prefetch", f"{cache['load_seconds']:.2f} s open", f"{cache['prefetch']['frames_per_s']:.0f}",
         f"{cache['prefetch']['batches_per_s']:.1f}", f"{cache['peak_rss_mb']:.0f}", f"{cache['after_imports_mb']:.0f}"),
        ("cache, no prefetch", "", f"{cache['plain']['frames_per_s']:.0f}", f"{cache['plain']['batches_per_s']:.1f}", "", ""),
        ("memory (read, validate, frame_to_graph: as now)", f"{memory['load_seconds']:.1f} s load", f"{memory['plain']['frames_per_s']:.0f}",
         f"{memory['plain']['batches_per_s']:.1f}", f"{memory['peak_rss_mb']:.0f}", f"{memory['after_imports_mb']:.0f}"),
    ]
    if args.train_steps:
        for name, result in trained.items():
            rows.append((f"train steps, NequIP 2x16 ({name})", f"{result['setup_seconds']:.1f} s setup", "",
                         f"{result['steps_per_s']:.2f} steps/s", f"{result['peak_rss_mb']:.0f}", ""))
    header = ("path", "preprocess / load", "frames/s", "batches/s", "peak RSS MiB", "after imports MiB")
    widths = [max(len(str(r[k])) for r in [header, *rows]) for k in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(str(c).ljust(w) for c, w in zip(row, widths)))


if __name__ == "__main__":
    main()
