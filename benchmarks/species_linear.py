"""SpeciesLinear (mpnn.nn.blocks): one dense product for all elements against e3nn-jax's
weight matrix gathered per node, the two routes in one process, interleaved.

    taskset -c 0 python benchmarks/species_linear.py            # the layer alone, 1–89 elements
    taskset -c 0 python benchmarks/species_linear.py --models   # E+F of NequIP / MACE (speed.py sizes)

The layer: NequIP's linear_down of the speed.py size (128x0e+192x1o → 128x0e+64x1o) on
320 nodes. The models: speed.py's HYPER on its workloads, E+F through the padding of
Potential.predict. Medians in ms, one XLA thread.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import mpnn.nn.blocks as blocks

ROUTES = {"gather": 0, "dense": 10**6}  # DENSE_MAX_SPECIES that forces each route


def median_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def layer(num_species: int, n_node: int = 320) -> dict[str, tuple[float, float]]:
    irreps_in, irreps_out = e3nn.Irreps("128x0e+192x1o"), e3nn.Irreps("128x0e+64x1o")
    species = jnp.asarray(np.random.default_rng(0).integers(0, num_species, n_node))
    x = e3nn.normal(irreps_in, jax.random.PRNGKey(1), (n_node,)).array
    out = {}
    for route, limit in ROUTES.items():
        blocks.DENSE_MAX_SPECIES = limit
        module = blocks.SpeciesLinear(irreps_out, num_species)
        params = module.init(jax.random.PRNGKey(0), species, e3nn.IrrepsArray(irreps_in, x))
        apply = lambda p, x: module.apply(p, species, e3nn.IrrepsArray(irreps_in, x)).array
        forward = jax.jit(apply)
        backward = jax.jit(jax.grad(lambda x, p: jnp.sum(apply(p, x) ** 2)))
        out[route] = (
            median_ms(lambda: jax.block_until_ready(forward(params, x))),
            median_ms(lambda: jax.block_until_ready(backward(x, params))),
        )
    return out


def models(rounds: int = 2) -> None:
    import speed
    from speed_impls import ours

    for model, workload in [("nequip", "ethanol32"), ("nequip", "water192"), ("nequip", "cu108"), ("mace", "ethanol32")]:
        structures = speed.workload(workload)
        times = {route: [] for route in ROUTES}
        for _ in range(rounds):
            for route, limit in ROUTES.items():
                blocks.DENSE_MAX_SPECIES = limit
                bench = ours.build(model, speed.HYPER, structures)
                times[route].append(median_ms(bench.energy_forces(structures), repeats=10))
        elements = len({int(z) for atoms in structures for z in atoms.numbers})
        print(f"| {model} E+F {workload} ({elements} elements) | "
              + " | ".join(" / ".join(f"{t:.1f}" for t in times[route]) for route in ROUTES) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", action="store_true", help="whole models instead of the layer")
    args = parser.parse_args()
    if args.models:
        print("| ms (each round) | gather (e3nn-jax) | dense (SpeciesLinear) |\n|---|---|---|")
        models()
        return
    print("| elements | gather fwd | gather fwd+grad | dense fwd | dense fwd+grad |\n|---:|---:|---:|---:|---:|")
    for num_species in (1, 3, 8, 16, 32, 89):
        r = layer(num_species)
        print(f"| {num_species} | {r['gather'][0]:.2f} | {r['gather'][1]:.2f} | {r['dense'][0]:.2f} | {r['dense'][1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
