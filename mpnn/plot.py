"""Figures of a training run, also while it runs.

    python -m mpnn.plot RUN [--out DIR]        (default DIR: RUN/plots)

writes PNGs and prints their paths:
    learning_curves.png  train loss, validation MAEs and learning rate per epoch (metrics.csv)
    parity_energy.png, parity_forces.png, parity_stress.png (when labelled)
                         predicted against reference values of the test set, y = x line,
                         MAE and RMSE in the title.

The parity data are RUN/test_predictions.npz, written at the end of training
(`mpnn.evaluate.save_predictions`). Before that (a run in progress) they are computed
from the best model so far (RUN/model) on the test split of RUN/config.yaml, or the
validation split when there is no test set. In a notebook: `plot_run(RUN)`.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from matplotlib.figure import Figure  # no pyplot: the Agg canvas, no global backend change
from matplotlib.ticker import MaxNLocator

from mpnn.config import load_config
from mpnn.data.dataset import load_splits
from mpnn.data.graphs import frame_to_graph
from mpnn.evaluate import predictions
from mpnn.saved_model import load_model

# (metrics.csv column, label) per panel of learning_curves.png
CURVES = {
    "train loss": [("train_loss", "train loss")],
    "validation MAE": [
        ("valid_energy_mae_mev_atom", "energy (meV/atom)"),
        ("valid_forces_mae_mev_A", "forces (meV/Å)"),
        ("valid_stress_mae_mev_A3", "stress (meV/Å³)"),
        ("valid_dipole_mae_me_A", "dipole (me·Å)"),
        ("valid_charges_mae_me", "charges (me)"),
    ],
    "learning rate": [("lr", "lr")],
}
# quantity of `mpnn.evaluate.predictions` → (unit of the values, unit of the errors = 1000×)
PARITY = {"energy": ("eV/atom", "meV/atom"), "forces": ("eV/Å", "meV/Å"), "stress": ("eV/Å³", "meV/Å³")}


def read_metrics(path: str | Path) -> dict[str, np.ndarray]:
    """metrics.csv → {column: float array [n_rows]}, NaN where empty. A row without an
    epoch (being written while the run goes on) is skipped."""
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if math.isfinite(_number(r.get("epoch")))]
    return {c: np.array([_number(r.get(c)) for r in rows]) for c in (list(rows[0]) if rows else [])}


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def plot_learning_curves(metrics: dict[str, np.ndarray], path: Path) -> Path | None:
    """Panels of CURVES against epoch, log y; columns absent or without positive values
    are left out. None (nothing written) when there is nothing to plot."""
    epoch = metrics.get("epoch")
    panels = {}
    for title, curves in CURVES.items():
        present = []
        for column, label in curves:
            y = metrics.get(column)
            if y is not None and np.any(np.isfinite(y) & (y > 0)):
                present.append((label, y))
        if present:
            panels[title] = present
    if epoch is None or not panels:
        return None
    fig = Figure(figsize=(6.4, 2.2 * len(panels) + 0.6), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (title, curves) in zip(axes, panels.items()):
        for label, y in curves:
            ok = np.isfinite(y) & (y > 0)  # epoch 0 has no train loss
            ax.plot(epoch[ok], y[ok], marker="o", markersize=3, label=label)
        ax.set_yscale("log")
        ax.set_ylabel(title)
        ax.grid(True, which="both", alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize="small")
    axes[-1].set_xlabel("epoch")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.savefig(path, dpi=120)
    return path


def plot_parity(values: dict[str, np.ndarray], quantity: str, split: str, path: Path) -> Path | None:
    """Predicted against reference `quantity` ("energy", "forces", "stress"; all
    components) of `predictions` output, y = x, MAE and RMSE in the title. None (nothing
    written) when the quantity has no labels."""
    unit, error_unit = PARITY[quantity]
    ref, pred = values[f"{quantity}_ref"].ravel(), values[f"{quantity}_pred"].ravel()
    if ref.size == 0:
        return None
    error = pred - ref
    mae, rmse = 1000 * np.mean(np.abs(error)), 1000 * np.sqrt(np.mean(error**2))
    fig = Figure(figsize=(4.8, 4.8), layout="constrained")
    ax = fig.subplots()
    ax.scatter(ref, pred, s=6 if ref.size < 2000 else 2, alpha=0.6, linewidths=0, rasterized=True)
    low, high = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
    pad = 0.05 * (high - low) or 1e-3
    ax.plot([low - pad, high + pad], [low - pad, high + pad], color="black", linewidth=0.8)
    ax.set_xlim(low - pad, high + pad)
    ax.set_ylim(low - pad, high + pad)
    ax.set_aspect("equal")
    ax.set_xlabel(f"reference {quantity} ({unit})")
    ax.set_ylabel(f"predicted {quantity} ({unit})")
    ax.set_title(f"{quantity}, {split} ({ref.size} values)\nMAE {mae:.3g}, RMSE {rmse:.3g} {error_unit}", fontsize="medium")
    fig.savefig(path, dpi=120)
    return path


def run_predictions(run_dir: str | Path) -> tuple[dict[str, np.ndarray] | None, str]:
    """(predictions, split name) of a run: RUN/test_predictions.npz if present, else
    computed with the best model so far on the test split of RUN/config.yaml (the
    validation split without a test set). (None, reason) when there are none."""
    run_dir = Path(run_dir)
    saved = run_dir / "test_predictions.npz"
    if saved.is_file():
        with np.load(saved) as data:
            return {k: data[k] for k in data.files}, "test"
    if not (run_dir / "model" / "metadata.json").is_file():
        return None, f"no {saved.name} and no model yet in {run_dir / 'model'}"
    # A float64 model in a 32-bit process predicts in float32: plenty for a figure.
    potential = load_model(run_dir / "model", dtype=None if jax.config.jax_enable_x64 else "float32")
    try:  # the same files, split and seed as training: the same frames
        config = load_config(run_dir / "config.yaml")
        splits = load_splits(config.data, config.train, known_numbers=list(potential.numbers))
    except (OSError, ValueError) as e:
        return None, f"cannot read the data of {run_dir / 'config.yaml'} ({e}); run from the folder training ran in"
    split, frames = ("test", splits.test) if splits.test else ("valid", splits.valid)
    if not frames:
        return None, "the run has no test or validation set"
    graphs = [frame_to_graph(f, potential.cutoff, potential.species_index) for f in frames]
    return predictions(potential, graphs, config.train.eval_batch_size), split


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the figures of a run folder to `out_dir` (default RUN/plots); returns the
    paths written. What cannot be plotted is said on stderr."""
    run_dir = Path(run_dir)
    out_dir = run_dir / "plots" if out_dir is None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if (run_dir / "metrics.csv").is_file():
        written.append(plot_learning_curves(read_metrics(run_dir / "metrics.csv"), out_dir / "learning_curves.png"))
    else:
        print(f"{run_dir / 'metrics.csv'}: not found; no learning curves", file=sys.stderr)
    values, split = run_predictions(run_dir)
    if values is None:
        print(f"no parity plots: {split}", file=sys.stderr)
    else:
        if split != "test":
            print(f"{run_dir}: no test set; parity plots of the {split} set", file=sys.stderr)
        for quantity in PARITY:
            written.append(plot_parity(values, quantity, split, out_dir / f"parity_{quantity}.png"))
    return [p for p in written if p is not None]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpnn.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run folder (holds metrics.csv, model/, config.yaml)")
    parser.add_argument("--out", help="folder for the PNGs (default RUN/plots)")
    args = parser.parse_args(argv)
    for path in plot_run(args.run, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
