"""MD speed of a potential on fcc Cu: jax-md (`mpnn.md.run_md`) vs the ASE calculator.

    python benchmarks/md_speed.py                        # default architecture, random weights, 108 and 864 atoms
    python benchmarks/md_speed.py --model RUN/model      # a trained Cu model
    python benchmarks/md_speed.py --sizes 108 --steps-jaxmd 200 --steps-ase 50 --dtype float64

Prints, per system and engine: compilation time (first call: tracing + XLA compile,
measured separately), then steps/s and µs/atom/step over the timed steps only.

"The default model" is the architecture of configs/default.yaml
(NequIP, 3 layers, 32 features, l_max 2, cutoff 5 Å, float32) initialised for Cu with
random weights: speed does not depend on the weight values. NVE at 300 K, 2 fs steps.
jax-md: neighbor list rebuilt every step on device, steps in a jitted while-loop.
ASE: VelocityVerlet, host neighbor list (vesin) and padding each step, one device call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np
from ase import units
from ase.build import bulk
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet


def default_cu_potential(dtype: str, atoms):
    from mpnn.config import load_config
    from mpnn.data.frames import Frame
    from mpnn.data.graphs import frame_to_graph
    from mpnn.data.statistics import average_num_neighbors
    from mpnn.potential import build_potential

    config = load_config("configs/default.yaml", [f"model.dtype={dtype}"])
    graph = frame_to_graph(Frame.from_atoms(atoms), config.model.cutoff, {29: 0})
    # Small scale keeps random-weight forces gentle; E0 = EMT-like cohesive reference.
    return build_potential(config.model, [29], average_num_neighbors([graph]), e0=[-3.5], scale=0.05, seed=0, config=config)


def bench_jaxmd(potential, atoms, steps: int) -> dict:
    from mpnn.md import run_md

    run = run_md(
        potential, atoms, ensemble="nve", temperature=300.0, timestep=2.0, steps=steps,
        log_every=steps, write_every=steps, progress=False,
    )
    # Chunks that recompiled after a neighbor-list reallocation are counted as compile time.
    timed = round(run.steps_per_s * run.run_s) if run.run_s > 0 else 0
    return {"compile_s": run.compile_s, "steps": timed, "run_s": run.run_s, "reallocations": run.n_reallocations}


def bench_ase(potential, atoms, steps: int) -> dict:
    from mpnn.calculators.ase import MPNNCalculator

    atoms = atoms.copy()
    atoms.calc = MPNNCalculator(potential)
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    start = time.perf_counter()
    atoms.get_forces()  # compiles
    compile_s = time.perf_counter() - start
    dyn = VelocityVerlet(atoms, 2.0 * units.fs)
    dyn.run(1)  # a step whose shapes may differ slightly (grow-only buckets) before timing
    start = time.perf_counter()
    dyn.run(steps)
    return {"compile_s": compile_s, "steps": steps, "run_s": time.perf_counter() - start}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="saved model folder (default: default architecture, random weights)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--sizes", default="108,864", help="numbers of atoms: 4·n³ (108 = 3³ cells, 864 = 6³)")
    parser.add_argument("--steps-jaxmd", default="100,10", help="timed steps per size (comma list or one value)")
    parser.add_argument("--steps-ase", default="30,5", help="timed steps per size (comma list or one value)")
    parser.add_argument("--engines", default="jaxmd,ase")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)

    sizes = [int(x) for x in args.sizes.split(",")]

    def per_size(text):
        values = [int(x) for x in text.split(",")]
        return values if len(values) == len(sizes) else values[:1] * len(sizes)

    steps = {"jaxmd": per_size(args.steps_jaxmd), "ase": per_size(args.steps_ase)}
    engines = args.engines.split(",")
    print(
        f"# jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    rows = []
    for k, n_atom in enumerate(sizes):
        reps = round((n_atom / 4) ** (1 / 3))
        if 4 * reps**3 != n_atom:
            raise SystemExit(f"--sizes: {n_atom} is not 4·n³")
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(reps)
        # Off the perfect lattice, whose atoms sit exactly on cell-list boundaries (the
        # first steps would overflow a cell and reallocate: correct, but a recompilation).
        atoms.rattle(0.05, seed=0)
        if args.model:
            from mpnn.saved_model import load_model

            potential = load_model(args.model, dtype=args.dtype)
        else:
            potential = default_cu_potential(args.dtype, atoms)
        for engine in engines:
            result = (bench_jaxmd if engine == "jaxmd" else bench_ase)(potential, atoms, steps[engine][k])
            steps_per_s = result["steps"] / result["run_s"]
            row = {"n_atom": n_atom, "engine": engine, **result, "steps_per_s": steps_per_s, "us_per_atom_step": 1e6 / (steps_per_s * n_atom)}
            rows.append(row)
            print(
                f"{n_atom:5d} atoms  {engine:6s}  compile {result['compile_s']:6.1f} s   {result['steps']:4d} steps "
                f"in {result['run_s']:7.2f} s   {steps_per_s:8.2f} steps/s   {row['us_per_atom_step']:8.1f} µs/atom/step",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
