"""The per-step metric log: one row of logged scalars per step, written to a parquet file at each flush."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from didr.training.atomic import write_atomically


class MetricsLog:
    """Rows of scalars (each with its "step") kept in memory; `flush` rewrites the parquet file atomically.

    The alignment loop flushes before each checkpoint, so the file always reaches at least the newest checkpoint's
    step; a resumed run cuts it back to that step and continues, with no step missing or repeated.
    """

    def __init__(self, path: str | Path | None):
        self.path = None if path is None else Path(path)
        self.rows: list[dict[str, float]] = []

    def resume(self, step: int) -> None:
        """Reload the rows of steps 0 .. step - 1 from the file (rows after them are dropped)."""
        if self.path is None or step == 0:
            return
        if not self.path.exists():
            raise ValueError(f"metrics log {self.path} is missing: cannot resume it at step {step}")
        frame = pd.read_parquet(self.path)
        frame = frame[frame["step"] < step]
        if frame["step"].tolist() != list(range(step)):
            raise ValueError(f"metrics log {self.path} does not hold steps 0 to {step - 1} exactly once")
        self.rows = [{k: float(v) for k, v in row.items()} for row in frame.to_dict("records")]

    def append(self, row: dict[str, float]) -> None:
        self.rows.append(row)

    def flush(self) -> None:
        """Write every row so far to the parquet file (an integer "step" column, one column per scalar)."""
        if self.path is None or not self.rows:
            return
        frame = pd.DataFrame(self.rows).astype({"step": "int64"})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, lambda tmp: frame.to_parquet(tmp, index=False))
