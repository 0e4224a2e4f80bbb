"""Deployable model folders: everything needed to rebuild a `Potential`, no pickle.

    MODEL/config.yaml      the resolved run config (model hyperparameters among it)
    MODEL/params.msgpack   flax msgpack of the variables {"model", "scale", "shift", "e0"}
    MODEL/metadata.json    elements, cutoff, dtype, avg_num_neighbors, package version,
                           and the sha256 of params.msgpack (detects truncated copies)

The folder is written next to its destination and renamed into place, so a reader never
sees a half-written model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import flax.serialization
import jax
import numpy as np
import yaml

from mpnn.config import ConfigError, from_dict, save_config
from mpnn.models import build_model
from mpnn.potential import Potential, init_potential

FORMAT_VERSION = 1


class ModelFileError(ValueError):
    """A saved model folder is missing, corrupt or does not match its metadata."""


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("mpnn")
    except Exception:
        return "unknown"


def save_model(potential: Potential, path: str | Path) -> Path:
    """Write `potential` to the folder `path` atomically (replacing an existing one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        params_bytes = flax.serialization.msgpack_serialize(
            jax.tree_util.tree_map(np.asarray, jax.device_get(potential.variables))
        )
        (tmp / "params.msgpack").write_bytes(params_bytes)
        save_config(potential.config, tmp / "config.yaml")
        metadata = {
            "format_version": FORMAT_VERSION,
            "mpnn_version": _package_version(),
            "model_name": potential.config.model.name,
            "numbers": list(potential.numbers),
            "cutoff": potential.cutoff,
            "dtype": potential.dtype,
            "avg_num_neighbors": float(potential.model.avg_num_neighbors),
            "params_sha256": hashlib.sha256(params_bytes).hexdigest(),
        }
        (tmp / "metadata.json").write_text(json.dumps(metadata, indent=2))
        old = path.with_name(path.name + ".old")
        if path.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def load_model(path: str | Path, dtype: str | None = None) -> Potential:
    """Rebuild the `Potential` saved in folder `path` (a model folder or a run folder
    holding `model/`), optionally in another dtype ("float32"/"float64")."""
    path = Path(path)
    if (path / "model" / "metadata.json").is_file():  # a run folder: take its model
        path = path / "model"
    if not path.is_dir():
        raise ModelFileError(f"{path}: model folder not found")
    for name in ("metadata.json", "config.yaml", "params.msgpack"):
        if not (path / name).is_file():
            raise ModelFileError(f"{path / name}: missing from the model folder")
    try:
        metadata = json.loads((path / "metadata.json").read_text())
        numbers = [int(z) for z in metadata["numbers"]]
        cutoff = float(metadata["cutoff"])
        avg_num_neighbors = float(metadata["avg_num_neighbors"])
        expected_sha = metadata["params_sha256"]
    except (ValueError, KeyError, TypeError) as e:
        raise ModelFileError(f"{path / 'metadata.json'}: unreadable or incomplete ({type(e).__name__}: {e})") from e
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(f"{path / 'metadata.json'}: format_version {metadata.get('format_version')} is not {FORMAT_VERSION}")
    try:
        with open(path / "config.yaml") as f:
            config = from_dict(yaml.safe_load(f))
    except (yaml.YAMLError, ConfigError) as e:
        raise ModelFileError(f"{path / 'config.yaml'}: invalid ({e})") from e
    if config.model.cutoff != cutoff:
        raise ModelFileError(f"{path}: config cutoff {config.model.cutoff} != metadata cutoff {cutoff}")

    params_bytes = (path / "params.msgpack").read_bytes()
    if hashlib.sha256(params_bytes).hexdigest() != expected_sha:
        raise ModelFileError(f"{path / 'params.msgpack'}: checksum mismatch (truncated or modified file)")

    config.model.dtype = dtype or metadata.get("dtype", config.model.dtype)
    # Only the structure is needed: trace the initialisation without running it.
    template = jax.eval_shape(lambda: init_potential(config.model, numbers, avg_num_neighbors, config=config).variables)
    try:
        state = flax.serialization.msgpack_restore(params_bytes)
        variables = flax.serialization.from_state_dict(template, state)
    except Exception as e:
        raise ModelFileError(f"{path / 'params.msgpack'}: cannot be restored ({type(e).__name__}: {e})") from e
    shapes = jax.tree_util.tree_map(lambda x: tuple(x.shape), template)
    if jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), variables) != shapes:
        raise ModelFileError(f"{path / 'params.msgpack'}: parameter shapes do not match the config")
    model = build_model(config.model, len(numbers), avg_num_neighbors)
    return Potential(model, variables, tuple(numbers), cutoff, config.model.dtype, config)
