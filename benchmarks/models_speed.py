"""Training and inference speed of each model config on the bundled data.

    python benchmarks/models_speed.py [--configs configs/default.yaml configs/mace_ethanol.yaml] [--steps 30]

Prints, per config: parameter count, compile time of the training step and of
inference (separately), training time per step and per epoch, inference time per atom.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from mpnn.config import load_config, loss_weights
from mpnn.data.graphs import iterate_batches
from mpnn.training.loop import setup


def block(tree):
    return jax.tree_util.tree_map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)


def benchmark(config_path: str, steps: int) -> dict:
    config = load_config(config_path)
    s = setup(config)  # the training run's own setup: data, statistics, potential, state, step
    potential, graphs, state, train_step = s.potential, s.train_graphs, s.state, s.train_step
    batches = [s.batch(step)[0] for step in s.plan(1)]  # as training builds them (device axis first)

    start = time.perf_counter()
    lr_scale = np.ones((), potential.np_dtype)
    weights = {k: np.asarray(v, potential.np_dtype) for k, v in loss_weights(config.train, 1).items()}
    state, loss, _ = block(train_step(state, batches[0], lr_scale, weights))
    compile_train = time.perf_counter() - start
    start = time.perf_counter()
    for k in range(steps):
        state, loss, _ = train_step(state, batches[(k + 1) % len(batches)], lr_scale, weights)
    block(loss)
    step_time = (time.perf_counter() - start) / steps

    # Inference: energy + forces (+ stress) on padded batches of the eval batch size.
    eval_batches = list(iterate_batches(graphs, config.train.eval_batch_size, shape=s.eval_shape))
    start = time.perf_counter()
    block(potential.predict_graph(eval_batches[0]))
    compile_infer = time.perf_counter() - start
    start = time.perf_counter()
    n_atoms = 0
    for batch in eval_batches[1:]:
        out = potential.predict_graph(batch)
        n_atoms += int(batch.n_node[:-1].sum())
    block(out)
    infer_per_atom = (time.perf_counter() - start) / max(n_atoms, 1)
    return {
        "config": config_path,
        "model": config.model.name,
        "parameters": s.n_parameters,
        "compile_train_s": compile_train,
        "train_step_ms": 1e3 * step_time,
        "train_epoch_s": step_time * s.steps_per_epoch,
        "compile_inference_s": compile_infer,
        "inference_us_per_atom": 1e6 * infer_per_atom,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["configs/default.yaml", "configs/mace_ethanol.yaml"])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    header = f"{'config':32s} {'model':7s} {'params':>8s} {'compile train':>14s} {'step ms':>8s} {'epoch s':>8s} {'compile infer':>14s} {'infer µs/atom':>14s}"
    print(header)
    for path in args.configs:
        r = benchmark(path, args.steps)
        print(
            f"{r['config']:32s} {r['model']:7s} {r['parameters']:8d} {r['compile_train_s']:13.1f}s {r['train_step_ms']:8.1f} "
            f"{r['train_epoch_s']:8.1f} {r['compile_inference_s']:13.1f}s {r['inference_us_per_atom']:14.1f}"
        )


if __name__ == "__main__":
    main()
