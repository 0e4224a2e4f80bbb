"""The model ladder on the bundled data: descriptor network → invariant → equivariant
two-body → equivariant many-body → strictly local equivariant, same data, same split.

    taskset -c 0 python benchmarks/ladder.py          # both data sets, all five models, 1 core
    python benchmarks/ladder.py --datasets cu --models bpnn,mace --epochs 4 --budget 30

Every model is trained twice through `train.py` (the CLI a user runs):
- at the same number of epochs (`--epochs`, cosine schedule over them);
- at the same wall-clock budget (`--budget` seconds of training, `train.max_time`, with
  the plateau schedule, since a cosine schedule needs to know its length).
It prints a table per data set: test energy / force (/ stress) MAE of both runs,
parameter count, training step time (median over epochs after the first, which
compiles) and E+F inference time per atom (`Potential.predict` on the test set, after a
warm-up). Sizes: each model's paper defaults where they fit a 2-core CPU run, else the
smaller settings in SIZES below. Threads: XLA uses every core it is allowed; pin the run
(`taskset -c 0`) and state it. Data: the first `--max-frames` frames of each set (default
per set below), split 80/10/10 as `train.py` does.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DATASETS = {
    "ethanol": dict(
        train="data/ethanol_xtb.xyz", cutoff=5.0, batch_size=8, max_frames=300,
        weights=["train.energy_weight=100", "train.forces_weight=10"],
    ),
    "cu": dict(
        train="data/cu_emt.xyz", cutoff=4.5, batch_size=4, max_frames=100,
        weights=["train.energy_weight=100", "train.forces_weight=10", "train.stress_weight=100"],
    ),
}

# Model sections (beyond name and cutoff). BPNN, SchNet and Allegro: their config defaults
# (the papers' / reference packages' settings) except Allegro's tensor track, natural
# parity only; NequIP as configs/default.yaml; MACE with 32 channels (mace-torch's
# default 128 is too slow for this CPU comparison).
SIZES = {
    "bpnn": [],
    "schnet": [],
    "nequip": ["model.num_layers=3", "model.num_features=32", "model.l_max=2", "model.parity=false"],
    "mace": ["model.num_features=32", "model.l_max=2", "model.max_L=1", "model.correlation=3"],
    "allegro": ["model.parity=false"],
}
LADDER = ["bpnn", "schnet", "nequip", "mace", "allegro"]
RUNG = {
    "bpnn": "descriptors + MLP",
    "schnet": "invariant MP",
    "nequip": "equivariant 2-body MP",
    "mace": "equivariant many-body MP",
    "allegro": "strictly local equivariant",
}


def train(dataset: str, model: str, run_dir: Path, budget: dict, max_frames: int | None) -> None:
    spec = DATASETS[dataset]
    cmd = [
        sys.executable, str(ROOT / "train.py"),
        f"data.train={spec['train']}", f"model.name={model}", f"model.cutoff={spec['cutoff']}", *SIZES[model],
        f"train.batch_size={spec['batch_size']}", *spec["weights"], "train.progress=false",
        f"run.dir={run_dir}", "run.overwrite=true",
    ]
    cmd.append(f"data.max_frames={max_frames or spec['max_frames']}")
    if "epochs" in budget:
        cmd += [f"train.max_epochs={budget['epochs']}", "train.schedule=cosine"]
    else:
        cmd += [f"train.max_time={budget['seconds']}", "train.max_epochs=100000", "train.schedule=plateau",
                "train.plateau_patience=3"]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def step_time_ms(run_dir: Path) -> float:
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    times, steps = [], [0] + [int(r["step"]) for r in rows]
    for k, row in enumerate(rows):
        if k > 0 and steps[k + 1] > steps[k]:  # epoch 1 includes compilation
            times.append(float(row["epoch_train_s"]) / (steps[k + 1] - steps[k]))
    return 1e3 * statistics.median(times) if times else float("nan")


def inference_us_per_atom(run_dir: Path) -> float:
    """E+F(+stress) through Potential.predict on the run's test frames, after a warm-up."""
    import mpnn
    from mpnn.config import load_config
    from mpnn.data.dataset import load_splits

    config = load_config(run_dir / "config.yaml")
    test = load_splits(config.data, config.train).test
    potential = mpnn.load(run_dir / "model")
    potential.predict(test)  # compile
    start = time.perf_counter()
    potential.predict(test)
    return 1e6 * (time.perf_counter() - start) / sum(f.n_atom for f in test)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="ethanol,cu")
    parser.add_argument("--models", default=",".join(LADDER))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of training per model")
    parser.add_argument("--max-frames", type=int, default=None, help="first N frames of each set (default: per set)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ladder")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for dataset in args.datasets.split(","):
        rows = []
        for model in args.models.split(","):
            runs = {}
            for kind, budget in (("epochs", {"epochs": args.epochs}), ("time", {"seconds": args.budget})):
                run_dir = args.out / f"{dataset}_{model}_{kind}"
                train(dataset, model, run_dir, budget, args.max_frames)
                runs[kind] = json.loads((run_dir / "results.json").read_text())
            epochs_dir = args.out / f"{dataset}_{model}_epochs"
            rows.append(
                dict(
                    model=model, runs=runs, n_parameters=runs["epochs"]["n_parameters"],
                    step_ms=step_time_ms(epochs_dir), us_per_atom=inference_us_per_atom(epochs_dir),
                )
            )
            print(f"{dataset} {model}: done", file=sys.stderr)
        (args.out / f"{dataset}.json").write_text(json.dumps(rows, indent=2))
        print_table(dataset, rows, args)
    return 0


def print_table(dataset: str, rows: list[dict], args) -> None:
    stress = dataset == "cu"
    print(f"\n{dataset} ({DATASETS[dataset]['train']}, first {args.max_frames or DATASETS[dataset]['max_frames']} frames), "
          f"test set; {args.epochs} epochs | {args.budget:.0f} s budget")
    head = "| model | rung | params | E meV/atom | F meV/Å |" + (" σ meV/Å³ |" if stress else "")
    head += " epochs in budget | step ms | predict µs/atom |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for row in rows:
        e, t = row["runs"]["epochs"]["test"], row["runs"]["time"]["test"]
        cells = [
            row["model"], RUNG[row["model"]], f"{row['n_parameters']:,}",
            f"{e['energy_mae_mev_atom']:.2f} \\| {t['energy_mae_mev_atom']:.2f}",
            f"{e['forces_mae_mev_A']:.1f} \\| {t['forces_mae_mev_A']:.1f}",
        ]
        if stress:
            cells.append(f"{e['stress_mae_mev_A3']:.2f} \\| {t['stress_mae_mev_A3']:.2f}")
        cells += [f"{row['runs']['time']['epochs']:.1f}", f"{row['step_ms']:.0f}", f"{row['us_per_atom']:.0f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
