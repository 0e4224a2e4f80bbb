"""Parameter count of our MACE against the reference PyTorch MACE (mace-torch), block by block.

    python benchmarks/mace_torch_params.py [--config configs/mace_rmd17.yaml] [--elements 1 6 8] [--first-self-connection]

Our count comes from the parameter shapes of `mpnn.models.mace` (jax.eval_shape: nothing is
computed). If `mace-torch` is importable, the same architecture is built there as
`mace_run_train --model MACE` builds it (its first interaction block is always
RealAgnosticInteractionBlock, whatever `--interaction_first` says; the later ones
RealAgnosticResidualInteractionBlock) and counted too; `--mace-torch-first residual`
builds the residual block there instead (the MACE paper's description). Otherwise the
per-block formulas are printed.

Expected differences (everything else matches block for block):
- layer 0: mace_run_train's first block maps the atomic basis A through an
  element-dependent linear (`skip_tp` of RealAgnosticInteractionBlock, Z·C² weights per
  l ≤ l_max, "species_linear" below). Ours has none: on rMD17 ethanol (10 epochs,
  benchmarks/accuracy.py, seeds 0 and 1, each with the old and the current embedding
  initialisation) adding it changed the force MAE by +0.6, +3.1, +4.3 and −2.1 %: no
  gain for its weights. With `--mace-torch-first residual` mace-torch's first layer has
  an element-only self-connection (Z·C²) instead, which `model.first_self_connection:
  true` (`--first-self-connection` here) adds to ours (subtracting each element's
  lone-atom output, so a lone atom keeps E0): then that block matches too.
- symmetric_contraction: we keep one weight per *linearly independent symmetric* coupling
  (e3nn.reduced_symmetric_tensor_product_basis); mace-torch keeps one per coupling path of the
  ν-fold tensor product, which for ν ≥ 2 includes paths that only differ by permuting the
  (identical) factors, e.g. K(3, 0e) = 23 there against 8 here for l_max = 3. Both span the
  same functions of A (A⊗A⊗A is symmetric); mace-torch's extra weights are redundant.
"""

from __future__ import annotations

import argparse
import functools
import re
import warnings
from collections import Counter

import jax
import numpy as np

from mpnn.config import load_config
from mpnn.models import build_model
from mpnn.potential import init_model_params

# Block names shared by both implementations, for the side-by-side table.
BLOCKS = [
    "embedding",
    "linear_up",
    "radial_mlp",
    "linear",
    "symmetric_contraction",
    "linear_down",
    "self_connection",
    "readout",
]


def ours(config, num_species: int) -> Counter:
    """{(layer, block): number of parameters} of our MACE (layer None for embedding/readouts)."""
    model = build_model(config.model, num_species, avg_num_neighbors=1.0)
    shapes = {"params": jax.eval_shape(functools.partial(init_model_params, model))}
    counts: Counter = Counter()
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes["params"])[0]:
        keys = [k.key for k in path]
        size = int(np.prod(leaf.shape))
        if keys[0] == "embedding":
            counts[(None, "embedding")] += size
        elif keys[0].startswith("readout"):
            counts[(None, "readout")] += size
        else:
            layer = int(keys[0].split("_")[1])
            block = "radial_mlp" if keys[1].startswith("MessagePassing") else keys[1]
            counts[(layer, block)] += size
    return counts


TORCH_BLOCKS = [
    (r"^node_embedding\.", "embedding"),
    (r"^interactions\.(\d+)\.linear_up\.", "linear_up"),
    (r"^interactions\.(\d+)\.conv_tp_weights\.", "radial_mlp"),
    (r"^interactions\.(\d+)\.linear\.", "linear"),
    (r"^interactions\.(\d+)\.skip_tp\.", "self_connection"),
    (r"^products\.(\d+)\.symmetric_contractions\.", "symmetric_contraction"),
    (r"^products\.(\d+)\.linear\.", "linear_down"),
    (r"^readouts\.", "readout"),
]


def reference(config, numbers: list[int], first: str = "run_train") -> Counter | None:
    """The same counts for mace-torch's MACE, or None if it is not installed. first:
    "run_train" (the first block mace_run_train builds) or "residual"."""
    warnings.filterwarnings("ignore")  # torch / e3nn deprecation chatter
    try:
        import torch
        from mace import modules  # before e3nn: mace makes e3nn's constants loadable with recent torch
        from e3nn import o3
    except Exception as error:  # not installed, or installed but broken
        print(f"(mace-torch not usable: {type(error).__name__}: {error})")
        return None
    m = config.model
    parity = ["e", "o"]
    hidden = " + ".join(f"{m.num_features}x{l}{parity[l % 2]}" for l in range(m.max_L + 1))
    residual = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    first_block = residual if first == "residual" else modules.interaction_classes["RealAgnosticInteractionBlock"]
    model = modules.MACE(
        r_max=m.cutoff,
        num_bessel=m.num_radial,
        num_polynomial_cutoff=m.envelope_p,
        max_ell=m.l_max,
        interaction_cls=residual,
        interaction_cls_first=first_block,
        num_interactions=m.num_layers,
        num_elements=len(numbers),
        hidden_irreps=o3.Irreps(hidden),
        MLP_irreps=o3.Irreps(f"{m.readout_mlp}x0e"),
        atomic_energies=np.zeros(len(numbers)),
        avg_num_neighbors=8.0,
        atomic_numbers=numbers,
        correlation=m.correlation,
        gate=torch.nn.functional.silu,
        radial_MLP=list(m.radial_mlp),
    )
    counts: Counter = Counter()
    for name, p in model.named_parameters():
        for pattern, block in TORCH_BLOCKS:
            match = re.match(pattern, name)
            if match:
                layer = int(match.group(1)) if match.groups() else None
                if block == "self_connection" and layer == 0 and first != "residual":
                    block = "species_linear"  # RealAgnosticInteractionBlock's skip_tp maps A
                counts[(layer, block)] += p.numel()
                break
        else:
            counts[(None, f"other: {name}")] += p.numel()
    return counts


FORMULAS = """How our count is computed (C channels, Z elements, h the radial MLP widths):
  embedding              Z·C
  linear_up              C² per irrep of the layer's input features
  radial_mlp             num_radial·h1 + h1·h2 + ... + h_last·(C · number of tensor-product paths)
  linear                 (C · paths into irrep l)·C for each irrep l of the atomic basis (l ≤ l_max)
  symmetric_contraction  Z·K(ν, L)·C for ν = 1..correlation and each output irrep L,
                         K = multiplicity of L in the ν-th symmetric power of (0e + 1o + ... l_max)
  linear_down            C² per output irrep (only 0e in the last layer)
  self_connection        Z·C² per irrep shared by input and output (layers after the first)
  readout                C per linear readout (all layers but the last) + C·m + m for the MLP readout
No biases anywhere."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mace_rmd17.yaml")
    parser.add_argument("--elements", type=int, nargs="+", default=[1, 6, 8], help="atomic numbers (ethanol: H C O)")
    parser.add_argument("--first-self-connection", action="store_true", help="ours with model.first_self_connection=true")
    parser.add_argument("--mace-torch-first", choices=["run_train", "residual"], default="run_train",
                        help="mace-torch's first block: what mace_run_train builds, or the residual one")
    args = parser.parse_args()
    config = load_config(args.config, ["model.first_self_connection=true"] if args.first_self_connection else [])
    mine = ours(config, len(args.elements))
    theirs = reference(config, args.elements, args.mace_torch_first)
    m = config.model
    print(
        f"{args.config}: {m.num_layers} layers, {m.num_features} channels, l_max {m.l_max}, max_L {m.max_L}, "
        f"correlation {m.correlation}, {len(args.elements)} elements"
    )
    keys = sorted(set(mine) | set(theirs or {}), key=lambda k: (-1 if k[0] is None else k[0], str(k[1])))
    print(f"{'layer':>5}  {'block':<24}{'mpnn':>12}{'mace-torch':>14}")
    for key in keys:
        ref = "" if theirs is None else f"{theirs.get(key, 0):>14,}"
        print(f"{'-' if key[0] is None else key[0]:>5}  {key[1]:<24}{mine.get(key, 0):>12,}{ref}")
    print(f"{'':>5}  {'total':<24}{sum(mine.values()):>12,}" + ("" if theirs is None else f"{sum(theirs.values()):>14,}"))
    if theirs is None:
        print("\nmace-torch is not installed; only our count is shown.\n" + FORMULAS)


if __name__ == "__main__":
    main()
