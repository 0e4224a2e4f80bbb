"""Model folders saved by earlier formats still load and predict exactly what they
predicted when saved. Format 1 (one flat model config for all models): tiny random-weight
NequIP and MACE written by main@0dff0ce. Format 2: a NequIP with parity, whose layers
used their 0o scalars as gates (fixed in format 3), written by main@bce5b05. Each with its
predictions on two structures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk, molecule

import mpnn
from mpnn.saved_model import FORMAT_VERSION

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("folder", ["v1_nequip", "v1_mace", "v2_nequip_parity"])
def test_older_model_folders_load_and_predict_the_same(folder, tmp_path):
    if folder.startswith("v1_"):
        reference = json.loads((FIXTURES / "v1_reference.json").read_text())[folder[3:]]
    else:
        reference = json.loads((FIXTURES / f"{folder}_reference.json").read_text())
    potential = mpnn.load(FIXTURES / folder)
    assert potential.config.model.name == folder.split("_")[1] and potential.dtype == "float64"
    # Only the format-2 parity model keeps the old gate order.
    assert getattr(potential.config.model, "pseudoscalar_gates", False) == (folder == "v2_nequip_parity")
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
    assert json.loads((tmp_path / "again" / "metadata.json").read_text())["format_version"] == FORMAT_VERSION
    again = mpnn.load(tmp_path / "again").predict([eth])[0]
    assert again["energy"] == pytest.approx(results[0]["energy"], rel=1e-14)
