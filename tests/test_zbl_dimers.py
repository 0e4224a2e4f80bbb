"""The short-range safety net on a trained model: with `model.pair_repulsion: zbl`, the
dimer curve of every element pair the model knows is repulsive at short range, whatever
the learned term does there (the training data never has atoms that close)."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import ase
import numpy as np
import pytest

from mpnn.config import load_config
from mpnn.terms.zbl import zbl_energy

ROOT = Path(__file__).resolve().parents[1]


def dimer_energies(potential, z1: int, z2: int, distances) -> np.ndarray:
    """E(r) − E(apart) of an isolated z1–z2 dimer (eV)."""
    dimers = [ase.Atoms(numbers=[z1, z2], positions=[[0, 0, 0], [r, 0, 0]]) for r in distances]
    apart = ase.Atoms(numbers=[z1, z2], positions=[[0, 0, 0], [50.0, 0, 0]])
    energies = np.array([r["energy"] for r in potential.predict(dimers + [apart], batch_size=len(dimers) + 1)])
    return energies[:-1] - energies[-1]


@pytest.fixture(scope="module")
def zbl_model(tmp_path_factory):
    """A small NequIP trained with ZBL on (float64) on 96 frames of the bundled ethanol set."""
    from mpnn.training.loop import train

    run_dir = tmp_path_factory.mktemp("zbl") / "run"
    overrides = {
        "data.train": str(ROOT / "data" / "ethanol_xtb.xyz"), "data.max_frames": 96,
        "model.name": "nequip", "model.cutoff": 4.0, "model.num_layers": 2, "model.num_features": 8,
        "model.l_max": 1, "model.parity": False, "model.num_radial": 6, "model.radial_mlp": [16],
        "model.pair_repulsion": "zbl", "model.dtype": "float64",
        "train.max_epochs": 6, "train.batch_size": 8, "train.lr": 0.01, "train.progress": False,
        "run.dir": str(run_dir),
    }
    config = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    results = train(config)
    with open(run_dir / "metrics.csv") as f:
        untrained = float(next(csv.DictReader(f))["valid_forces_mae_mev_A"])
    assert results["valid"]["forces_mae_mev_A"] < 0.5 * untrained  # it learned the reference − ZBL
    import mpnn

    return mpnn.load(run_dir)


def test_every_pair_is_repulsive_at_short_range(zbl_model):
    short = np.linspace(0.3, 1.2, 91)
    pairs = list(itertools.combinations_with_replacement(zbl_model.numbers, 2))
    assert len(pairs) == 6  # H, C, O
    for z1, z2 in pairs:
        curve = dimer_energies(zbl_model, z1, z2, np.concatenate([short, [0.5, 2.5]]))
        energies, e_05, e_25 = curve[:-2], curve[-2], curve[-1]
        assert np.all(np.diff(energies) < 0), (z1, z2, energies)
        # > 10 eV for every pair but H–H, where bare ZBL itself is only 5.9 eV at 0.5 Å: there
        # we ask for at least ZBL's own rise (the learned term may not cancel the safety net).
        need = min(10.0, 0.9 * float(zbl_energy(np.array(0.5), z1, z2)))
        assert e_05 - e_25 > need, (z1, z2, e_05 - e_25)
