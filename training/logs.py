"""Loss log: a CSV file (always) and TensorBoard scalars (when ``tensorboard`` is installed).

The CSV is the record of a run: one row per logged step. On resume the rows after the resumed
step (written by the killed run after its last checkpoint) are dropped, so the file always reads
as one continuous run and a resumed run's log equals an uninterrupted one's.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

log = logging.getLogger("training")

COLUMNS = ("step", "loss", "lr", "grad_norm", "images", "tokens", "skipped", "seconds")


class LossLog:
    """Append rows to ``path``; optional TensorBoard writer in ``tensorboard_dir``."""

    def __init__(
        self, path: str | os.PathLike, resume_step: int = 0, tensorboard_dir: str | None = None
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[dict[str, str]] = []
        if resume_step > 0 and self.path.is_file():
            with self.path.open(newline="") as f:
                kept = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS)
            w.writeheader()
            w.writerows(kept)
        os.replace(tmp, self.path)
        self._file = self.path.open("a", newline="")
        self._writer = csv.DictWriter(self._file, COLUMNS)
        self._tb = None
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(tensorboard_dir)
            except ImportError:
                log.warning("tensorboard is not installed: logging to %s only", self.path)

    def write(self, row: dict[str, float | int]) -> None:
        self._writer.writerow({k: row.get(k, "") for k in COLUMNS})
        self._file.flush()
        if self._tb is not None:
            for k in ("loss", "lr", "grad_norm"):
                if k in row:
                    self._tb.add_scalar(f"train/{k}", row[k], int(row["step"]))

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_losses(path: str | os.PathLike) -> dict[int, float]:
    """``{step: loss}`` from a loss log (for tests and plots)."""
    with Path(path).open(newline="") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}
