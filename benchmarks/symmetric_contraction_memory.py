"""SymmetricContraction before/after: time and peak memory of forward + backward vs number of elements.

    python benchmarks/symmetric_contraction_memory.py
    python benchmarks/symmetric_contraction_memory.py --nodes 1000 --channels 16 --elements 1 4 --repeats 3

For each number of elements Z it jits f(x) = ∂/∂x Σ SymmetricContraction(x, species) (the force
backward of MACE's product basis; weights are arguments, not constants) and prints

- memory: XLA's compiled memory analysis (nothing is run): temp + arguments + output, MiB.
  "temp" is the peak of the intermediates with buffer reuse, i.e. what grows with the model.
- time: median of --repeats calls after one warm-up call, ms.
- the largest relative difference between the two outputs (same weights).

"old" is the implementation of git HEAD 1eab029 (one-hot over elements; copied below as
`OldSymmetricContraction`), "new" is mpnn.nn.SymmetricContraction.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mpnn.nn.symmetric_contraction import SymmetricContraction, symmetric_bases


def _contract_last(tensor: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """[n, C, d, ..., d, M] · [n, C, d] → [n, C, d, ..., M] (one tensor index fewer)."""
    return jnp.einsum("nc...im,nci->nc...m", tensor, x)


class OldSymmetricContraction(nn.Module):
    """mpnn/nn/symmetric_contraction.py at 1eab029: Horner's scheme, highest order through a
    one-hot over elements ([n_node, n_elements, C, d]), lower orders per_element[species]."""

    irreps_out: e3nn.Irreps
    correlation: int
    num_species: int

    @nn.compact
    def __call__(self, x: e3nn.IrrepsArray, species: jnp.ndarray) -> e3nn.IrrepsArray:
        if x.ndim != 3:
            raise ValueError(f"expected x of shape [n_node, channels, irreps.dim], got {x.shape}")
        num_channels = x.shape[1]
        irreps_in = str(x.irreps)
        one_hot = jax.nn.one_hot(species, self.num_species, dtype=x.dtype)  # [n, Z]
        # x of each node copied into the slot of its element: [n, Z, C, d].
        x_by_element = one_hot[:, :, None, None] * x.array[:, None, :, :]

        irreps_out = e3nn.Irreps(self.irreps_out)
        if any(mul != 1 for mul, _ in irreps_out):
            raise ValueError(f"irreps_out must have multiplicity 1 per irrep, got {irreps_out}")
        bases = {order: symmetric_bases(irreps_in, order, str(irreps_out)) for order in range(1, self.correlation + 1)}

        irreps, chunks = [], []
        for _, ir in irreps_out:
            out = None  # per node; on entering order ν it has ν open tensor indices
            for order in range(self.correlation, 0, -1):
                basis = bases[order].get(ir)
                if basis is None:
                    if out is not None:
                        out = _contract_last(out, x.array)
                    continue
                weights = self.param(
                    f"w{order}_{ir}",
                    nn.initializers.normal(stddev=basis.shape[-2] ** -0.5),
                    (self.num_species, basis.shape[-2], num_channels),
                )
                # T_ν per element: [Z, C, d^ν, M]
                per_element = jnp.einsum("...km,zkc->zc...m", jnp.asarray(basis, x.dtype), weights.astype(x.dtype))
                if out is None:
                    # Highest order: select the element and contract once, in one product.
                    out = jnp.einsum("zc...im,nzci->nc...m", per_element, x_by_element)
                else:
                    out = _contract_last(out + per_element[species], x.array)
            if out is not None:
                irreps.append(ir)
                chunks.append(out[:, :, None, :])  # [n, C, 1, M]
        return e3nn.from_chunks(e3nn.Irreps(irreps), chunks, (x.shape[0], num_channels), x.dtype)


def force_backward(module: nn.Module, irreps_in: e3nn.Irreps):
    """(params, x [n, C, d], species) → ∂ Σ out / ∂x, jitted."""

    def f(params, x, species):
        return jax.grad(lambda x: module.apply(params, e3nn.IrrepsArray(irreps_in, x), species).array.sum())(x)

    return jax.jit(f)


def measure(fn, args, repeats: int) -> tuple[float, dict[str, float]]:
    compiled = fn.lower(*args).compile()
    analysis = compiled.memory_analysis()
    mib = {
        "temp": analysis.temp_size_in_bytes / 2**20,
        "args": analysis.argument_size_in_bytes / 2**20,
        "out": analysis.output_size_in_bytes / 2**20,
    }
    mib["total"] = mib["temp"] + mib["args"] + mib["out"]
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, mib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--irreps-in", default="0e + 1o + 2e + 3o")
    parser.add_argument("--irreps-out", default="0e + 1o")
    parser.add_argument("--correlation", type=int, default=3)
    parser.add_argument("--elements", type=int, nargs="+", default=[1, 4, 89])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    irreps_in, irreps_out = e3nn.Irreps(args.irreps_in), e3nn.Irreps(args.irreps_out)
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {load[0]:.1f}, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}; float32\n"
        f"n_node={args.nodes}, C={args.channels}, {irreps_in} -> {irreps_out}, correlation {args.correlation}; "
        f"forward + backward (grad w.r.t. x)\n"
    )
    header = ("Z", "impl", "time ms", "temp MiB", "args MiB", "out MiB", "total MiB", "max rel diff")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (3, 4, 9, 9, 9, 8, 10, 13))))
    rng = np.random.default_rng(0)
    for num_species in args.elements:
        x = jnp.asarray(rng.normal(size=(args.nodes, args.channels, irreps_in.dim)), jnp.float32)
        species = jnp.asarray(rng.integers(0, num_species, args.nodes), jnp.int32)
        modules = {
            "old": OldSymmetricContraction(irreps_out, args.correlation, num_species),
            "new": SymmetricContraction(irreps_out, args.correlation, num_species),
        }
        params = modules["new"].init(jax.random.PRNGKey(0), e3nn.IrrepsArray(irreps_in, x[:2]), species[:2])
        outputs = {
            name: jax.jit(m.apply)(params, e3nn.IrrepsArray(irreps_in, x), species).array for name, m in modules.items()
        }
        diff = float(jnp.abs(outputs["new"] - outputs["old"]).max() / jnp.abs(outputs["old"]).max())
        for name, module in modules.items():
            ms, mib = measure(force_backward(module, irreps_in), (params, x, species), args.repeats)
            print(
                f"{num_species:>3} {name:>4} {ms:>9.1f} {mib['temp']:>9.1f} {mib['args']:>9.1f} {mib['out']:>8.1f} "
                f"{mib['total']:>10.1f} {diff if name == 'new' else float('nan'):>13.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
