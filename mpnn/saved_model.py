"""Deployable model folders: everything needed to rebuild a `Potential`, no pickle.

    MODEL/config.yaml      the resolved run config (the model section among it)
    MODEL/params.msgpack   flax msgpack of the variables {"model", "scale", "shift", "e0"}
    MODEL/metadata.json    elements, cutoff, dtype, avg_num_neighbors, package version,
                           and the sha256 of params.msgpack (detects truncated copies)

The folder is written next to its destination and renamed into place, so a reader never
sees a half-written model.
"""

from __future__ import annotations

import dataclasses
import functools
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
from mpnn.models import MODELS, build_model
from mpnn.potential import Potential, enable_x64, energy_terms, init_model_params

# 2: per-model config sections and energy terms; 3: NequIP with parity gates by even
# scalars only (earlier folders load with `pseudoscalar_gates`). 1 and 2 are converted on load.
FORMAT_VERSION = 3


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
    tmp.chmod(0o755)  # mkdtemp makes it private; a deployable model is readable like its files
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


def _convert_v1_config(values: dict, where: Path) -> dict:
    """Format 1 wrote one flat model section with every field of every model (all of them,
    defaults included); keep the chosen model's keys. Fields a model did not use had no
    effect, so dropping them is exact."""
    model = dict(values.get("model") or {})
    name = model.get("name", "nequip")
    if name not in MODELS:
        raise ModelFileError(f"{where}: unknown model {name!r}")
    known = {f.name for f in dataclasses.fields(MODELS[name].config)}
    values = dict(values)
    values["model"] = {k: v for k, v in model.items() if k in known}
    return values


def load_model(path: str | Path, dtype: str | None = None, *, set_precision: bool = False) -> Potential:
    """Rebuild the `Potential` saved in folder `path` (a model folder or a run folder
    holding `model/`), optionally in another dtype ("float32"/"float64").

    A float64 model needs 64-bit JAX (`mpnn.enable_x64()` first, or dtype="float32").
    set_precision=True switches JAX to 64 bits when the model is float64: for the
    command-line entry points, which own their process.
    Folders saved by formats 1 (before per-model config sections) and 2 load unchanged.
    """
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
    version = metadata.get("format_version")
    if version not in (1, 2, FORMAT_VERSION):
        raise ModelFileError(
            f"{path / 'metadata.json'}: format_version {version} is not one this mpnn reads (1–{FORMAT_VERSION}); "
            "a newer mpnn wrote it"
        )
    try:
        with open(path / "config.yaml") as f:
            values = yaml.safe_load(f)
        if version == 1:
            values = _convert_v1_config(values, path / "config.yaml")
        config = from_dict(values)
        if version < 3 and config.model.name == "nequip" and config.model.parity:
            config.model.pseudoscalar_gates = True  # the layer structure these parameters were trained in
    except (yaml.YAMLError, ConfigError, AttributeError, TypeError) as e:
        raise ModelFileError(f"{path / 'config.yaml'}: invalid ({e})") from e
    if config.model.cutoff != cutoff:
        raise ModelFileError(f"{path}: config cutoff {config.model.cutoff} != metadata cutoff {cutoff}")

    params_bytes = (path / "params.msgpack").read_bytes()
    if hashlib.sha256(params_bytes).hexdigest() != expected_sha:
        raise ModelFileError(f"{path / 'params.msgpack'}: checksum mismatch (truncated or modified file)")

    config.model.dtype = dtype or metadata.get("dtype", config.model.dtype)
    if set_precision and config.model.dtype == "float64":
        enable_x64()
    model = build_model(config.model, len(numbers), avg_num_neighbors)
    # Only the structure is needed: trace the initialisation without running it.
    template = {
        "model": jax.eval_shape(functools.partial(init_model_params, model)),
        "scale": np.zeros(()),
        "shift": np.zeros(()),
        "e0": np.zeros(len(numbers)),
    }
    try:
        state = flax.serialization.msgpack_restore(params_bytes)
        variables = flax.serialization.from_state_dict(template, state)
    except Exception as e:
        raise ModelFileError(f"{path / 'params.msgpack'}: cannot be restored ({type(e).__name__}: {e})") from e
    shapes = jax.tree_util.tree_map(lambda x: tuple(x.shape), template)
    if jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), variables) != shapes:
        raise ModelFileError(f"{path / 'params.msgpack'}: parameter shapes do not match the config")
    pair_terms, global_terms = energy_terms(config.model)
    return Potential(model, variables, tuple(numbers), cutoff, config.model.dtype, config, pair_terms, global_terms)
