"""Command-line entry points. `python train.py` is a thin wrapper around `train_main`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from mpnn.config import load_config


def train_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python train.py",
        description="Train a potential. Overrides look like key.sub=value, e.g. train.max_epochs=5 model.name=nequip",
    )
    parser.add_argument("--config", default="configs/default.yaml", help="YAML config (default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue the run in run.dir from its last checkpoint")
    parser.add_argument("overrides", nargs="*", help="dotted overrides key.sub=value")
    args = parser.parse_args(argv)

    # Our own progress at INFO; libraries (orbax, absl) only when they warn.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("mpnn").setLevel(logging.INFO)
    config = load_config(args.config, list(args.overrides) + (["run.resume=true"] if args.resume else []))

    import jax

    from mpnn.host_memory import keep_freed_memory

    keep_freed_memory()  # before the first computation, as precision: this entry point owns its process

    if config.run.distributed:  # before anything touches a device
        from mpnn.training.parallel import initialize_distributed

        initialize_distributed(config.run.coordinator_address, config.run.num_processes, config.run.process_id)
        if jax.process_index() > 0:  # one log: the first process's
            logging.getLogger("mpnn").setLevel(logging.WARNING)

    if config.model.dtype == "float64":
        from mpnn.potential import enable_x64

        enable_x64()  # an entry point owns its process: the one place precision is switched

    from mpnn.evaluate import format_metrics
    from mpnn.training.loop import train

    results = train(config)
    if jax.process_index() > 0:  # the first process reports
        return 0
    print(f"\nrun folder: {config.run.dir}  (best epoch {results['best_epoch']} after {results['epochs']:.3g} epochs, {results['train_time_s']:.0f} s)")
    for split in ("valid", "test"):
        if results[split] is not None:
            print(f"{split:>5}: {format_metrics(results[split])}")
    print(json.dumps({k: results[k] for k in ("valid", "test")}))
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
