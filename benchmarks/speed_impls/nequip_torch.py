"""nequip 0.6.2 (PyTorch NequIP) for benchmarks/speed.py (see speed_impls/__init__.py).

Built: `nequip.model.model_from_config` with model_builders EnergyModel, PerSpeciesRescale
(scale 1, shift 0, not trainable), then ForceOutput, or StressForceOutput when any structure
is periodic (E+F+stress); random weights (torch.manual_seed(0): the force-only and the stress
model get the same weights), float32, eager PyTorch (not TorchScript-deployed).
HYPER maps onto it with nequip's full irreps keys (no SimpleIrrepsConfig: its l_max would set
the hidden irreps and the harmonics together, and its parity would add pseudo-tensors):
    num_layers                 -> num_layers (ConvNetLayer: gate nonlinearity, use_sc, no resnet)
    num_features, hidden_l_max -> feature_irreps_hidden 64x0e+64x1o,
                                  chemical_embedding_irreps_out 64x0e,
                                  conv_to_output_hidden_irreps_out 32x0e (nequip's num_features // 2)
    l_max                      -> irreps_edge_sh 1x0e+1x1o+1x2e
    num_radial                 -> BesselBasis num_basis 8 (trainable frequencies: nequip's default)
    radial_mlp (64, 64, 64)    -> invariant_layers 3, invariant_neurons 64
    cutoff, envelope_p         -> r_max 5, PolynomialCutoff_p 5
    avg_num_neighbors          =  edges / atoms of `structures`; chemical_symbols: their elements.
Graphs: `nequip.data.AtomicData.from_ase` (matscipy neighbor list: NEQUIP_NL=matscipy, nequip's
default being ase's) batched with nequip's torch_geometric `Batch`, built once outside the timing.
    energy_forces  model.eval(), one batch
    train_step     model.train() (forces with create_graph), loss mse(E) + mse(F), backward, Adam
    md             ase VelocityVerlet (1 fs, 300 K Maxwell-Boltzmann, seed 0) with
                   nequip.ase.NequIPCalculator (from_ase: host neighbor list every step) on the
                   force-only model.
"""

from __future__ import annotations

import os

os.environ.setdefault("NEQUIP_NL", "matscipy")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_default_dtype(torch.float32)
# e3nn 0.4.4 torch.load-s its own constants.pt (holds `slice`s); torch >= 2.6 loads weights_only.
torch.serialization.add_safe_globals([slice])

from ase.data import chemical_symbols  # noqa: E402
from e3nn import o3  # noqa: E402
from nequip.data import AtomicData, AtomicDataDict  # noqa: E402
from nequip.data.transforms import TypeMapper  # noqa: E402
from nequip.model import model_from_config  # noqa: E402
from nequip.utils.torch_geometric import Batch  # noqa: E402


class Bench:
    def __init__(self, hyper: dict, structures):
        widths = set(hyper["radial_mlp"])
        if len(widths) != 1:
            raise NotImplementedError(f"nequip's radial MLP has one width, not {hyper['radial_mlp']}")
        self.r_max = float(hyper["cutoff"])
        symbols = [chemical_symbols[z] for z in sorted({int(z) for a in structures for z in a.numbers})]
        self.types = TypeMapper(chemical_symbols=symbols)
        graphs = [AtomicData.from_ase(a, r_max=self.r_max) for a in structures]
        avg_num_neighbors = sum(g.edge_index.shape[1] for g in graphs) / sum(g.num_nodes for g in graphs)
        F = hyper["num_features"]
        self.config = dict(
            r_max=self.r_max,
            chemical_symbols=symbols,
            num_layers=hyper["num_layers"],
            chemical_embedding_irreps_out=f"{F}x0e",
            feature_irreps_hidden=str(o3.Irreps([(F, (l, (-1) ** l)) for l in range(hyper["hidden_l_max"] + 1)])),
            irreps_edge_sh=str(o3.Irreps.spherical_harmonics(hyper["l_max"])),
            conv_to_output_hidden_irreps_out=f"{max(1, F // 2)}x0e",
            nonlinearity_type="gate",
            resnet=False,
            use_sc=True,
            num_basis=hyper["num_radial"],
            BesselBasis_trainable=True,
            PolynomialCutoff_p=hyper["envelope_p"],
            invariant_layers=len(hyper["radial_mlp"]),
            invariant_neurons=widths.pop(),
            avg_num_neighbors=avg_num_neighbors,
            per_species_rescale_scales=1.0,
            per_species_rescale_shifts=0.0,
            default_dtype="float32",
            model_dtype="float32",
        )
        self.model = self.build(stress=False)
        self.n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.note = "MD through ASE (host neighbor list every step)"

    def build(self, stress: bool):
        output = "StressForceOutput" if stress else "ForceOutput"
        torch.manual_seed(0)
        return model_from_config({**self.config, "model_builders": ["EnergyModel", "PerSpeciesRescale", output]})

    def batch(self, structures) -> dict:
        graphs = [self.types(AtomicData.from_ase(a, r_max=self.r_max)) for a in structures]
        return AtomicData.to_AtomicDataDict(Batch.from_data_list(graphs))

    def energy_forces(self, structures):
        model = self.build(stress=True) if any(a.pbc.any() for a in structures) else self.model
        model.eval()
        batch = self.batch(structures)
        for key in AtomicDataDict.ALL_ENERGY_KEYS:
            batch.pop(key, None)

        def fn():
            out = model(dict(batch))
            return out[AtomicDataDict.TOTAL_ENERGY_KEY], out[AtomicDataDict.FORCE_KEY]

        return fn

    def train_step(self, structures):
        batch = self.batch(structures)
        energy = batch.pop(AtomicDataDict.TOTAL_ENERGY_KEY).reshape(-1)
        forces = batch.pop(AtomicDataDict.FORCE_KEY)
        optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.model.train()

        def fn():
            out = self.model(dict(batch))
            loss = torch.mean((out[AtomicDataDict.TOTAL_ENERGY_KEY].reshape(-1) - energy) ** 2)
            loss = loss + torch.mean((out[AtomicDataDict.FORCE_KEY] - forces) ** 2)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

        return fn

    def md(self, atoms, steps):
        from ase import units
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
        from ase.md.verlet import VelocityVerlet
        from nequip.ase import NequIPCalculator

        self.model.eval()
        atoms = atoms.copy()
        atoms.calc = NequIPCalculator(self.model, r_max=self.r_max, device="cpu", transform=self.types)
        MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
        dyn = VelocityVerlet(atoms, 1.0 * units.fs)
        return lambda: dyn.run(steps)


def build(model: str, hyper: dict, structures) -> Bench:
    if model != "nequip":
        raise NotImplementedError(f"nequip has no {model}")
    return Bench(hyper, structures)
