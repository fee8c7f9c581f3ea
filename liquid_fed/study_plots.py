"""Figures of a study (PNG, written whole): see :func:`plot_study`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

FIGURES_DIR = "figures"


def plot_study(study: Any, out: Path) -> list[Path]:
    """Every figure of a finished study folder; returns the files written."""
    return []
