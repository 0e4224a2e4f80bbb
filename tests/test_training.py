"""End to end: `python train.py` on a tiny EMT Cu set, resume, the saved model, the
evaluate CLI and the ASE calculator. One training run (module-scoped) feeds most tests."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import ase.io
import jax
import numpy as np
import pytest
import yaml
from ase.build import bulk

import mpnn
from mpnn.config import save_config
from mpnn.saved_model import ModelFileError
from tests.conftest import tiny_train_config

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 20


def run_train(config_path: Path, *extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(config_path), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained_run(cu_file, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    config_path = run_dir.parent / "config.yaml"
    save_config(tiny_train_config(cu_file, run_dir, **{"train.max_epochs": EPOCHS}), config_path)
    result = run_train(config_path)
    assert "valid:" in result.stdout and "test:" in result.stdout
    return run_dir


def test_run_folder_contents(trained_run):
    for name in ("config.yaml", "metrics.csv", "results.json", "model/params.msgpack", "model/metadata.json", "model/config.yaml"):
        assert (trained_run / name).exists(), name
    results = json.loads((trained_run / "results.json").read_text())
    for split in ("valid", "test"):
        for key in ("energy_mae_mev_atom", "forces_mae_mev_A", "stress_mae_mev_A3", "forces_rmse_mev_A"):
            assert np.isfinite(results[split][key])
    assert results["test"]["n_frames"] == 6
    assert yaml.safe_load((trained_run / "config.yaml").read_text())["train"]["max_epochs"] == EPOCHS


def test_training_fits_well_below_starting_error(trained_run):
    rows = read_metrics(trained_run)
    assert [int(r["epoch"]) for r in rows] == list(range(EPOCHS + 1))
    start = float(rows[0]["valid_forces_rmse_mev_A"])
    results = json.loads((trained_run / "results.json").read_text())
    assert results["valid"]["forces_rmse_mev_A"] < 0.5 * start
    assert results["valid"]["energy_rmse_mev_atom"] < float(rows[0]["valid_energy_rmse_mev_atom"])


def test_compiles_are_bounded(trained_run):
    """Every training batch has one padded shape and every evaluation batch another:
    one compilation each for the whole run (3- and 4-atom frames mixed)."""
    compiles = [int(r["n_compiles"]) for r in read_metrics(trained_run)]
    assert compiles[0] == 1  # evaluation of the untrained model
    assert compiles[1] == 1  # the training step
    assert sum(compiles[2:]) == 0


def test_resume_continues_the_same_trajectory(trained_run, tmp_path):
    """Simulate a run killed after epoch KILLED: drop later checkpoints, resume, compare."""
    killed = EPOCHS - 3
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["run"]["dir"] = str(copy)
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    killed_step = int(read_metrics(trained_run)[killed]["step"])  # checkpoints are numbered by step
    for step in (copy / "checkpoints").iterdir():
        if step.name.isdigit() and int(step.name) > killed_step:
            shutil.rmtree(step)
    run_train(copy / "config.yaml", "--resume")
    original, resumed = read_metrics(trained_run), read_metrics(copy)
    assert [r["epoch"] for r in resumed] == [r["epoch"] for r in original]
    for a, b in zip(original[killed + 1 :], resumed[killed + 1 :]):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-6)
        assert float(a["valid_forces_mae_mev_A"]) == pytest.approx(float(b["valid_forces_mae_mev_A"]), rel=1e-6)


def test_refuses_to_overwrite_a_run(trained_run):
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(trained_run / "config.yaml")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0 and "--resume" in result.stderr


def test_evaluate_cli_matches_results(trained_run, cu_file, tmp_path):
    out = tmp_path / "metrics.json"
    from mpnn.evaluate import main

    assert main(["--model", str(trained_run / "model"), "--data", cu_file, "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["n_frames"] == 48
    for key in ("energy_mae_mev_atom", "energy_rmse_mev_atom", "forces_mae_mev_A", "forces_rmse_mev_A", "stress_mae_mev_A3", "stress_rmse_mev_A3"):
        assert np.isfinite(metrics[key])


def test_loaded_model_calculator_and_predict_agree(trained_run, cu_file):
    potential = mpnn.load(trained_run / "model")
    atoms = ase.io.read(cu_file, index=0)
    reference = atoms.get_potential_energy()
    predicted = potential.predict([atoms])[0]
    calc_atoms = atoms.copy()
    calc_atoms.calc = mpnn.MPNNCalculator(trained_run / "model")
    assert calc_atoms.get_potential_energy() == pytest.approx(predicted["energy"], rel=1e-6)
    assert np.allclose(calc_atoms.get_forces(), predicted["forces"], atol=1e-5)
    assert calc_atoms.get_stress().shape == (6,)
    assert abs(predicted["energy"] - reference) / len(atoms) < 0.05  # trained: within 50 meV/atom
    # Loading twice gives bit-identical parameters.
    again = mpnn.load(trained_run / "model")
    import jax

    for a, b in zip(jax.tree_util.tree_leaves(potential.variables), jax.tree_util.tree_leaves(again.variables)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_corrupt_model_folders_give_clear_errors(trained_run, tmp_path):
    def broken_copy(name):
        path = tmp_path / name
        shutil.copytree(trained_run / "model", path)
        return path

    truncated = broken_copy("truncated")
    data = (truncated / "params.msgpack").read_bytes()
    (truncated / "params.msgpack").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="params.msgpack.*checksum"):
        mpnn.load(truncated)

    missing = broken_copy("missing")
    (missing / "metadata.json").unlink()
    with pytest.raises(ModelFileError, match="metadata.json"):
        mpnn.load(missing)

    mismatched = broken_copy("mismatched")
    config = yaml.safe_load((mismatched / "config.yaml").read_text())
    config["model"]["num_features"] = 7
    (mismatched / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ModelFileError, match="params.msgpack"):
        mpnn.load(mismatched)

    with pytest.raises(ModelFileError, match="not found"):
        mpnn.load(tmp_path / "nothing")


def test_calculator_md_compiles_few_programs(trained_run):
    from ase import units
    from ase.md.verlet import VelocityVerlet
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    atoms.calc = mpnn.MPNNCalculator(trained_run / "model")
    MaxwellBoltzmannDistribution(atoms, temperature_K=600, rng=np.random.default_rng(0))
    VelocityVerlet(atoms, 2 * units.fs).run(40)
    assert 1 <= atoms.calc.potential.n_compiles <= 3


def test_max_time_stops_mid_epoch_and_resume_continues(trained_run, cu_file, tmp_path):
    """max_time is checked after every step: max_time=0 stops after the first step, with a
    checkpoint, model/ and results; resuming finishes the run exactly as the uninterrupted
    one (the module's trained run, same config but for max_time)."""
    settings = {"train.max_epochs": EPOCHS}
    straight = trained_run
    stopped = tmp_path / "stopped"
    save_config(tiny_train_config(cu_file, stopped, **settings, **{"train.max_time": 0.0}), tmp_path / "stopped.yaml")
    result = run_train(tmp_path / "stopped.yaml")
    assert "stopped after 1 steps" in result.stderr
    assert (stopped / "model" / "params.msgpack").exists()
    assert json.loads((stopped / "results.json").read_text())["epochs"] == pytest.approx(1 / 9)
    assert [p.name for p in (stopped / "checkpoints").iterdir() if p.name.isdigit()] == ["1"]

    run_train(stopped / "config.yaml", "--resume", "train.max_time=null")
    a, b = read_metrics(straight), read_metrics(stopped)
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == [str(k) for k in range(EPOCHS + 1)]
    for x, y in zip(a[1:], b[1:]):
        assert float(x["valid_forces_mae_mev_A"]) == pytest.approx(float(y["valid_forces_mae_mev_A"]), rel=1e-6)
        assert int(x["step"]) == int(y["step"])


# --- training controls -------------------------------------------------------------------


def test_non_finite_steps_are_skipped_and_repeated_ones_stop_the_run(cu_file, tmp_path):
    import jax

    import jax.numpy as jnp

    from mpnn.config import loss_weights
    from mpnn.training import parallel
    from mpnn.training.loop import _check_bad_steps, setup

    s = setup(tiny_train_config(cu_file, tmp_path / "run"))
    batch, _ = s.batch(s.plan(1)[0])
    broken = jax.tree_util.tree_map(lambda x: np.array(x[0]), batch)  # the one device's part
    broken.nodes["positions"][0] = np.nan
    broken = parallel.global_batch([broken], s.mesh)
    one = np.ones((), s.potential.np_dtype)
    weights = {k: one * v for k, v in loss_weights(s.config.train, 1).items()}
    before = jax.tree_util.tree_map(np.asarray, s.state)
    state, loss, ok = s.train_step(s.state, broken, one, weights)
    assert not bool(ok) and not np.isfinite(float(loss))
    # Nothing moved (parameters, optimiser state, EMA), only the step count.
    for a, b in zip(jax.tree_util.tree_leaves(before.params), jax.tree_util.tree_leaves(state.params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    for a, b in zip(jax.tree_util.tree_leaves(before.opt_state), jax.tree_util.tree_leaves(state.opt_state)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert int(state.step) == int(before.step) + 1
    compiles = s.n_compiles
    _, doubled, _ = s.train_step(jax.tree_util.tree_map(jnp.array, state), batch, one, {k: 2 * w for k, w in weights.items()})
    state, loss, ok = s.train_step(state, batch, one, weights)
    assert bool(ok) and np.isfinite(float(loss))
    # Loss weights are arguments (stage two changes them): linear in them, no recompilation.
    assert float(doubled) == pytest.approx(2 * float(loss), rel=1e-10) and s.n_compiles == compiles
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree_util.tree_leaves(before.params), jax.tree_util.tree_leaves(state.params)))
    _check_bad_steps([True] + [False] * 9, epoch=1, max_bad=10)  # 9 in a row: go on
    with pytest.raises(FloatingPointError, match="10 consecutive steps"):
        _check_bad_steps([True] + [False] * 10, epoch=1, max_bad=10)


def test_plateau_schedule_and_early_stopping(cu_file, tmp_path):
    """With a learning rate too small to change anything, validation never improves: the
    plateau schedule halves the rate every epoch after the first stale one, and patience 3
    stops the run after epoch 4 of 20. (Huber loss on, to run that path too.)"""
    from mpnn.training.loop import train

    overrides = {
        "train.lr": 1e-12, "train.max_epochs": 20, "train.schedule": "plateau", "train.plateau_patience": 1,
        "train.patience": 3, "train.loss": "huber", "train.warmup_epochs": 0.0,
    }
    results = train(tiny_train_config(cu_file, tmp_path / "run", **overrides))
    rows = read_metrics(tmp_path / "run")
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3, 4] and results["epochs"] == 4
    lr = [float(r["lr"]) for r in rows[1:]]
    assert lr[0] == lr[1] == pytest.approx(1e-12) and lr[2] == pytest.approx(lr[1] / 2) and lr[3] == pytest.approx(lr[2] / 2)


def test_huber_loss_is_quadratic_inside_delta_and_linear_outside():
    import jax
    import jax.numpy as jnp

    from mpnn.training.loss import weighted_huber, weighted_mse

    small = jnp.array([0.001, -0.004, 0.009])
    weight = jnp.array([1.0, 2.0, 0.0])
    assert float(weighted_huber(small, weight, 0.01)) == pytest.approx(float(weighted_mse(small, weight)))
    slope = jax.grad(lambda e: weighted_huber(e, jnp.ones(1), 0.01))
    assert float(slope(jnp.array([5.0]))[0]) == pytest.approx(0.02)  # 2δ: an outlier pulls no harder than δ
    assert float(weighted_huber(jnp.array([1.0]), jnp.ones(1), 0.01)) == pytest.approx(2 * 0.01 - 0.01**2)


def test_fine_tuning_from_a_saved_model(trained_run, cu_file, tmp_path):
    """train.init_from: the saved model's architecture, elements and parameters; frozen
    parts stay exactly as saved, the rest trains; unknown elements and freeze prefixes
    are refused before anything compiles."""
    import ase
    from ase.calculators.singlepoint import SinglePointCalculator

    from mpnn.data.frames import DataError
    from mpnn.training.loop import setup, train

    base = mpnn.load(trained_run / "model")
    overrides = {
        "train.init_from": str(trained_run / "model"), "train.freeze": ["embedding", "layer_0"],
        "train.max_epochs": 2, "model.num_features": 8,  # the saved model's section wins
    }
    results = train(tiny_train_config(cu_file, tmp_path / "tuned", **overrides))
    assert np.isfinite(results["test"]["forces_mae_mev_A"])
    tuned = mpnn.load(tmp_path / "tuned" / "model")
    assert tuned.config.model.num_features == base.config.model.num_features
    old, new = base.variables["model"], tuned.variables["model"]
    for name in ("embedding", "layer_0"):
        for a, b in zip(jax.tree_util.tree_leaves(old[name]), jax.tree_util.tree_leaves(new[name])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree_util.tree_leaves(old["readout"]), jax.tree_util.tree_leaves(new["readout"]))
    )

    hydrogen = ase.Atoms("CuH", positions=[[0, 0, 0], [1.6, 0, 0]])
    hydrogen.calc = SinglePointCalculator(hydrogen, energy=-1.0, forces=np.zeros((2, 3)))
    ase.io.write(tmp_path / "with_h.xyz", [hydrogen] * 8)
    with pytest.raises(DataError, match="not known to the model"):
        setup(tiny_train_config(str(tmp_path / "with_h.xyz"), tmp_path / "h", **{"train.init_from": str(trained_run / "model")}))
    with pytest.raises(ValueError, match="match no parameter"):
        setup(tiny_train_config(cu_file, tmp_path / "x", **{"train.init_from": str(trained_run / "model"), "train.freeze": ["layer_9"]}))


def test_same_seed_same_run_and_stage_two(cu_file, tmp_path):
    """Two runs of one config (seed, data order, initialisation) give identical metrics and
    parameters. Both switch to stage-two loss weights and learning rate at epoch 2, with no
    recompilation."""
    from mpnn.config import ConfigError, loss_weights
    from mpnn.training.loop import train

    overrides = {
        "train.max_epochs": 2, "data.max_frames": 16, "train.stage_two_epoch": 2,
        "train.stage_two_weights": "{energy: 1000.0, forces: 1.0}", "train.stage_two_lr": 0.004,
    }
    runs = []
    for name in ("a", "b"):
        config = tiny_train_config(cu_file, tmp_path / name, **overrides)
        train(config)
        runs.append(tmp_path / name)
    a, b = read_metrics(runs[0]), read_metrics(runs[1])
    for x, y in zip(a, b):
        for key in x:
            if key not in ("time_s", "epoch_train_s"):
                assert x[key] == y[key], key
    assert int(a[2]["n_compiles"]) == 0  # stage two: same program
    assert float(a[1]["lr"]) == pytest.approx(0.02) and float(a[2]["lr"]) == pytest.approx(0.004)  # after the warm-up
    pa, pb = mpnn.load(runs[0] / "model").variables, mpnn.load(runs[1] / "model").variables
    for x, y in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert loss_weights(config.train, 1)["energy"] == 10.0 and loss_weights(config.train, 2)["energy"] == 1000.0
    with pytest.raises(ConfigError, match="stage_two_lr"):
        tiny_train_config(cu_file, tmp_path / "d", **{"train.stage_two_lr": 0.001})
    with pytest.raises(ConfigError, match="unknown key"):
        tiny_train_config(cu_file, tmp_path / "c", **{"train.stage_two_epoch": 2, "train.stage_two_weights": "{force: 1.0}"})
