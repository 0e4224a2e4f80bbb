"""Model folders saved by the previous format (1: one flat model config for all models)
still load and predict exactly what they predicted when saved. The fixtures in
tests/fixtures were written by main@0dff0ce (tiny random-weight NequIP and MACE) together
with their predictions on two structures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk, molecule

import mpnn

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name", ["nequip", "mace"])
def test_format_1_model_folders_load_and_predict_the_same(name, tmp_path):
    reference = json.loads((FIXTURES / "v1_reference.json").read_text())[name]
    potential = mpnn.load(FIXTURES / f"v1_{name}")
    assert potential.config.model.name == name and potential.dtype == "float64"
    eth = molecule("CH3CH2OH")
    eth.rattle(0.05, seed=0)
    cu = bulk("Cu", "fcc", a=3.61, cubic=True)
    cu.rattle(0.05, seed=1)
    results = potential.predict([eth, cu])
    for got, want in zip(results, reference):
        assert got["energy"] == pytest.approx(want["energy"], rel=1e-12)
        np.testing.assert_allclose(got["forces"], want["forces"], rtol=1e-9, atol=1e-10)
        if "stress" in want:
            np.testing.assert_allclose(got["stress"], want["stress"], rtol=1e-9, atol=1e-12)
    # Saved again, it is a current-format folder that loads the same.
    mpnn.save_model(potential, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "metadata.json").read_text())["format_version"] == 2
    again = mpnn.load(tmp_path / "again").predict([eth])[0]
    assert again["energy"] == pytest.approx(results[0]["energy"], rel=1e-14)
