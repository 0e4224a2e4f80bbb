"""Serialise a trained potential as StableHLO (jax.export) for engines outside Python's mpnn.

    python -m mpnn.export --model RUN/model --out model.mpnnx [--bucket 64:2048 --bucket 512:16384]
                          [--dtype float32|float64] [--platforms cpu,cuda]

The output is a zip file (no pickle):

    manifest.json                the contract below, model metadata, and one entry per bucket
    bucket_{N}_{E}.jaxexport     `jax.export.Exported.serialize()` of the function for
                                 n_node = N, n_edge = E (a StableHLO module plus calling
                                 convention; the parameters are constants inside it)

Contract of every bucket's function (all arrays exactly these shapes and dtypes; `float`
is the export dtype, float32 unless --dtype float64):

  inputs
    positions [N, 3] float    Å, Cartesian
    species   [N]    int32    index into manifest["numbers"] (atomic numbers); -1 = padding node
    senders   [E]    int32    edge k goes from atom senders[k] ...
    receivers [E]    int32    ... to atom receivers[k]; both directions of every pair must be
                              present (a full neighbor list of all pairs closer than
                              manifest["cutoff"], periodic images included, self-images too)
    shifts    [E, 3] float    integer cell shifts: edge vector
                              v_k = positions[receivers[k]] − positions[senders[k]] + shifts[k] @ cell
    cell      [3, 3] float    Å, rows are lattice vectors (zeros for a molecule)
    charge    []     float    e, total charge (only models with long_range: electrostatics)
  outputs (a tuple, in this order)
    energy      []        float  eV, sum over real atoms
    forces      [N, 3]    float  eV/Å, −∂E/∂positions (zero on padding nodes)
    virial      [3, 3]    float  eV, W = −Σ_k v_k ⊗ ∂E/∂v_k (symmetric); stress = −W / V (ASE sign)
    energies    [N]       float  eV per atom (zero on padding nodes)
    virials     [N, 3, 3] float  eV per atom, each edge's term split half to each end; Σ = virial
    charges     [N]       float  e, learned charges summing to `charge` (electrostatics only)

Electrostatics (manifest["long_range"]): the Ewald grid is a shape, fixed at export for
cells whose lattice vectors are at most manifest["long_range"]["max_cell_length"] Å
(`--max-cell`); molecules (zero cell) use the free-space sum.

Padding: fill unused node slots with species −1 (any position) and unused edge slots with
an edge between two padding nodes (or any edge touching a padding node): such edges are
ignored exactly. Pick the smallest bucket with N ≥ atoms + 1 and E ≥ edges.

Calling it needs only JAX (no mpnn, no flax, no e3nn):

    import json, zipfile, jax
    archive = zipfile.ZipFile("model.mpnnx")
    manifest = json.loads(archive.read("manifest.json"))
    bucket = manifest["buckets"][0]
    fn = jax.export.deserialize(bytearray(archive.read(bucket["file"])))
    energy, forces, virial, energies, virials = fn.call(positions, species, senders, receivers, shifts, cell)

From C++ (LAMMPS ML-IAP, OpenMM plugins), `fn.mlir_module()` gives the StableHLO text to
compile with any PJRT/XLA runtime; the input/output order above is the calling convention.
float64 exports need `jax.config.update("jax_enable_x64", True)` in a JAX caller.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import zipfile
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mpnn.potential import Potential, energy_and_derivatives, one_graph

FORMAT = "mpnn-export"
FORMAT_VERSION = 1
DEFAULT_BUCKETS = ((32, 1024), (128, 4096), (512, 16384))
INPUTS = [
    {"name": "positions", "shape": ["N", 3], "dtype": "float", "units": "Å"},
    {"name": "species", "shape": ["N"], "dtype": "int32", "doc": "index into numbers; -1 = padding node"},
    {"name": "senders", "shape": ["E"], "dtype": "int32"},
    {"name": "receivers", "shape": ["E"], "dtype": "int32"},
    {"name": "shifts", "shape": ["E", 3], "dtype": "float", "doc": "integer cell shifts; v = r[recv] - r[send] + shifts @ cell"},
    {"name": "cell", "shape": [3, 3], "dtype": "float", "units": "Å", "doc": "rows = lattice vectors; zeros if not periodic"},
]
OUTPUTS = [
    {"name": "energy", "shape": [], "units": "eV"},
    {"name": "forces", "shape": ["N", 3], "units": "eV/Å"},
    {"name": "virial", "shape": [3, 3], "units": "eV", "doc": "stress = -virial / volume (ASE sign)"},
    {"name": "energies", "shape": ["N"], "units": "eV"},
    {"name": "virials", "shape": ["N", 3, 3], "units": "eV"},
]
CHARGE_INPUT = {"name": "charge", "shape": [], "dtype": "float", "units": "e", "doc": "total charge"}
CHARGES_OUTPUT = {"name": "charges", "shape": ["N"], "units": "e", "doc": "learned charges; they sum to charge"}
DEFAULT_MAX_CELL = 30.0  # Å, longest lattice vector an electrostatics export serves


def has_charges(potential: Potential) -> bool:
    """Whether the potential predicts charges (model.long_range=electrostatics)."""
    from mpnn.terms.electrostatics import Electrostatics

    return any(isinstance(term, Electrostatics) for term in potential.global_terms)


def single_graph_fn(potential: Potential):
    """(positions, species, senders, receivers, shifts, cell[, charge]) → (energy, forces,
    virial, energies, virials[, charges]); the bracketed ones with electrostatics.

    One structure per call; species −1 marks padding nodes, and edges touching a padding
    node are masked out, so they change nothing. Built on `energy_and_derivatives`: the
    energy terms and their derivatives are the ones training and the ASE calculator use.
    """
    dtype = potential.np_dtype
    charged = has_charges(potential)

    def fn(positions, species, senders, receivers, shifts, cell, charge=0.0):
        node_mask = species >= 0
        graph = one_graph(
            positions.astype(dtype), jnp.where(node_mask, species, 0), node_mask, senders, receivers,
            node_mask[senders] & node_mask[receivers], cell.astype(dtype), shifts.astype(dtype), charge,
        )
        out = energy_and_derivatives(potential, potential.variables, graph)
        results = (out["energy"][0], out["forces"], out["virial"][0], out["node_energy"], out["node_virial"])
        return results + (out["charges"],) if charged else results

    return fn


def export_bucket(potential: Potential, n_node: int, n_edge: int, platforms: Sequence[str] | None = None):
    """`jax.export.Exported` of `single_graph_fn` for one (n_node, n_edge) bucket (global
    terms as sized by `potential.covering`, see `export_model`)."""
    float_dtype = potential.np_dtype
    specs = (
        jax.ShapeDtypeStruct((n_node, 3), float_dtype),
        jax.ShapeDtypeStruct((n_node,), np.int32),
        jax.ShapeDtypeStruct((n_edge,), np.int32),
        jax.ShapeDtypeStruct((n_edge,), np.int32),
        jax.ShapeDtypeStruct((n_edge, 3), float_dtype),
        jax.ShapeDtypeStruct((3, 3), float_dtype),
    )
    if has_charges(potential):
        specs += (jax.ShapeDtypeStruct((), float_dtype),)
    return jax.export.export(jax.jit(single_graph_fn(potential)), platforms=platforms)(*specs)


def _parse_bucket(text: str) -> tuple[int, int]:
    try:
        n_node, n_edge = (int(x) for x in text.split(":"))
    except ValueError as e:
        raise ValueError(f"bucket {text!r}: expected N_NODE:N_EDGE, e.g. 128:4096") from e
    if n_node < 2 or n_edge < 1:
        raise ValueError(f"bucket {text!r}: need n_node >= 2 (one padding node) and n_edge >= 1")
    return n_node, n_edge


def export_model(
    potential: Potential,
    out: str | Path,
    buckets: Sequence[tuple[int, int]] = DEFAULT_BUCKETS,
    platforms: Sequence[str] | None = ("cpu", "cuda"),
    max_cell: float = DEFAULT_MAX_CELL,
) -> dict:
    """Write the zip archive described in the module docstring; returns its manifest.
    max_cell (Å): longest lattice vector the electrostatics of the export must serve."""
    out = Path(out)
    charged = has_charges(potential)
    if charged:  # molecules (zero cell) and cells up to max_cell
        potential = potential.covering(np.stack([np.zeros((3, 3)), np.eye(3) * max_cell]))
    entries, files = [], {}
    platforms = tuple(platforms) if platforms else None
    for n_node, n_edge in sorted(set(buckets)):
        exported = export_bucket(potential, n_node, n_edge, platforms)
        data = bytes(exported.serialize())
        name = f"bucket_{n_node}_{n_edge}.jaxexport"
        files[name] = data
        entries.append(
            {"n_node": n_node, "n_edge": n_edge, "file": name, "platforms": list(exported.platforms), "sha256": hashlib.sha256(data).hexdigest()}
        )
    config = potential.config
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "jax_version": jax.__version__,
        "model_name": getattr(getattr(config, "model", None), "name", None),
        "numbers": list(potential.numbers),
        "cutoff": potential.cutoff,
        "dtype": potential.dtype,
        "units": {"length": "Å", "energy": "eV", "force": "eV/Å", "virial": "eV"},
        "inputs": INPUTS + ([CHARGE_INPUT] if charged else []),
        "outputs": OUTPUTS + ([CHARGES_OUTPUT] if charged else []),
        "long_range": {"kind": "electrostatics", "max_cell_length": max_cell} if charged else None,
        "padding": "species -1 marks padding nodes; edges touching a padding node are ignored",
        "buckets": entries,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False))
        for name, data in files.items():
            archive.writestr(name, data)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(out)
    return manifest


def load_exported(path: str | Path) -> tuple[dict, dict]:
    """(manifest, {(n_node, n_edge): jax.export.Exported}) from an archive, checking checksums."""
    with zipfile.ZipFile(path) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: not an {FORMAT} v{FORMAT_VERSION} archive")
        functions = {}
        for entry in manifest["buckets"]:
            data = archive.read(entry["file"])
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise ValueError(f"{path}: {entry['file']} checksum mismatch")
            functions[(entry["n_node"], entry["n_edge"])] = jax.export.deserialize(bytearray(data))
    return manifest, functions


def graph_inputs(potential: Potential, atoms, n_node: int, n_edge: int) -> tuple[np.ndarray, ...]:
    """The inputs for `atoms` (six, and the total charge atoms.info["charge"] with
    electrostatics), padded to (n_node, n_edge), from mpnn's host neighbor list."""
    from mpnn.data.neighbors import neighbor_list

    n = len(atoms)
    senders, receivers, shifts = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, potential.cutoff)
    if n_node <= n or n_edge < len(senders):
        raise ValueError(f"{n} atoms / {len(senders)} edges do not fit bucket ({n_node}, {n_edge}) (needs n_node > atoms)")
    dtype = potential.np_dtype
    positions = np.zeros((n_node, 3), dtype)
    positions[:n] = atoms.positions
    species = np.full(n_node, -1, np.int32)
    species[:n] = [potential.species_index[int(z)] for z in atoms.numbers]
    pad_e = n_edge - len(senders)
    send = np.concatenate([senders, np.full(pad_e, n, np.int32)]).astype(np.int32)
    recv = np.concatenate([receivers, np.full(pad_e, n, np.int32)]).astype(np.int32)
    shift = np.zeros((n_edge, 3), dtype)
    shift[: len(senders)] = shifts
    cell = np.asarray(atoms.cell.array if np.any(atoms.pbc) else np.zeros((3, 3)), dtype)
    if has_charges(potential):
        return positions, species, send, recv, shift, cell, np.asarray(atoms.info.get("charge", 0.0), dtype)
    return positions, species, send, recv, shift, cell


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mpnn.export",
        description="Serialise a trained potential's energy/forces/virial function (jax.export, StableHLO) for fixed shape buckets.",
    )
    parser.add_argument("--model", required=True, help="saved model folder (RUN/model)")
    parser.add_argument("--out", required=True, help="output archive (zip)")
    parser.add_argument(
        "--bucket", action="append", default=None, metavar="N_NODE:N_EDGE",
        help="shape bucket (repeatable); default: " + " ".join(f"{n}:{e}" for n, e in DEFAULT_BUCKETS),
    )
    parser.add_argument("--dtype", choices=("float32", "float64"), default=None, help="default: the model's")
    parser.add_argument("--platforms", default="cpu,cuda", help="comma-separated jax.export platforms (default: %(default)s)")
    parser.add_argument(
        "--max-cell", type=float, default=DEFAULT_MAX_CELL,
        help="electrostatics only: longest lattice vector (Å) the Ewald grid serves (default: %(default)s)",
    )
    args = parser.parse_args(argv)

    from mpnn.saved_model import load_model

    potential = load_model(args.model, dtype=args.dtype, set_precision=True)
    buckets = [_parse_bucket(b) for b in args.bucket] if args.bucket else list(DEFAULT_BUCKETS)
    platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
    manifest = export_model(potential, args.out, buckets, platforms, args.max_cell)
    size = Path(args.out).stat().st_size
    print(
        f"wrote {args.out} ({size / 1e6:.2f} MB): elements {manifest['numbers']}, cutoff {manifest['cutoff']} Å, "
        f"{manifest['dtype']}, buckets " + ", ".join(f"{b['n_node']}:{b['n_edge']}" for b in manifest["buckets"])
        + f" for {', '.join(manifest['buckets'][0]['platforms'])}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
