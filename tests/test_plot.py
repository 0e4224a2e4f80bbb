"""Watching a run: per-frame predictions (`mpnn.evaluate.predictions`), TensorBoard
scalars (`mpnn.training.tensorboard`) and figures (`mpnn.plot`), on one tiny training run
made in-process (module-scoped)."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import mpnn
import mpnn.plot
from mpnn.data.dataset import load_splits
from mpnn.data.frames import read_frames
from mpnn.data.graphs import fixed_batch_shape, frame_to_graph
from mpnn.evaluate import PREDICTION_SHAPES, predictions, save_predictions
from mpnn.plot import plot_run, run_predictions
from mpnn.training.loop import train
from mpnn.training.tensorboard import MetricsWriter, scalar_tag
from tests.conftest import tiny_train_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ["learning_curves.png", "parity_energy.png", "parity_forces.png", "parity_stress.png"]
BATCH = 4  # with `shape`, every prediction below runs one compiled program


@pytest.fixture(scope="module")
def run_dir(cu_file, tmp_path_factory) -> Path:
    """A finished 2-epoch run of a 1-layer, invariant (l_max 0: compiles fastest) NequIP on
    EMT Cu (energy, forces, stress labels)."""
    run = tmp_path_factory.mktemp("plot") / "run"
    train(tiny_train_config(cu_file, run, **{"train.max_epochs": 2, "model.num_layers": 1, "model.l_max": 0}))
    return run


@pytest.fixture(scope="module")
def potential(run_dir) -> mpnn.Potential:
    return mpnn.load(run_dir / "model")


@pytest.fixture(scope="module")
def shape(potential, cu_file) -> tuple[int, int]:
    """(n_node, n_edge) that fits any BATCH frames of the data set."""
    graphs = [frame_to_graph(f, potential.cutoff, potential.species_index) for f in read_frames(cu_file)]
    return fixed_batch_shape(graphs, BATCH)


def copy_run(run_dir: Path, to: Path) -> Path:
    """What plotting reads of a run (no checkpoints; no test_predictions.npz)."""
    shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns("checkpoints", "test_predictions.npz", "tensorboard"))
    return to


def test_predictions_agree_with_predict_and_respect_missing_labels(potential, shape, cu_file, tmp_path):
    frames = read_frames(cu_file)[:6]
    frames[1] = dataclasses.replace(frames[1], forces=None, stress=None)  # labels missing: left out
    frames[2] = dataclasses.replace(frames[2], energy=None)
    graphs = [frame_to_graph(f, potential.cutoff, potential.species_index) for f in frames]
    values = predictions(potential, graphs, BATCH, shape)  # two batches, the last part-filled
    direct = potential.predict(frames, BATCH, shape)

    assert {k: v.shape[1:] for k, v in values.items()} == PREDICTION_SHAPES
    energy_frames = [0, 1, 3, 4, 5]
    force_frames = [0, 2, 3, 4, 5]
    n_atoms = np.array([frames[i].n_atom for i in energy_frames])
    np.testing.assert_array_equal(values["n_atoms"], n_atoms)
    np.testing.assert_allclose(values["energy_ref"], [frames[i].energy for i in energy_frames] / n_atoms, rtol=1e-12)
    np.testing.assert_allclose(values["energy_pred"], [direct[i]["energy"] for i in energy_frames] / n_atoms, rtol=1e-6)
    np.testing.assert_allclose(values["forces_ref"], np.concatenate([frames[i].forces for i in force_frames]), rtol=1e-12)
    np.testing.assert_allclose(
        values["forces_pred"], np.concatenate([direct[i]["forces"] for i in force_frames]), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(values["stress_ref"], [frames[i].stress for i in force_frames], rtol=1e-12)
    np.testing.assert_allclose(values["stress_pred"], [direct[i]["stress"] for i in force_frames], rtol=1e-5, atol=1e-7)
    assert all(v.dtype == (np.int64 if k == "n_atoms" else np.float64) for k, v in values.items())

    # The .npz round-trips, and no temporary file is left beside it.
    path = save_predictions(tmp_path / "p.npz", potential, graphs, BATCH, shape)
    with np.load(path) as saved:
        assert sorted(saved.files) == sorted(values)
        for k, v in values.items():
            np.testing.assert_array_equal(saved[k], v)
    assert [p.name for p in tmp_path.iterdir()] == ["p.npz"]

    # A set without stress labels (molecules) gives empty stress arrays of the right shape.
    no_stress = predictions(potential, graphs[1:2], BATCH, shape)
    assert no_stress["stress_ref"].shape == (0, 3, 3) and no_stress["forces_pred"].shape == (0, 3)


def read_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the event files in `log_dir` (TensorBoard's reader if
    installed; otherwise the TFRecord framing read here, events parsed by tensorboardX's protobufs)."""
    try:
        from tensorboard.backend.event_processing import event_accumulator
    except ImportError:
        from tensorboardX.proto import event_pb2

        scalars: dict[str, dict[int, float]] = {}
        for path in sorted(log_dir.glob("events.out.tfevents.*")):
            data, pos = path.read_bytes(), 0
            while pos < len(data):  # record: u64 length, u32 crc, payload, u32 crc
                (length,) = struct.unpack("<Q", data[pos : pos + 8])
                event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
                pos += 12 + length + 4
                for value in event.summary.value:
                    scalars.setdefault(value.tag, {})[event.step] = value.simple_value
        return scalars
    accumulator = event_accumulator.EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {tag: {e.step: e.value for e in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]}


def test_metrics_writer_logs_the_finite_values_of_metrics_rows(run_dir, tmp_path):
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))  # values as strings, "" for absent metrics
    with MetricsWriter(tmp_path) as writer:
        for row in rows[:2]:
            writer.write(row, step=int(row["step"]))
    writer = MetricsWriter(tmp_path, purge_step=int(rows[2]["step"]))  # a resumed run: a new event file
    writer.write({**rows[2], "grad_norm": 0.25}, step=int(rows[2]["step"]))  # a number, not a string
    writer.close()

    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    scalars = read_scalars(tmp_path / "tensorboard")
    steps = [int(r["step"]) for r in rows]
    assert scalar_tag("valid_forces_mae_mev_A") == "valid/forces_mae_mev_A" and scalar_tag("padding_nodes") == "padding/nodes"
    for column in ("valid_forces_mae_mev_A", "valid_energy_rmse_mev_atom", "valid_stress_mae_mev_A3", "lr", "epoch_train_s", "n_compiles"):
        tag = scalar_tag(column)
        assert scalars[tag] == pytest.approx({s: float(r[column]) for s, r in zip(steps, rows)}, rel=1e-6), tag
    assert scalars["train/loss"] == pytest.approx({s: float(r["train_loss"]) for s, r in zip(steps[1:], rows[1:])}, rel=1e-6)
    assert scalars["time/epoch_train_s"] and scalars["time/elapsed_s"]
    assert scalars["grad_norm"] == pytest.approx({steps[2]: 0.25})
    assert "valid/dipole_mae_me_A" not in scalars  # empty string: no label, no scalar
    assert "step" not in scalars


def assert_test_errors(values: dict[str, np.ndarray], run: Path) -> None:
    """`values` are predictions of the training's test split by its best model: their
    errors are those of results.json."""
    results = json.loads((run / "results.json").read_text())["test"]
    assert len(values["energy_ref"]) == results["n_frames"]
    for key, unit in (("energy", "mev_atom"), ("forces", "mev_A"), ("stress", "mev_A3")):
        error = values[f"{key}_pred"] - values[f"{key}_ref"]
        assert 1000 * np.mean(np.abs(error)) == pytest.approx(results[f"{key}_mae_{unit}"], rel=1e-4), key
        assert 1000 * np.sqrt(np.mean(error**2)) == pytest.approx(results[f"{key}_rmse_{unit}"], rel=1e-4), key


def assert_pngs(paths: list[Path], folder: Path, names: list[str]) -> None:
    assert paths == [folder / name for name in names]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


def test_plot_run_with_saved_test_predictions(run_dir, potential, shape, tmp_path):
    run = copy_run(run_dir, tmp_path / "run")
    config = mpnn.load_config(run / "config.yaml")
    test_frames = load_splits(config.data, config.train).test
    test_graphs = [frame_to_graph(f, potential.cutoff, potential.species_index) for f in test_frames]
    save_predictions(run / "test_predictions.npz", potential, test_graphs, BATCH, shape)  # as train() will at the end
    values, split = run_predictions(run)
    assert split == "test"
    assert_test_errors(values, run)
    assert_pngs(plot_run(run), run / "plots", FIGURES)


def test_plot_run_without_saved_predictions_recomputes_the_test_set(run_dir, tmp_path, monkeypatch, capsys):
    run = copy_run(run_dir, tmp_path / "run")
    computed = []

    def recorded_predictions(*args):
        computed.append(predictions(*args))
        return computed[-1]

    monkeypatch.setattr(mpnn.plot, "predictions", recorded_predictions)
    assert_pngs(plot_run(run, tmp_path / "figures"), tmp_path / "figures", FIGURES)
    assert_test_errors(computed[0], run)  # the model of RUN/model on the frames of the test split

    # No model yet (a run in its first epoch): learning curves only, and a message why.
    shutil.rmtree(run / "model")
    assert_pngs(plot_run(run), run / "plots", FIGURES[:1])
    assert "no parity plots" in capsys.readouterr().err


def test_plot_cli_prints_the_paths(run_dir, tmp_path, capsys):
    from mpnn.plot import main

    run = copy_run(run_dir, tmp_path / "run")
    shutil.rmtree(run / "model")  # learning curves alone: no model to compile
    assert main([str(run), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "out" / "learning_curves.png")]
