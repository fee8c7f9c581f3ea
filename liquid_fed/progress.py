"""The live progress bar of long runs (tqdm on stderr): round, loss, validation metric."""

from __future__ import annotations

import sys
from typing import Any

from liquid_fed.metrics import primary_metric


class Progress:
    """A live bar per round: loss, latest validation metric, elapsed seconds."""

    def __init__(self, total: int | None, desc: str, enabled: bool = True,
                 unit: str = "round") -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=not enabled,
                        dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
        self.metric = ""

    def round(self, info: Any) -> None:
        if self.bar.total is None:
            self.bar.total = info.total_rounds
        if info.metrics:
            key = primary_metric(info.metrics)
            self.metric = f"{info.metrics[key]:.3f}"
        postfix = {"epoch": f"{info.epoch:.1f}", "loss": f"{info.loss:.4f}",
                   "elapsed": f"{info.elapsed:.1f}s"}
        if self.metric:
            postfix["val"] = self.metric
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(info.round - self.bar.n)

    def close(self) -> None:
        self.bar.close()


