"""What the shipped configs promise, checked with the exact client code in-process."""

from __future__ import annotations

from pathlib import Path

import pytest

from liquid_fed.config import load_config
from liquid_fed.federation import Federation, LocalTransport

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
FAST = ["train.eval_every=0", "baselines.uniform=false", "baselines.independent=false"]


def _test_metrics(name: str, overrides: list[str]) -> dict[str, float]:
    cfg = load_config(CONFIGS / name, FAST + overrides)
    return Federation(cfg, LocalTransport(cfg.n_clients)).run().test


def test_regions_liquid_beats_uniform_and_routes_to_the_informative_expert() -> None:
    liquid = _test_metrics("regions.yaml", [])
    uniform = _test_metrics("regions.yaml", ["ensemble.solver=uniform"])
    assert liquid["accuracy"] >= uniform["accuracy"] + 0.1
    assert liquid["accuracy"] >= 0.9
    assert liquid["informative_top_power"] >= 0.9
    assert uniform["informative_top_power"] < 0.5  # ties: argmax picks expert 0 everywhere


def test_regression_config_beats_uniform_vote() -> None:
    liquid = _test_metrics("regression.yaml", [])
    uniform = _test_metrics("regression.yaml", ["ensemble.solver=uniform"])
    assert liquid["rmse"] < 0.75 * uniform["rmse"]
    assert liquid["informative_top_power"] >= 0.9


@pytest.mark.parametrize("seed", [0, 1])
def test_quickstart_reaches_its_accuracy_in_process(seed: int) -> None:
    metrics = _test_metrics("quickstart.yaml", [f"seed={seed}"])
    assert metrics["accuracy"] >= 0.9
