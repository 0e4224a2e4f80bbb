"""Errors of a potential on labelled data.

    python -m mpnn.evaluate --model RUN/model --data FILE.xyz [--json OUT] [--batch-size N]

prints and writes energy (meV/atom), force (meV/Å) and stress (meV/Å³) MAE and RMSE, and
for models with learned charges the dipole (me·Å) and charge (me) errors where labelled.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import jax
import jraph

from mpnn.data.frames import read_frames, validate_frame
from mpnn.data.graphs import frame_to_graph, iterate_batches
from mpnn.potential import CountedJit, Potential, cast_graph, energy_and_derivatives, graph_cells
from mpnn.training.loss import error_sums, summarise


def make_error_fn(potential: Potential):
    """Jitted (variables, graph) → error sums, for evaluating any parameters of this model."""

    def errors(variables, graph):
        return error_sums(energy_and_derivatives(potential, variables, graph), graph)

    return CountedJit(errors)


def evaluate_graphs(
    potential: Potential,
    graphs: Sequence[jraph.GraphsTuple],
    batch_size: int = 32,
    variables: dict | None = None,
    error_fn=None,
    shape: tuple[int, int] | None = None,
) -> dict:
    """Metrics (see `mpnn.training.loss.METRICS`) over `graphs`, plus n_frames.

    `shape`: fixed (n_node, n_edge) padding for every batch (default: bucketed per batch)."""
    if error_fn is None:
        potential = potential.covering(graph_cells(graphs))
        error_fn = make_error_fn(potential)
    variables = potential.variables if variables is None else variables
    totals: dict[str, float] = {}
    for batch in iterate_batches(graphs, batch_size, shape=shape):
        sums = jax.device_get(error_fn(variables, cast_graph(batch, potential.np_dtype)))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return summarise(totals, len(graphs))


def evaluate_file(potential: Potential, path: str, batch_size: int = 32, keys: dict | None = None) -> dict:
    frames = read_frames(path, **(keys or {}))
    for frame in frames:
        validate_frame(frame, need_energy=False, need_forces=False, known_numbers=potential.numbers, min_distance=0.0)
    graphs = [frame_to_graph(f, potential.cutoff, potential.species_index) for f in frames]
    return evaluate_graphs(potential, graphs, batch_size)


def format_metrics(metrics: dict) -> str:
    def fmt(x):
        return "n/a" if x is None else f"{x:.3f}"

    text = (
        f"E MAE {fmt(metrics['energy_mae_mev_atom'])} / RMSE {fmt(metrics['energy_rmse_mev_atom'])} meV/atom | "
        f"F MAE {fmt(metrics['forces_mae_mev_A'])} / RMSE {fmt(metrics['forces_rmse_mev_A'])} meV/Å | "
        f"σ MAE {fmt(metrics['stress_mae_mev_A3'])} / RMSE {fmt(metrics['stress_rmse_mev_A3'])} meV/Å³ "
    )
    if metrics.get("dipole_mae_me_A") is not None:
        text += f"| dipole MAE {fmt(metrics['dipole_mae_me_A'])} me·Å "
    if metrics.get("charges_mae_me") is not None:
        text += f"| q MAE {fmt(metrics['charges_mae_me'])} me "
    return text + f"({metrics['n_frames']} frames)"


def main(argv: Sequence[str] | None = None) -> int:
    from mpnn.saved_model import load_model

    parser = argparse.ArgumentParser(prog="python -m mpnn.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder (RUN/model)")
    parser.add_argument("--data", required=True, help="labelled file readable by ase.io.read")
    parser.add_argument("--json", help="write the metrics as one flat JSON object here")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", choices=["float32", "float64"], help="override the saved dtype")
    args = parser.parse_args(argv)

    potential = load_model(args.model, dtype=args.dtype, set_precision=True)
    data = potential.config.data
    keys = dict(energy_key=data.energy_key, forces_key=data.forces_key, stress_key=data.stress_key, virial_key=data.virial_key)
    metrics = evaluate_file(potential, args.data, args.batch_size, keys)
    print(format_metrics(metrics))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
