"""mace-torch (PyTorch MACE) for benchmarks/speed.py (see speed_impls/__init__.py).

Built: `mace.modules.ScaleShiftMACE`, the model mace-torch's `--model MACE` trains:
first interaction RealAgnosticInteractionBlock, then RealAgnosticResidualInteractionBlock,
readout MLP "16x0e", gate silu, scale 1 / shift 0, atomic energies 0, random weights
(torch.manual_seed(0)), float32, eager PyTorch (no torch.compile / cuequivariance).
HYPER maps onto it as
    num_layers    -> num_interactions          num_features, hidden_l_max -> hidden_irreps
    l_max         -> max_ell                   (64x0e+64x1o; paper: 256x0e+256x1o+256x2e)
    correlation   -> correlation               num_radial -> num_bessel
    radial_mlp    -> radial_MLP                cutoff -> r_max
    envelope_p    -> num_polynomial_cutoff     avg_num_neighbors = edges / atoms of `structures`
atomic_numbers: the sorted elements of `structures`.

Graphs: `mace.data.AtomicData.from_config` (matscipy neighbor list, as mace does) batched
with mace's torch_geometric `Batch`, built once outside the timing.
    energy_forces  model(batch, training=False, compute_force=True, compute_stress=<periodic>)
    train_step     model(batch, training=True) E+F, loss mse(E) + mse(F), backward, Adam (lr 1e-3)
    md             ase VelocityVerlet (1 fs, 300 K Maxwell-Boltzmann, seed 0) with a minimal ASE
                   calculator: AtomicData.from_config (host neighbor list) + model, forces only
                   (mace's own MACECalculator would also compute the stress every step).
"""

from __future__ import annotations

import numpy as np
import torch

torch.set_default_dtype(torch.float32)
# e3nn 0.4.4 torch.load-s its own constants.pt (holds `slice`s); torch >= 2.6 loads weights_only.
torch.serialization.add_safe_globals([slice])

from e3nn import o3  # noqa: E402
from mace import data as mace_data  # noqa: E402
from mace import modules  # noqa: E402
from mace.tools import AtomicNumberTable  # noqa: E402
from mace.tools.torch_geometric.batch import Batch  # noqa: E402


def _hidden_irreps(num_features: int, l_max: int) -> o3.Irreps:
    return o3.Irreps([(num_features, (l, (-1) ** l)) for l in range(l_max + 1)])


class Bench:
    def __init__(self, hyper: dict, structures):
        self.cutoff = float(hyper["cutoff"])
        self.z_table = AtomicNumberTable(sorted({int(z) for a in structures for z in a.numbers}))
        graphs = [self.graph(a) for a in structures]
        avg_num_neighbors = sum(g.edge_index.shape[1] for g in graphs) / sum(g.num_nodes for g in graphs)
        torch.manual_seed(0)
        self.model = modules.ScaleShiftMACE(
            r_max=self.cutoff,
            num_bessel=hyper["num_radial"],
            num_polynomial_cutoff=hyper["envelope_p"],
            max_ell=hyper["l_max"],
            interaction_cls_first=modules.interaction_classes["RealAgnosticInteractionBlock"],
            interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            num_interactions=hyper["num_layers"],
            num_elements=len(self.z_table),
            hidden_irreps=_hidden_irreps(hyper["num_features"], hyper["hidden_l_max"]),
            MLP_irreps=o3.Irreps("16x0e"),
            atomic_energies=np.zeros(len(self.z_table)),
            avg_num_neighbors=avg_num_neighbors,
            atomic_numbers=self.z_table.zs,
            correlation=hyper["correlation"],
            gate=modules.gate_dict["silu"],
            radial_MLP=list(hyper["radial_mlp"]),
            atomic_inter_scale=1.0,
            atomic_inter_shift=0.0,
        )
        self.n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.note = "MD through ASE (host neighbor list every step)"

    def graph(self, atoms):
        config = mace_data.config_from_atoms(atoms)
        return mace_data.AtomicData.from_config(config, z_table=self.z_table, cutoff=self.cutoff)

    def batch(self, structures) -> dict:
        return Batch.from_data_list([self.graph(a) for a in structures]).to_dict()

    def energy_forces(self, structures):
        batch = self.batch(structures)
        stress = any(a.pbc.any() for a in structures)
        self.model.eval()

        def fn():
            out = self.model(batch, training=False, compute_force=True, compute_stress=stress)
            return out["energy"], out["forces"], out["stress"]

        return fn

    def train_step(self, structures):
        batch = self.batch(structures)
        energy = torch.tensor([a.info["energy"] for a in structures], dtype=torch.float32)
        forces = torch.tensor(np.concatenate([a.arrays["forces"] for a in structures]), dtype=torch.float32)
        optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.model.train()

        def fn():
            out = self.model(batch, training=True, compute_force=True)
            loss = torch.mean((out["energy"] - energy) ** 2) + torch.mean((out["forces"] - forces) ** 2)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

        return fn

    def md(self, atoms, steps):
        from ase import units
        from ase.calculators.calculator import Calculator, all_changes
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
        from ase.md.verlet import VelocityVerlet

        bench = self
        bench.model.eval()

        class Forces(Calculator):
            implemented_properties = ["energy", "forces"]

            def calculate(self, atoms=None, properties=("forces",), system_changes=all_changes):
                super().calculate(atoms, properties, system_changes)
                out = bench.model(bench.batch([atoms]), training=False, compute_force=True)
                self.results = {"energy": out["energy"].item(), "forces": out["forces"].detach().numpy().astype(np.float64)}

        atoms = atoms.copy()
        atoms.calc = Forces()
        MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
        dyn = VelocityVerlet(atoms, 1.0 * units.fs)
        return lambda: dyn.run(steps)


def build(model: str, hyper: dict, structures) -> Bench:
    if model != "mace":
        raise NotImplementedError(f"mace-torch has no {model}")
    return Bench(hyper, structures)
