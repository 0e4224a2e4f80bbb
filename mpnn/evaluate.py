"""Errors of a potential on labelled data.

    python -m mpnn.evaluate --model RUN/model --data FILE.xyz [--json OUT] [--batch-size N]

prints and writes energy (meV/atom), force (meV/Å) and stress (meV/Å³) MAE and RMSE, and
for models with learned charges the dipole (me·Å) and charge (me) errors where labelled.
`predictions` / `save_predictions` give the reference and predicted values themselves
(parity plots: `mpnn.plot`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import jax
import jraph
import numpy as np

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
    return summarise(error_totals(potential, graphs, batch_size, variables, error_fn, shape), len(graphs))


def error_totals(
    potential: Potential,
    graphs: Sequence[jraph.GraphsTuple],
    batch_size: int = 32,
    variables: dict | None = None,
    error_fn=None,
    shape: tuple[int, int] | None = None,
) -> dict[str, float]:
    """Error sums (`mpnn.training.loss.error_sums`) over `graphs`: they add up across
    processes that each evaluate a share of a set."""
    if error_fn is None:
        potential = potential.covering(graph_cells(graphs))
        error_fn = make_error_fn(potential)
    variables = potential.variables if variables is None else variables
    totals: dict[str, float] = {}
    for batch in iterate_batches(graphs, batch_size, shape=shape):
        sums = jax.device_get(error_fn(variables, cast_graph(batch, potential.np_dtype)))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return totals


def evaluate_file(potential: Potential, path: str, batch_size: int = 32, keys: dict | None = None) -> dict:
    frames = read_frames(path, **(keys or {}))
    for frame in frames:
        validate_frame(frame, need_energy=False, need_forces=False, known_numbers=potential.numbers, min_distance=0.0)
    graphs = [frame_to_graph(f, potential.cutoff, potential.species_index) for f in frames]
    return evaluate_graphs(potential, graphs, batch_size)


# key of `predictions` → shape of one entry
PREDICTION_SHAPES = {
    "energy_ref": (), "energy_pred": (), "n_atoms": (),
    "forces_ref": (3,), "forces_pred": (3,),
    "stress_ref": (3, 3), "stress_pred": (3, 3),
}


def predictions(
    potential: Potential, graphs: Sequence[jraph.GraphsTuple], batch_size: int = 32, shape: tuple[int, int] | None = None
) -> dict[str, np.ndarray]:
    """Reference and predicted values of `graphs` where labelled, in the order of `graphs`:

        energy_ref, energy_pred [n_e] eV/atom, n_atoms [n_e]  frames with an energy label
        forces_ref, forces_pred [n_f, 3] eV/Å                  atoms of frames with forces
        stress_ref, stress_pred [n_s, 3, 3] eV/Å³              frames with a stress label

    float64 (n_atoms int64); empty arrays where no frame has the label. Their MAE and
    RMSE are those of `evaluate_graphs` (in meV). Batching and padding as there.
    """
    potential = potential.covering(graph_cells(graphs))
    parts: dict[str, list[np.ndarray]] = {k: [np.zeros((0, *s))] for k, s in PREDICTION_SHAPES.items()}
    for batch in iterate_batches(graphs, batch_size, shape=shape):
        labels = batch.globals  # weights: 0 where a label is missing and on the padding graph
        n_atoms = np.asarray(batch.n_node)
        node_graph = np.repeat(np.arange(len(n_atoms)), n_atoms)
        has_energy = labels["weight_energy"] > 0
        has_forces = (labels["weight_forces"][node_graph] > 0) & batch.nodes["mask"]
        has_stress = labels["weight_stress"] > 0
        out = jax.device_get(potential.predict_graph(batch, virials=bool(has_stress.any())))
        parts["n_atoms"].append(n_atoms[has_energy])
        parts["energy_ref"].append(labels["energy"][has_energy] / n_atoms[has_energy])
        parts["energy_pred"].append(np.asarray(out["energy"], np.float64)[has_energy] / n_atoms[has_energy])
        parts["forces_ref"].append(batch.nodes["forces"][has_forces])
        parts["forces_pred"].append(np.asarray(out["forces"])[has_forces])
        parts["stress_ref"].append(labels["stress"][has_stress])
        parts["stress_pred"].append(np.asarray(out["stress"])[has_stress] if has_stress.any() else np.zeros((0, 3, 3)))
    return {k: np.concatenate(v).astype(np.int64 if k == "n_atoms" else np.float64) for k, v in parts.items()}


def save_predictions(
    path: str | Path,
    potential: Potential,
    graphs: Sequence[jraph.GraphsTuple],
    batch_size: int = 32,
    shape: tuple[int, int] | None = None,
) -> Path:
    """Write `predictions(potential, graphs, batch_size, shape)` to the .npz file `path`
    atomically (a reader sees the old file or the new one, never a part); returns `path`."""
    path = Path(path)
    values = predictions(potential, graphs, batch_size, shape)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder: os.replace is atomic
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **values)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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
    from mpnn.host_memory import keep_freed_memory

    keep_freed_memory()  # before the first computation: this entry point owns its process

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
