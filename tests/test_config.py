"""Per-model config sections: each model's own defaults, strict keys, the command line as
users know it, and building a fresh potential without a data set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import mpnn
from mpnn.config import ConfigError, load_config, model_config
from mpnn.models import MODELS
from mpnn.models.mace import MACEConfig
from mpnn.models.nequip import NequIPConfig


def test_each_model_gets_its_own_defaults():
    mace = load_config(None, ["model.name=mace"]).model
    assert isinstance(mace, MACEConfig)
    # mace-torch's defaults, not NequIP's (3 layers, p = 6, radial MLP (64, 64)).
    assert (mace.num_layers, mace.envelope_p, mace.radial_mlp, mace.correlation) == (2, 5, (64, 64, 64), 3)
    nequip = load_config(None, []).model
    assert isinstance(nequip, NequIPConfig) and nequip.envelope_p == 6 and nequip.radial_mlp == (64, 64)


def test_command_line_keys_and_model_specific_errors(tmp_path):
    config = load_config("configs/default.yaml", ["model.name=mace", "model.num_features=64", "model.correlation=2"])
    assert config.model.name == "mace" and config.model.num_features == 64 and config.model.correlation == 2
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['correlation'\] for model 'nequip'.*known: \[.*'hidden_l_max'"):
        load_config("configs/default.yaml", ["model.correlation=5"])
    with pytest.raises(ConfigError, match="unknown model 'painn'"):
        load_config(None, ["model.name=painn"])
    with pytest.raises(ConfigError, match="pair_repulsion"):
        load_config(None, ["model.pair_repulsion=lj"])
    with pytest.raises(ConfigError, match="zbl_r_inner < zbl_r_outer <= cutoff"):
        load_config(None, ["model.pair_repulsion=zbl", "model.zbl_r_outer=6.0"])


@pytest.mark.parametrize("path", ["configs/default.yaml", "configs/nequip_cu.yaml", "configs/mace_ethanol.yaml", "configs/mace_cu.yaml", "configs/mace_rmd17.yaml", "configs/zbl_ethanol.yaml"])
def test_bundled_configs_resolve(path):
    config = load_config(path)
    assert type(config.model) is MODELS[config.model.name].config


def test_nequip_hidden_l_separate_from_harmonics():
    """The published setting: 64x0e + 64x1o hidden features with l ≤ 2 edge harmonics."""
    config = model_config("nequip", num_features=64, hidden_l_max=1, l_max=2, parity=False, num_layers=2)
    potential = mpnn.build_potential(config, numbers=[1, 8])
    params = potential.variables["model"]["layer_1"]
    # linear_down maps to the gated hidden irreps: 64x0e + 64 gates + 64x1o, no l = 2.
    irreps_out = {k for k in params["linear_down"]}
    assert any("64x1o" in k for k in irreps_out) and not any("2e" in k for k in irreps_out)
    # The messages still use the l = 2 harmonics (1o ⊗ 2e → 1o is one more path, one
    # more radial weight per channel) that l_max = 1 harmonics lack.
    narrow = mpnn.build_potential(model_config("nequip", num_features=64, l_max=1, parity=False, num_layers=2), numbers=[1, 8])
    paths = lambda p: p["MessagePassing_0"]["MultiLayerPerceptron_0"]["Dense_2"]["kernel"].shape[1]
    assert paths(params) == paths(narrow.variables["model"]["layer_1"]) + 64


def test_build_potential_without_data():
    potential = mpnn.build_potential({"name": "mace", "num_features": 8, "num_layers": 1, "l_max": 1, "correlation": 2}, [1, 6, 8])
    assert potential.numbers == (1, 6, 8) and potential.config.model.name == "mace"
    from ase.build import molecule

    result = potential.predict(molecule("CH3OH"))[0]
    assert np.isfinite(result["energy"]) and result["forces"].shape == (6, 3)


def test_numbers_without_a_dot_and_training_controls_are_checked():
    from mpnn.config import ConfigError, load_config

    assert load_config(None, ["train.lr=1e-3"]).train.lr == 0.001  # YAML 1.1 reads 1e-3 as text
    with pytest.raises(ConfigError, match="train.schedule"):
        load_config(None, ["train.schedule=step"])
    with pytest.raises(ConfigError, match="train.loss"):
        load_config(None, ["train.loss=l1"])


def test_model_name_override_switches_model_and_keeps_shared_keys():
    """`python train.py model.name=schnet` on a config written for NequIP: NequIP's own keys
    are dropped, shared ones (cutoff) kept, the new model's defaults fill the rest."""
    from mpnn.config import load_config as load

    config = load(Path(__file__).parent.parent / "configs" / "default.yaml", ["model.name=schnet", "model.num_filters=16"])
    assert config.model.name == "schnet" and config.model.cutoff == 5.0
    assert config.model.num_filters == 16 and config.model.num_features == 64  # SchNet's default, not NequIP's 32
    same = load(Path(__file__).parent.parent / "configs" / "default.yaml", ["model.name=nequip"])
    assert same.model.num_features == 32  # same model named: the file's keys stay
    with pytest.raises(ConfigError, match="unknown key"):
        load(None, ["model.name=schnet", "model.l_max=2"])


def test_batching_and_device_keys_are_checked():
    with pytest.raises(ConfigError, match="batch_edges needs train.batch_nodes"):
        load_config(None, ["train.batch_edges=4096"])
    with pytest.raises(ConfigError, match="train.batch_nodes: must be a positive integer"):
        load_config(None, ["train.batch_nodes=0"])
    with pytest.raises(ConfigError, match="train.n_devices: must be a positive integer"):
        load_config(None, ["train.n_devices=0"])
    config = load_config(None, ["train.batch_nodes=512", "train.batch_edges=8192", "run.distributed=true"])
    assert (config.train.batch_nodes, config.train.batch_edges, config.run.distributed) == (512, 8192, True)
