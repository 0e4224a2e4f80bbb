"""Shared fixtures. Tests run in float64 where they check symmetry to tight tolerances
(this test process switches JAX to 64 bits, as a user's program would with
`mpnn.enable_x64()`; test_precision checks float32 in a process that never does);
models are tiny so the whole suite compiles quickly on 2 CPU cores."""

from __future__ import annotations

import os
import tempfile

# XLA programs compiled once in this session are reused by its other processes (the
# train.py subprocesses compile the same steps): set before JAX starts, inherited.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"mpnn-tests-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import mpnn

mpnn.enable_x64()

import functools

import jax

import ase
import ase.io
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

import jax.numpy as jnp

from mpnn.config import Config, ModelConfig, load_config, model_config
from mpnn.models import build_model
from mpnn.potential import Potential


_EQUIVARIANT = dict(num_layers=2, num_features=4, l_max=2, num_radial=4, radial_mlp=(8,), readout_mlp=4)
TINY_MODELS = {
    "nequip": dict(_EQUIVARIANT, parity=False),
    "mace": dict(_EQUIVARIANT, correlation=2, max_L=1),
    "schnet": dict(num_layers=2, num_features=8, num_filters=8, num_radial=12, readout_mlp=4),
    "bpnn": dict(num_radial=4, num_angular=2, zetas=(1, 2), hidden=(8,)),
    "allegro": dict(num_layers=2, num_tensor_features=4, l_max=2, num_radial=4, two_body_mlp=(8,), latent_mlp=(8,), edge_energy_mlp=(4,)),
}


def tiny_model_config(name: str = "nequip", dtype: str = "float64", **kwargs) -> ModelConfig:
    """A model small enough to compile in seconds, big enough to be non-trivial."""
    values = dict(cutoff=3.5, dtype=dtype)
    values.update(TINY_MODELS[name])
    values.update(kwargs)
    return model_config(name, **values)


def emt_cu_frames(n_frames: int, seed: int = 0, repeat: int = 1) -> list[ase.Atoms]:
    """Labelled fcc Cu frames (EMT energy, forces, stress): strained, rattled, some vacancies."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n_frames):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat)
        strain = rng.uniform(-0.02, 0.02, (3, 3))
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + (strain + strain.T) / 2), scale_atoms=True)
        if rng.random() < 0.3:
            del atoms[int(rng.integers(len(atoms)))]
        atoms.positions += rng.normal(0, 0.07, atoms.positions.shape)
        atoms.calc = EMT()
        labels = dict(energy=atoms.get_potential_energy(), forces=atoms.get_forces(), stress=atoms.get_stress())
        atoms.calc = SinglePointCalculator(atoms, **labels)
        frames.append(atoms)
    return frames


@pytest.fixture(scope="session")
def cu_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "cu_emt.xyz"
    ase.io.write(path, emt_cu_frames(48, seed=0))
    return str(path)


def tiny_train_config(train_file: str, run_dir, **overrides) -> Config:
    items = {
        "data.train": train_file,
        "data.valid_fraction": 0.125,
        "data.test_fraction": 0.125,
        "model.name": "nequip",
        "model.parity": False,
        "model.cutoff": 3.5,
        "model.num_layers": 2,
        "model.num_features": 4,
        "model.l_max": 1,
        "model.num_radial": 4,
        "model.radial_mlp": [8],
        "model.readout_mlp": 4,
        "train.batch_size": 4,
        "train.eval_batch_size": 8,
        "train.max_epochs": 4,
        "train.lr": 0.02,
        "train.ema_decay": 0.9,
        "train.warmup_epochs": 0.5,
        "train.progress": False,
        "train.energy_weight": 10.0,
        "train.forces_weight": 1.0,
        "train.stress_weight": 10.0,
        "train.keep_checkpoints": 10,
        "run.dir": str(run_dir),
    }
    items.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in items.items()])


def random_potential(numbers, e0, scale, seed, dtype="float64", **model_kwargs):
    """A tiny model with random N(0, 1) weights, built without compiling `model.init`
    (consistency checks hold for any weights; this saves ~10 s of XLA compilation)."""
    from mpnn.potential import energy_terms, init_model_params

    config = tiny_model_config(dtype=dtype, **model_kwargs)
    model = build_model(config, len(numbers), avg_num_neighbors=8.0)
    shapes = jax.eval_shape(functools.partial(init_model_params, model))
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape)), shapes)
    variables = {"model": params, "scale": jnp.asarray(scale), "shift": jnp.asarray(0.0), "e0": jnp.asarray(e0, dtype=float)}
    pair_terms, global_terms = energy_terms(config)
    return Potential(model, variables, tuple(numbers), config.cutoff, dtype, Config(model=config), pair_terms, global_terms)
