"""Training at scale: batches split over devices and processes give the update of one
device on the same global batch; a killed 2-device run resumes; batching by size keeps
padding and the number of compiled programs small on frames of very different sizes.

Several CPU devices need XLA_FLAGS before JAX starts, so those runs are subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest

from mpnn.config import save_config
from mpnn.data.cache import build_cache
from mpnn.data.graphs import plan_steps
from tests.conftest import emt_cu_frames, tiny_train_config
from tests.test_training import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TWO_DEVICES = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
EPOCHS = 3


def run(args: list[str], env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env or dict(os.environ), capture_output=True, text=True, timeout=600, **kwargs)


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


# --- the plan of a step --------------------------------------------------------------------


def test_plan_by_count_splits_each_global_batch_over_devices():
    order = np.random.default_rng(0).permutation(10)
    sizes = np.ones(10, int)
    steps = plan_steps(sizes, sizes, order, n_devices=2, batch_size=4)
    assert [[len(part) for part in step] for step in steps] == [[2, 2], [2, 2], [2, 0]]
    one_device = plan_steps(sizes, sizes, order, n_devices=1, batch_size=4)
    assert [sum(step, []) for step in steps] == [step[0] for step in one_device]  # same global batches


def test_plan_by_size_respects_budgets_and_covers_every_frame_once():
    rng = np.random.default_rng(1)
    n_node = rng.choice([9, 200], size=300, p=[0.8, 0.2])
    n_edge = n_node * rng.integers(8, 40, size=300)
    order = rng.permutation(300)
    steps = plan_steps(n_node, n_edge, order, n_devices=2, max_nodes=1000, max_edges=20_000)
    batches = [batch for step in steps for batch in step]
    assert all(len(step) == 2 for step in steps)
    assert sorted(i for batch in batches for i in batch) == list(range(300))
    position = {int(i): k for k, i in enumerate(order)}
    assert all(np.all(np.diff([position[i] for i in batch]) > 0) for batch in batches)  # the shuffle's order
    fill = [max(n_node[batch].sum() / 1000, n_edge[batch].sum() / 20_000) for batch in batches if batch]
    assert np.mean(fill) > 0.9  # first fit leaves little room under the budget that binds
    for batch in batches:
        assert n_node[batch].sum() <= 1000 and n_edge[batch].sum() <= 20_000
    # A frame above a budget is not dropped: it gets a batch of its own.
    alone = plan_steps(np.array([5, 50, 5]), np.array([10, 10, 10]), np.arange(3), max_nodes=20)
    assert [step[0] for step in alone] == [[0, 2], [1]]


# --- devices and processes ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def config_path(cu_file, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scale") / "config.yaml"
    save_config(tiny_train_config(cu_file, path.parent / "unused", **{"train.max_epochs": EPOCHS}), path)
    return path


@pytest.fixture(scope="module")
def two_device_run(config_path) -> Path:
    run_dir = config_path.parent / "two_devices"
    result = check(run(["train.py", "--config", str(config_path), f"run.dir={run_dir}"], TWO_DEVICES))
    assert "2 device(s)" in result.stderr  # every local device by default, said in the log
    return run_dir


def test_one_step_on_two_devices_equals_one_device_on_the_global_batch(config_path):
    out = json.loads(check(run(["tests/one_step_on_two_devices.py", str(config_path)], TWO_DEVICES)).stdout.splitlines()[-1])
    assert out["graphs_per_device"] == [2, 2]
    assert out["params_sharding"] == "P()"  # parameters replicated
    assert out["loss_2"] == pytest.approx(out["loss_1"], rel=1e-6)
    # Adam's first moment holds the gradient: equal to float32 rounding (a device-local
    # normaliser or a missing gradient sum would make it differ by ~2×).
    assert out["first_moment_difference"] < 1e-5 * out["first_moment_size"]
    assert out["params_difference"] < 1e-3 * out["params_change"]


def test_two_device_run_reports_its_devices(two_device_run):
    results = json.loads((two_device_run / "results.json").read_text())
    assert results["n_devices"] == 2 and results["n_processes"] == 1
    rows = read_metrics(two_device_run)
    assert [int(r["epoch"]) for r in rows] == list(range(EPOCHS + 1))
    assert float(rows[-1]["valid_forces_mae_mev_A"]) < float(rows[0]["valid_forces_mae_mev_A"])


def test_killed_two_device_run_resumes_the_same_trajectory(two_device_run, config_path):
    """max_time=0 stops after the first step (as a kill would, with its checkpoint);
    --resume on two devices finishes exactly as the uninterrupted run."""
    stopped = config_path.parent / "stopped"
    check(run(["train.py", "--config", str(config_path), f"run.dir={stopped}", "train.max_time=0"], TWO_DEVICES))
    check(run(["train.py", "--config", str(stopped / "config.yaml"), "--resume", "train.max_time=null"], TWO_DEVICES))
    a, b = read_metrics(two_device_run), read_metrics(stopped)
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for x, y in zip(a[1:], b[1:]):
        assert int(x["step"]) == int(y["step"])
        assert float(x["valid_forces_mae_mev_A"]) == pytest.approx(float(y["valid_forces_mae_mev_A"]), rel=1e-5)


def test_two_processes_train_as_one_process_with_two_devices(two_device_run, config_path):
    """jax.distributed on localhost: two processes with one CPU device each, gradients
    summed through gloo; same metrics as the 2-device run, one run folder."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    run_dir = config_path.parent / "two_processes"
    common = [
        "train.py", "--config", str(config_path), f"run.dir={run_dir}", "run.distributed=true",
        f"run.coordinator_address=localhost:{port}", "run.num_processes=2",
    ]
    # (PYTHONFAULTHANDLER: a process aborted by the other's failure prints where it was)
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "PYTHONFAULTHANDLER": "1"}
    logs = [config_path.parent / f"process_{k}.log" for k in range(2)]
    processes = []
    for k, log in enumerate(logs):
        with open(log, "w") as out:  # files, not pipes: a full pipe would stall a process
            processes.append(subprocess.Popen([sys.executable, *common, f"run.process_id={k}"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
    for p in processes:
        p.wait(timeout=900)
    for k, p in enumerate(processes):
        assert p.returncode == 0, "\n".join(f"--- process {j} ---\n" + logs[j].read_text()[-4000:] for j in range(2))
    results = json.loads((run_dir / "results.json").read_text())
    assert results["n_devices"] == 2 and results["n_processes"] == 2
    a, b = read_metrics(two_device_run), read_metrics(run_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert float(x["valid_forces_mae_mev_A"]) == pytest.approx(float(y["valid_forces_mae_mev_A"]), rel=1e-4)
    assert (run_dir / "model" / "params.msgpack").exists()


# --- batching by size -------------------------------------------------------------------------


def test_mixed_sizes_batched_by_budget_pad_little_and_compile_few_programs(tmp_path):
    """3–4-atom cells mixed with 107–108-atom cells: by count, every batch would be padded
    for 4 large cells; filled up to node and edge budgets, waste stays small and every
    batch has the budgets' shape."""
    from mpnn.training.loop import train

    frames = emt_cu_frames(60, seed=2) + emt_cu_frames(8, seed=3, repeat=3)
    path = tmp_path / "mixed.xyz"
    ase.io.write(path, frames)
    budget = {"train.batch_nodes": 256, "train.batch_edges": 3072, "train.max_epochs": 3}
    train(tiny_train_config(str(path), tmp_path / "run", **budget))
    rows = read_metrics(tmp_path / "run")[1:]
    for row in rows:
        assert float(row["padding_nodes"]) < 0.3 and float(row["padding_edges"]) < 0.3, row
    assert [int(r["n_compiles"]) for r in rows] == [1, 0, 0]  # both budgets: one padded shape
    assert float(rows[-1]["valid_forces_mae_mev_A"]) < float(read_metrics(tmp_path / "run")[0]["valid_forces_mae_mev_A"])


# --- datasets larger than memory ---------------------------------------------------------------


def test_training_from_the_disk_cache_equals_training_in_memory(cu_file, tmp_path):
    """data.cache_dir: same split, statistics, batches and so the same run; the cache is
    built once and reused by the next run."""
    from mpnn.training.loop import train

    settings = {"train.max_epochs": 2}
    in_memory = train(tiny_train_config(cu_file, tmp_path / "memory", **settings))
    cached = train(tiny_train_config(cu_file, tmp_path / "cached", **settings, **{"data.cache_dir": str(tmp_path / "cache")}))
    for split in ("valid", "test"):
        for key in ("energy_mae_mev_atom", "forces_mae_mev_A", "stress_mae_mev_A3"):
            assert cached[split][key] == pytest.approx(in_memory[split][key], rel=1e-5), (split, key)
    (cache_file,) = (tmp_path / "cache").glob("*.h5")
    built = cache_file.stat().st_mtime_ns
    cutoff = tiny_train_config(cu_file, tmp_path).model.cutoff
    assert build_cache(cu_file, cutoff, tmp_path / "cache", progress=False) == cache_file  # what the next run opens
    assert cache_file.stat().st_mtime_ns == built
