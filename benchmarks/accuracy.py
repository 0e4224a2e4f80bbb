"""Accuracy on public benchmarks, beside mace-torch in the same run.

    python benchmarks/accuracy.py rmd17-ethanol --data-root ../shared/data/public
    python benchmarks/accuracy.py rmd17-aspirin --data-root DIR --epochs 50 --mace-torch /path/to/torch-venv/bin/python
    python benchmarks/accuracy.py mlearn-si --data-root DIR --model nequip

Nothing is downloaded: `--data-root` is a folder laid out as `../shared/data/public`
(see its README for provenance): `rmd17_aspirin/{train,test}.xyz`,
`rmd17_ethanol/{train,test_MD}.xyz`, `3bpa/{train_300K,train_mixedT}.xyz`,
`mlearn_elemental/{Si,Ge,Li,Mo}_{train,test}.xyz`.

Protocol (the paper each benchmark mirrors):
- rMD17 (MACE paper, Batatia et al., NeurIPS 2022, arXiv:2206.07697, Table 1): 1000
  training configurations, 950 to train and 50 to validate (selection of the best
  epoch), the test file for the errors. Energy MAE is per molecule (meV), as published.
  The papers test on the ~99k frames outside an official split; these test files are
  1000–1800 frames of the same distribution (not the identical set).
- 3BPA (Kovács et al., JCTC 2021): train on 300 K frames (450 + 50 valid); the published
  300/600/1200 K test sets are not in the data root, so the test is the `train_mixedT`
  frames not in `train_300K` (300–1200 K): an extrapolation check, not comparable with
  the published tables.
- mlearn (Zuo et al., J. Phys. Chem. A 2020): one element's train file (90 % train, 10 %
  valid) and its test file, energy, forces and stress.

Both implementations get the same split files (written to `--out`), the same
hyperparameters and the same number of epochs; each is pinned to its own core
(`--cores`, the two runs go side by side); "wall s" is each training process's wall time
(start-up, compilation and the implementation's own final evaluation included). Sizes:
`--size small` (the default, CPU-sized: 2 layers, 64x0e+64x1o, harmonics l ≤ 2,
correlation 3, batch 5, amsgrad lr 0.01, EMA 0.99, energy weight 1, forces weight 100,
weight decay 5e-7, float32) or `--size paper` (configs/mace_rmd17.yaml: 256 channels,
l ≤ 3, L ≤ 2, forces weight 1000; GPU-sized). Learning rate: constant, reduced by 0.8
after 50 epochs without validation improvement in both (mace-torch's default
ReduceLROnPlateau; ours `train.schedule=plateau`). E0: least squares on the training
set in both (ours `fit`, mace-torch `average`). Errors are computed here, the same way
for both: energy MAE per atom and per structure, force MAE per component.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator

ROOT = Path(__file__).resolve().parents[1]

# name → (train file, test file or None, training frames (None: all), valid fraction,
#         published (model → (energy MAE meV per structure, force MAE meV/Å)), note)
BENCHMARKS = {
    "rmd17-aspirin": ("rmd17_aspirin/train.xyz", "rmd17_aspirin/test.xyz", 1000, 0.05,
                      {"mace": (2.2, 6.6), "nequip": (2.3, 8.2)}, "MACE paper Table 1; NequIP as quoted there"),
    "rmd17-ethanol": ("rmd17_ethanol/train.xyz", "rmd17_ethanol/test_MD.xyz", 1000, 0.05,
                      {"mace": (0.4, 2.1), "nequip": (0.4, 2.8)}, "MACE paper Table 1; NequIP as quoted there"),
    "3bpa": ("3bpa/train_300K.xyz", None, None, 0.1, {}, "test: train_mixedT frames not in train_300K (not the published sets)"),
    **{
        f"mlearn-{el.lower()}": (f"mlearn_elemental/{el}_train.xyz", f"mlearn_elemental/{el}_test.xyz", None, 0.1, {}, "mlearn (Zuo et al. 2020)")
        for el in ("Si", "Ge", "Li", "Mo")
    },
}

SIZES = {  # (MACE hyperparameters shared by both, training settings shared by both)
    "small": (dict(num_layers=2, num_features=64, max_L=1, l_max=2, correlation=3, num_radial=8, envelope_p=5,
                   radial_mlp=[64, 64, 64], readout_mlp=16, cutoff=5.0),
              dict(batch_size=5, lr=0.01, ema_decay=0.99, energy_weight=1.0, forces_weight=100.0, stress_weight=1.0, weight_decay=5e-7)),
    "paper": (dict(num_layers=2, num_features=256, max_L=2, l_max=3, correlation=3, num_radial=8, envelope_p=5,
                   radial_mlp=[64, 64, 64], readout_mlp=16, cutoff=5.0),
              dict(batch_size=5, lr=0.01, ema_decay=0.99, energy_weight=1.0, forces_weight=1000.0, stress_weight=1.0, weight_decay=5e-7)),
}


def labelled(atoms) -> ase.Atoms:
    """A copy with its labels twice: on a calculator (energy/forces/stress, what ase and
    mpnn read) and as REF_* keys (what mace-torch reads)."""
    calc = atoms.calc
    out = atoms.copy()
    results = {k: calc.results[k] for k in ("energy", "forces", "stress") if k in calc.results}
    out.info["REF_energy"] = results["energy"]
    out.arrays["REF_forces"] = results["forces"]
    if "stress" in results:
        out.info["REF_stress"] = results["stress"]
    out.calc = SinglePointCalculator(out, **results)
    return out


def prepare(name: str, data_root: Path, out: Path, seed: int) -> dict[str, Path]:
    """Write train/valid/test extxyz files of the benchmark's split into `out`."""
    train_file, test_file, n_train, valid_fraction, _, _ = BENCHMARKS[name]
    frames = ase.io.read(data_root / train_file, ":")
    frames = frames[:n_train] if n_train else frames
    if test_file is None:  # 3BPA: the mixed-temperature frames that are not 300 K training frames
        seen = {np.round(a.positions, 5).tobytes() for a in frames}
        test = [a for a in ase.io.read(data_root / "3bpa/train_mixedT.xyz", ":") if np.round(a.positions, 5).tobytes() not in seen]
    else:
        test = ase.io.read(data_root / test_file, ":")
    order = np.random.default_rng(seed).permutation(len(frames))
    n_valid = max(1, round(valid_fraction * len(frames)))
    parts = {"valid": [frames[i] for i in order[:n_valid]], "train": [frames[i] for i in order[n_valid:]], "test": test}
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for part, part_frames in parts.items():
        paths[part] = out / f"{part}.xyz"
        ase.io.write(paths[part], [labelled(a) for a in part_frames])
    print(f"{name}: {len(parts['train'])} train / {len(parts['valid'])} valid / {len(test)} test frames → {out}", flush=True)
    return paths


def pinned(core: int | None) -> list[str]:
    return ["taskset", "-c", str(core)] if core is not None else []


def thread_env(threads: int) -> dict:
    flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" if threads == 1 else ""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "XLA_FLAGS": flags}


def ours_command(model: str, size: str, paths: dict, epochs: int, seed: int, run_dir: Path, dtype: str) -> list[str]:
    hyper, training = SIZES[size]
    model_keys = {**hyper} if model == "mace" else {"num_layers": hyper["num_layers"], "num_features": hyper["num_features"],
                                                    "l_max": hyper["l_max"], "hidden_l_max": hyper["max_L"], "parity": False, "cutoff": hyper["cutoff"]}
    overrides = [f"model.name={model}", *(f"model.{k}={json.dumps(v)}" for k, v in model_keys.items()), f"model.dtype={dtype}"]
    overrides += [f"train.{k}={v}" for k, v in training.items()]
    overrides += [
        f"data.train={paths['train']}", f"data.valid={paths['valid']}", f"data.test={paths['test']}",
        "train.optimizer=amsgrad", "train.schedule=plateau", "train.plateau_factor=0.8", "train.plateau_patience=50",
        "train.warmup_epochs=0", f"train.max_epochs={epochs}", "train.max_time=null", "train.progress=false", f"seed={seed}",
        f"run.dir={run_dir}", "run.overwrite=true", "model.e0=fit", "model.scale=forces_rms",
    ]
    return [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/default.yaml"), *overrides]


def mace_torch_command(python: str, size: str, paths: dict, epochs: int, seed: int, work_dir: Path, dtype: str) -> list[str]:
    hyper, training = SIZES[size]
    irreps = " + ".join(f"{hyper['num_features']}x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(hyper["max_L"] + 1))
    stress = "PerAtomMAEstressvirials" if "mlearn" in str(paths["train"]) else "PerAtomMAE"
    return [
        str(Path(python).parent / "mace_run_train"), "--name", "mace", "--work_dir", str(work_dir), "--seed", str(seed),
        "--train_file", str(paths["train"]), "--valid_file", str(paths["valid"]), "--test_file", str(paths["test"]),
        "--energy_key", "REF_energy", "--forces_key", "REF_forces", "--stress_key", "REF_stress", "--E0s", "average",
        "--model", "MACE", "--hidden_irreps", irreps, "--max_ell", str(hyper["l_max"]), "--correlation", str(hyper["correlation"]),
        "--num_interactions", str(hyper["num_layers"]), "--r_max", str(hyper["cutoff"]), "--num_radial_basis", str(hyper["num_radial"]),
        "--num_cutoff_basis", str(hyper["envelope_p"]), "--radial_MLP", json.dumps(hyper["radial_mlp"]),
        "--MLP_irreps", f"{hyper['readout_mlp']}x0e", "--scaling", "rms_forces_scaling",
        "--loss", "stress" if stress != "PerAtomMAE" else "weighted", "--error_table", stress,
        "--energy_weight", str(training["energy_weight"]), "--forces_weight", str(training["forces_weight"]),
        "--stress_weight", str(training["stress_weight"]), "--batch_size", str(training["batch_size"]), "--valid_batch_size", "10",
        "--lr", str(training["lr"]), "--amsgrad", "--ema", "--ema_decay", str(training["ema_decay"]),
        "--weight_decay", str(training["weight_decay"]), "--scheduler", "ReduceLROnPlateau", "--lr_factor", "0.8",
        "--scheduler_patience", "50", "--max_num_epochs", str(epochs), "--patience", str(10 * epochs + 100),
        "--clip_grad", "10", "--default_dtype", dtype, "--device", "cpu", "--restart_latest",
    ]


MACE_EVAL = """
import json, sys, numpy as np, ase.io, torch
from mace.calculators import MACECalculator
torch.set_num_threads(1)
calc = MACECalculator(model_paths=sys.argv[1], device="cpu", default_dtype=sys.argv[3])
rows = []
for atoms in ase.io.read(sys.argv[2], ":"):
    ref_e, ref_f = atoms.info["REF_energy"], atoms.arrays["REF_forces"]
    ref_s = atoms.info.get("REF_stress")
    atoms.calc = calc
    row = {"n": len(atoms), "de": atoms.get_potential_energy() - ref_e, "df": (atoms.get_forces() - ref_f).ravel().tolist()}
    if ref_s is not None:
        row["ds"] = (atoms.get_stress() - np.asarray(ref_s)).tolist()
    rows.append(row)
json.dump(rows, open(sys.argv[4], "w"))
"""

OURS_EVAL = """
import json, sys, numpy as np, ase.io, mpnn
from ase.stress import full_3x3_to_voigt_6_stress
potential = mpnn.load(sys.argv[1])
frames = ase.io.read(sys.argv[2], ":")
rows = []
for atoms, p in zip(frames, potential.predict(frames)):
    row = {"n": len(atoms), "de": float(p["energy"]) - atoms.get_potential_energy(), "df": (np.asarray(p["forces"]) - atoms.get_forces()).ravel().tolist()}
    if "stress" in atoms.calc.results and "stress" in p:
        stress = np.asarray(p["stress"])
        stress = full_3x3_to_voigt_6_stress(stress) if stress.shape == (3, 3) else stress  # as ase's get_stress
        row["ds"] = (stress - atoms.get_stress()).tolist()
    rows.append(row)
json.dump(rows, open(sys.argv[4], "w"))
"""


def errors(rows_path: Path) -> dict:
    """MAE / RMSE from per-frame differences: energy per atom (meV/atom) and per
    structure (meV), forces per component (meV/Å), stress per component (meV/Å³)."""
    rows = json.loads(rows_path.read_text())
    de = np.array([r["de"] for r in rows])
    per_atom = de / np.array([r["n"] for r in rows])
    df = np.concatenate([r["df"] for r in rows])
    out = {
        "energy_mae_mev_atom": 1e3 * np.abs(per_atom).mean(), "energy_mae_mev": 1e3 * np.abs(de).mean(),
        "energy_rmse_mev_atom": 1e3 * np.sqrt((per_atom**2).mean()),
        "forces_mae_mev_A": 1e3 * np.abs(df).mean(), "forces_rmse_mev_A": 1e3 * np.sqrt((df**2).mean()), "n_frames": len(rows),
    }
    stress = [r["ds"] for r in rows if "ds" in r]
    if stress:
        out["stress_mae_mev_A3"] = 1e3 * np.abs(np.array(stress)).mean()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS))
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "public")
    parser.add_argument("--model", choices=["mace", "nequip"], default="mace", help="our model (mace-torch always runs MACE)")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--mace-torch", metavar="PYTHON", help="a Python with mace-torch installed: train it beside ours")
    parser.add_argument("--cores", default="0,1", help="cores for ours and mace-torch (taskset), '' for no pinning")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "accuracy")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        help="extra override for our training, e.g. model.first_self_connection=true (repeatable)")
    args = parser.parse_args(argv)

    out = args.out / f"{args.benchmark}-{args.model}-{args.size}-{args.epochs}ep"
    paths = prepare(args.benchmark, args.data_root, out / "data", args.seed)
    cores = [int(c) for c in args.cores.split(",")] if args.cores else [None, None]
    jobs = {"ours": ours_command(args.model, args.size, paths, args.epochs, args.seed, out / "ours", args.dtype) + args.set}
    if args.mace_torch:
        jobs["mace-torch"] = mace_torch_command(args.mace_torch, args.size, paths, args.epochs, args.seed, out / "mace-torch", args.dtype)
    started, processes = time.perf_counter(), {}
    for k, (name, command) in enumerate(jobs.items()):
        log = open(out / f"{name}.log", "w")
        processes[name] = (subprocess.Popen(pinned(cores[k % len(cores)]) + command, stdout=log, stderr=subprocess.STDOUT, env=thread_env(1), cwd=ROOT), log)
        print(f"{name}: training ({out / f'{name}.log'})", flush=True)
    wall = {}
    while len(wall) < len(processes):  # each one's own end time
        for name, (process, log) in processes.items():
            if name not in wall and process.poll() is not None:
                if process.returncode != 0:
                    raise SystemExit(f"{name} failed: see {log.name}")
                wall[name] = time.perf_counter() - started
        time.sleep(0.5)
    results = {}
    for k, name in enumerate(jobs):
        rows = out / f"{name}_test_errors.json"
        if name == "ours":
            script, model_path = OURS_EVAL, out / "ours" / "model"
        else:
            script, model_path = MACE_EVAL, out / "mace-torch" / "mace.model"
        python = sys.executable if name == "ours" else args.mace_torch
        subprocess.run(pinned(cores[k % len(cores)]) + [python, "-c", script, str(model_path), str(paths["test"]), args.dtype, str(rows)],
                       check=True, env=thread_env(1), cwd=ROOT)
        results[name] = {**errors(rows), "process_wall_s": round(wall[name], 1)}
    report(args, results)
    (out / "summary.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    return 0


def report(args, results: dict) -> None:
    published, source = BENCHMARKS[args.benchmark][4], BENCHMARKS[args.benchmark][5]
    print(f"\n{args.benchmark}, {args.size} size, {args.epochs} epochs, {args.dtype} (test set, {results['ours']['n_frames']} frames)")
    print(f"{'':14s} {'E MAE meV/atom':>15s} {'E MAE meV':>10s} {'F MAE meV/Å':>12s} {'F RMSE':>8s} {'σ MAE meV/Å³':>13s} {'wall s':>8s}")
    for name, m in results.items():
        label = f"ours {args.model}" if name == "ours" else name
        stress = f"{m['stress_mae_mev_A3']:13.2f}" if "stress_mae_mev_A3" in m else f"{'–':>13s}"
        print(f"{label:14s} {m['energy_mae_mev_atom']:15.3f} {m['energy_mae_mev']:10.2f} {m['forces_mae_mev_A']:12.2f} "
              f"{m['forces_rmse_mev_A']:8.2f} {stress} {m['process_wall_s']:8.0f}")
    if "mace-torch" in results:
        ratio = results["ours"]["forces_mae_mev_A"] / results["mace-torch"]["forces_mae_mev_A"]
        print(f"force MAE ours / mace-torch: {ratio:.2f}×")
    for model, (e, f) in published.items():
        print(f"published {model} (converged, {source}): E {e} meV, F {f} meV/Å")
    if BENCHMARKS[args.benchmark][5] and not published:
        print(f"note: {source}")


if __name__ == "__main__":
    sys.exit(main())
