"""ASE calculator over a saved model or a `Potential`.

Shapes are padded to buckets that only ever grow, so a long MD run or relaxation
compiles a handful of XLA programs, not one per step.
"""

from __future__ import annotations

from pathlib import Path

import ase
import jax
import numpy as np
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from mpnn.data.frames import Frame
from mpnn.data.graphs import bucket_size, pad_graph
from mpnn.potential import Potential


class MPNNCalculator(Calculator):
    """Energy (eV), forces (eV/Å), per-atom energies, and for periodic cells stress
    (eV/Å³, Voigt, ASE sign) and per-atom virials (eV, `atoms.calc.results["virials"]`).
    With model.long_range=electrostatics also "charges" (e, summing to
    `atoms.info["charge"]`, default 0) and for molecules "dipole" (e·Å)."""

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress", "virials", "charges", "dipole"]

    def __init__(self, model: str | Path | Potential, dtype: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(model, Potential):
            if dtype is not None and dtype != model.dtype:
                raise ValueError("pass a model path to change the dtype of a Potential")
            self.potential = model
        else:
            from mpnn.saved_model import load_model

            self.potential = load_model(model, dtype=dtype)
        self._n_node = 0
        self._n_edge = 0

    def calculate(self, atoms: ase.Atoms | None = None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        graph = self.potential.to_graph(Frame.from_atoms(self.atoms, source="ase atoms"))
        n_atom = int(graph.n_node[0])
        # Grow-only buckets: shapes change only when the system outgrows them.
        self._n_node = max(self._n_node, bucket_size(n_atom + 1))
        self._n_edge = max(self._n_edge, bucket_size(int(graph.n_edge[0])))
        padded = pad_graph(graph, self._n_node, self._n_edge, 2)
        out = jax.device_get(self.potential.predict_graph(padded, virials=bool(self.atoms.pbc.any())))
        energy = float(out["energy"][0])
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "energies": np.asarray(out["node_energy"][:n_atom], dtype=np.float64),
            "forces": np.asarray(out["forces"][:n_atom], dtype=np.float64),
        }
        if "charges" in out:
            self.results["charges"] = np.asarray(out["charges"][:n_atom], dtype=np.float64)
            if not self.atoms.pbc.any():
                self.results["dipole"] = np.asarray(out["dipole"][0], dtype=np.float64)
        if self.atoms.pbc.any():
            self.results["stress"] = full_3x3_to_voigt_6_stress(np.asarray(out["stress"][0], dtype=np.float64))
            self.results["virials"] = np.asarray(out["node_virial"][:n_atom], dtype=np.float64)
