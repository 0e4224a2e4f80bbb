"""Config → validated train/valid/test frames."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpnn.config import DataConfig, TrainConfig
from mpnn.data.frames import DataError, Frame, read_frames, split_frames, validate_frame


@dataclass
class Splits:
    train: list[Frame]
    valid: list[Frame]
    test: list[Frame]

    @property
    def numbers(self) -> list[int]:
        """Sorted atomic numbers present in the training set."""
        return sorted({int(z) for f in self.train for z in f.numbers})


def _read(spec: str, data: DataConfig) -> list[Frame]:
    """Frames of a file, a folder (its *.xyz / *.extxyz) or a glob: one dataset."""
    from mpnn.data.cache import source_files

    keys = (data.energy_key, data.forces_key, data.stress_key, data.virial_key)
    return [frame for path in source_files(spec) for frame in read_frames(str(path), *keys)]


def load_splits(data: DataConfig, train: TrainConfig, known_numbers: list[int] | None = None) -> Splits:
    """Read, split and validate. Every frame is checked before any training starts."""
    frames = _read(data.train, data)
    if data.max_frames is not None:
        frames = frames[: data.max_frames]
    if data.valid is None or data.test is None:
        valid_fraction = data.valid_fraction if data.valid is None else 0.0
        test_fraction = data.test_fraction if data.test is None else 0.0
        train_frames, valid, test = split_frames(frames, valid_fraction, test_fraction, data.split_seed)
    else:
        train_frames, valid, test = frames, [], []
    if data.valid is not None:
        valid = _read(data.valid, data)
    if data.test is not None:
        test = _read(data.test, data)
    if not train_frames:
        raise DataError(f"{data.train}: no training frames left after the split")

    splits = Splits(train_frames, valid, test)
    numbers = known_numbers or splits.numbers
    for frame in [*splits.train, *splits.valid, *splits.test]:
        validate_frame(
            frame,
            need_energy=train.energy_weight > 0,
            need_forces=train.forces_weight > 0,
            known_numbers=numbers,
            min_distance=data.min_distance,
        )
    return splits


def label_warnings(splits: Splits, data: DataConfig, train: TrainConfig) -> list[str]:
    """What the training will silently not use: stress asked for but absent, stress on
    frames that are not periodic in 3D (dropped: their stress is undefined)."""
    messages = []
    for name, frames in (("train", splits.train), ("valid", splits.valid), ("test", splits.test)):
        ignored = sum(1 for f in frames if f.stress is not None and not bool(np.all(f.pbc)))
        if ignored:
            messages.append(
                f"{name}: {ignored} of {len(frames)} frames carry stress but are not periodic in 3D; their stress is ignored"
            )
    periodic = sum(1 for f in splits.train if bool(np.all(f.pbc)))
    if train.stress_weight > 0 and periodic:  # (molecules have no stress to miss)
        usable = sum(1 for f in splits.train if f.stress is not None and bool(np.all(f.pbc)))
        if usable == 0:
            messages.append(
                f"train.stress_weight={train.stress_weight:g} but none of the {periodic} periodic training frames of "
                f"{data.train} has a stress (key {data.stress_key!r}/{data.virial_key!r}): training without stress"
            )
        elif usable < periodic:
            messages.append(f"stress labels on {usable} of {periodic} periodic training frames; the others train without stress")
    return messages


def e0_from_config(e0: dict[str, float], numbers: list[int]) -> np.ndarray:
    """Per-element E0 given in the config as {"H": -13.6, ...} (eV), in `numbers` order."""
    from ase.data import chemical_symbols

    missing = [chemical_symbols[z] for z in numbers if chemical_symbols[z] not in e0]
    if missing:
        raise DataError(f"model.e0 has no value for element(s) {missing}")
    return np.array([float(e0[chemical_symbols[z]]) for z in numbers])
