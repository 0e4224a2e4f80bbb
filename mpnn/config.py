"""Typed run configuration: dataclasses, YAML loading and dotted overrides.

One YAML file (plus `key.sub=value` overrides) resolves to one `Config`. Unknown keys
are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class DataConfig:
    """Where the labelled frames come from and how they are read.

    `train` is required. If `valid` / `test` are not given, they are split off `train`
    by `valid_fraction` / `test_fraction` with `split_seed`.
    """

    train: str = "data/ethanol_xtb.xyz"
    valid: str | None = None
    test: str | None = None
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0
    max_frames: int | None = None  # use only the first N frames of `train` (quick runs)
    energy_key: str = "energy"  # eV, in atoms.info or the attached calculator
    forces_key: str = "forces"  # eV/Å, in atoms.arrays or the attached calculator
    stress_key: str = "stress"  # eV/Å³ (ASE sign), Voigt-6 or 3x3
    virial_key: str = "virial"  # eV, used when no stress is present: stress = -virial / V
    min_distance: float = 0.5  # Å; closer pairs are rejected as broken input
    # Datasets larger than memory: preprocess each file (a file, folder or glob) once into
    # an HDF5 cache in this folder (keyed by content, cutoff and label keys; reused across
    # runs) and read training batches from disk on a background thread. null: in memory.
    cache_dir: str | None = None


@dataclass
class ModelConfig:
    """What every model section has; each model extends it with its own fields and
    defaults (`mpnn.models`: NequIPConfig, MACEConfig, ...).

    The `model:` section of a config is the chosen model's config: `name` picks the
    class, and a key that model does not have is an error.
    """

    name: str = "nequip"
    cutoff: float = 5.0  # Å
    # Short-range safety net: "zbl" adds ZBL screened nuclear repulsion (mpnn/terms/zbl.py),
    # switched smoothly (C²) from full strength at zbl_r_inner to zero at zbl_r_outer (Å).
    pair_repulsion: str | None = None  # None or "zbl"
    zbl_r_inner: float = 1.0
    zbl_r_outer: float = 1.8
    # Long range: "electrostatics" adds a second readout (a raw charge per atom, corrected to
    # the frame's total charge) and the electrostatic energy of those charges as Gaussian
    # clouds of width charge_sigma (Å), free space or Ewald (mpnn/terms/electrostatics.py).
    long_range: str | None = None  # None or "electrostatics"
    charge_sigma: float = 1.0
    electrostatics_method: str = "auto"  # periodic cells: "ewald", "pme" (large cells) or "auto"
    # Energy scaling. e0: per-element reference energies (eV) or "fit" (least squares).
    e0: dict[str, float] | str = "fit"
    scale: float | str = "forces_rms"  # number, "forces_rms" or "energy_std"
    dtype: str = "float32"  # "float32" or "float64"

    def __post_init__(self):
        where = f"model ({self.name})"
        if self.pair_repulsion not in (None, "zbl"):
            raise ConfigError(f"{where}.pair_repulsion: {self.pair_repulsion!r} is not one of null, zbl")
        if self.long_range not in (None, "electrostatics"):
            raise ConfigError(f"{where}.long_range: {self.long_range!r} is not one of null, electrostatics")
        if self.electrostatics_method not in ("auto", "ewald", "pme"):
            raise ConfigError(f"{where}.electrostatics_method: {self.electrostatics_method!r} is not one of auto, ewald, pme")
        if not self.charge_sigma > 0:
            raise ConfigError(f"{where}.charge_sigma: must be > 0 Å, got {self.charge_sigma}")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"{where}.dtype: {self.dtype!r} is not float32 or float64")
        if self.pair_repulsion and not 0 <= self.zbl_r_inner < self.zbl_r_outer <= self.cutoff:
            raise ConfigError(
                f"{where}: ZBL switching needs 0 <= zbl_r_inner < zbl_r_outer <= cutoff, got "
                f"{self.zbl_r_inner}, {self.zbl_r_outer}, {self.cutoff}"
            )

    @property
    def num_outputs(self) -> int:
        """Per-atom model outputs: the energy, plus a raw charge with electrostatics."""
        return 2 if self.long_range == "electrostatics" else 1


LOSS_TERMS = ("energy", "forces", "stress", "dipole", "charges")


@dataclass
class TrainConfig:
    max_epochs: int = 100
    max_time: float | None = None  # seconds of training wall time; checked after every step
    batch_size: int = 8
    eval_batch_size: int = 32
    optimizer: str = "amsgrad"  # "adam" or "amsgrad"
    lr: float = 5e-3
    # "plateau" (see below) or "cosine" (decay to min_lr_ratio over max_epochs). Plateau by
    # default: a rate that decays on a fixed calendar is too low too early in a run cut
    # short by max_time, or whose max_epochs is a guess (README, "Results on the bundled data").
    schedule: str = "plateau"
    min_lr_ratio: float = 0.01  # final lr of the cosine decay, relative to lr
    warmup_epochs: float = 1.0
    # "plateau": constant lr after warm-up, times plateau_factor whenever the validation
    # score has not improved (by > 1e-4 relative) for plateau_patience epochs.
    plateau_patience: int = 5
    plateau_factor: float = 0.5
    patience: int | None = None  # early stopping: epochs without improvement (> 1e-4 relative)
    loss: str = "mse"  # "mse" or "huber" (quadratic below huber_delta, linear above)
    huber_delta: float = 0.01  # in the units of each quantity (eV/atom, eV/Å, eV/Å³, e·Å, e)
    max_bad_steps: int = 10  # non-finite loss or gradients: skip the step; stop after this many in a row
    # Fine-tuning: start from a saved model (its model section, elements and parameters);
    # E0 is refitted per model.e0 for the elements in the new data; freeze lists
    # parameter-path prefixes that stay fixed (e.g. ["embedding", "layer_0"]).
    init_from: str | None = None
    freeze: tuple[str, ...] = ()
    # Devices: batch_size is the global batch (graphs per optimiser step), split over
    # n_devices per process (null: every local device). Batching by size instead: each
    # device's batch is filled up to batch_nodes atoms and batch_edges edges (either or
    # both; batch_size is then not used for training). With both budgets every batch has one
    # padded shape (one compiled program); with one, the other dimension is bucketed.
    n_devices: int | None = None
    batch_nodes: int | None = None
    batch_edges: int | None = None

    def __post_init__(self):
        unknown = set(self.stage_two_weights) - set(LOSS_TERMS)
        if unknown:
            raise ConfigError(f"train.stage_two_weights: unknown key(s) {sorted(unknown)}; known: {list(LOSS_TERMS)}")
        if self.stage_two_weights and self.stage_two_epoch is None:
            raise ConfigError("train.stage_two_weights needs train.stage_two_epoch (the first epoch of stage two)")
        if self.stage_two_lr is not None and (self.stage_two_epoch is None or not self.stage_two_lr > 0):
            raise ConfigError(f"train.stage_two_lr={self.stage_two_lr}: needs train.stage_two_epoch and a rate > 0")
        choices = {"schedule": ("cosine", "plateau"), "loss": ("mse", "huber"), "optimizer": ("adam", "amsgrad")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"train.{key}: {getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if not 0 < self.plateau_factor < 1:
            raise ConfigError(f"train.plateau_factor: must be in (0, 1), got {self.plateau_factor}")
        for key in ("n_devices", "batch_nodes", "batch_edges"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: must be a positive integer or null, got {getattr(self, key)}")
        if self.batch_edges is not None and self.batch_nodes is None:
            # (frames without edges, e.g. isolated atoms, would leave the graphs per batch unbounded)
            raise ConfigError("train.batch_edges needs train.batch_nodes too (batching by size)")
        if self.huber_delta <= 0 or self.max_bad_steps < 1 or (self.patience is not None and self.patience < 1):
            raise ConfigError("train.huber_delta must be > 0, train.max_bad_steps and train.patience >= 1")
    weight_decay: float = 0.0
    clip_norm: float = 10.0
    ema_decay: float = 0.99
    # Energy needs a large weight: forces do not constrain a constant energy offset, which
    # otherwise drifts by 100s of meV/atom while forces are being fitted.
    energy_weight: float = 100.0  # on (eV/atom)²
    forces_weight: float = 10.0  # on (eV/Å)² per component
    stress_weight: float = 1.0  # on (eV/Å³)² per component
    # With model.long_range=electrostatics, frames that carry these labels also fit them:
    dipole_weight: float = 1.0  # on (e·Å)² per component, atoms.info["dipole"], molecules only
    charges_weight: float = 0.0  # on e² per atom, atoms.arrays["charges"] (partition-dependent: opt in)
    # Stage two (as MACE's late "SWA" stage): from epoch stage_two_epoch on, these loss
    # weights replace the ones above, e.g. {energy: 1000, forces: 10} to tighten energies
    # once forces are learned. Keys: energy, forces, stress, dipole, charges. No recompilation.
    stage_two_epoch: int | None = None
    stage_two_weights: dict[str, float] = field(default_factory=dict)
    # Learning rate in stage two (mace-torch's swa_lr, 1e-3): the schedule is scaled so its
    # peak is this rate (with "plateau", the rate itself); plateau reductions stop applying.
    stage_two_lr: float | None = None
    checkpoint_every: int = 1  # epochs
    keep_checkpoints: int = 2
    progress: bool = True  # tqdm bar



def loss_weights(train: "TrainConfig", epoch: int) -> dict[str, float]:
    """The loss weights in effect in `epoch` (1-based): stage two's from train.stage_two_epoch on."""
    weights = {k: getattr(train, f"{k}_weight") for k in LOSS_TERMS}
    if train.stage_two_epoch is not None and epoch >= train.stage_two_epoch:
        weights.update(train.stage_two_weights)
    return weights


def lr_multiplier(train: "TrainConfig", epoch: int, plateau_scale: float) -> float:
    """What multiplies the schedule's rate in `epoch` (1-based): the plateau reductions so
    far, or in stage two with train.stage_two_lr, stage_two_lr / lr."""
    if train.stage_two_lr is not None and epoch >= train.stage_two_epoch:  # validation: stage_two_lr needs the epoch
        return train.stage_two_lr / train.lr
    return plateau_scale


@dataclass
class RunConfig:
    dir: str = "runs/default"
    resume: bool = False  # continue from the last checkpoint in `dir`
    overwrite: bool = False  # replace an existing run in `dir`
    # Several processes (hosts): jax.distributed.initialize(coordinator_address,
    # num_processes, process_id); keys left null come from the environment as JAX detects
    # it (JAX_COORDINATOR_ADDRESS, SLURM, Open MPI). Every process runs the same command.
    distributed: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclass
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=lambda: model_config("nequip"))
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)


class ConfigError(ValueError):
    pass


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one YAML value against a dataclass field type."""
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not match {tp}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], where) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-12 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def model_config(name: str = "nequip", **values) -> ModelConfig:
    """The config of model `name` with its own defaults, updated by `values`
    (e.g. `model_config("mace", num_features=64)`); unknown keys are errors."""
    from mpnn.models import MODELS  # models import this module: import here, not at the top

    if name not in MODELS:
        raise ConfigError(f"model.name: unknown model {name!r}; available: {sorted(MODELS)}")
    return _from_dict(MODELS[name].config, {"name": name, **values}, "model", model_name=name)


def _from_dict(cls: type, values: dict, where: str = "config", model_name: str | None = None) -> Any:
    if cls is ModelConfig:  # the model section: the chosen model's own config class
        values = dict(values)
        return model_config(values.pop("name", "nequip"), **values)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        what = f"model {model_name!r}" if model_name else where
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)} for {what}; known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def to_dict(config: Config) -> dict:
    def convert(x):
        if isinstance(x, tuple):
            return [convert(v) for v in x]
        if isinstance(x, dict):
            return {k: convert(v) for k, v in x.items()}
        return x

    return convert(dataclasses.asdict(config))


def from_dict(values: dict) -> Config:
    return _from_dict(Config, values or {})


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Resolve a YAML file and `key.sub=value` overrides into a Config.

    Override values are parsed as YAML (`train.lr=1e-3`, `model.radial_mlp=[32,32]`).
    """
    values = to_dict(Config())
    # The model section starts empty: its defaults are those of the model finally named.
    values["model"] = {}
    if path is not None:
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        _merge(values, loaded, str(path))
    file_model = values["model"].get("name", "nequip")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        if key.strip() == "model.name" and value != file_model:
            values["model"] = _keys_shared_with(value, values["model"])
        _set_dotted(values, key.strip(), value)
    return from_dict(values)


def _keys_shared_with(name: str, section: dict) -> dict:
    """The file's model section for another model (`model.name=X` on the command line):
    the keys every model has (cutoff, dtype, pair_repulsion, ...) are kept, the previous
    model's own keys are dropped, so `python train.py model.name=schnet` works with a
    config written for NequIP. Later overrides still set X's own keys."""
    from mpnn.models import MODELS  # models import this module

    if name not in MODELS:
        return section  # from_dict reports the unknown name
    common = {f.name for f in dataclasses.fields(ModelConfig)}
    return {k: v for k, v in section.items() if k in common}


def _merge(base: dict, new: dict, where: str) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and k != "e0":
            _merge(base[k], v, f"{where}:{k}")
        else:
            base[k] = v


def save_config(config: Config, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(config), f, sort_keys=False)
