"""metrics.csv rows as TensorBoard scalars in RUN/tensorboard/ (`tensorboard --logdir RUN`).

Tags: valid_forces_mae_mev_A → "valid/forces_mae_mev_A", train_loss → "train/loss",
padding_nodes → "padding/nodes", time_s → "time/elapsed_s", epoch_train_s →
"time/epoch_train_s", any other column by its name ("lr", "n_compiles", "epoch").
A resumed run appends a new event file.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from tensorboardX import SummaryWriter

TAGS = {"time_s": "time/elapsed_s", "epoch_train_s": "time/epoch_train_s"}
GROUPS = ("train_", "valid_", "test_", "padding_")  # column prefix → tag folder


def scalar_tag(column: str) -> str:
    """The TensorBoard tag of a metrics.csv column."""
    for prefix in GROUPS:
        if column.startswith(prefix):
            return f"{prefix[:-1]}/{column[len(prefix):]}"
    return TAGS.get(column, column)


class MetricsWriter:
    """Writes metrics rows to RUN/tensorboard/. `purge_step` (resuming): TensorBoard hides
    the events of earlier runs from this step on, which the resumed run writes again."""

    def __init__(self, run_dir: str | Path, purge_step: int | None = None):
        self.log_dir = Path(run_dir) / "tensorboard"
        # Event files are named by the second they are opened in and opened "wb": the
        # nanoseconds keep two writers of one second apart, in the order they started.
        suffix = f".{time.time_ns() % 10**9:09d}"
        self._writer = SummaryWriter(str(self.log_dir), purge_step=purge_step, filename_suffix=suffix)

    def write(self, row: dict, step: int) -> None:
        """Log every numeric, finite value of `row` (a metrics.csv row, values as numbers
        or strings; "" and NaN are skipped) as a scalar at training step `step`."""
        for column, value in row.items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            if column != "step" and math.isfinite(value):
                self._writer.add_scalar(scalar_tag(column), value, global_step=int(step))
        self._writer.flush()  # one row per epoch: visible in TensorBoard at once

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
