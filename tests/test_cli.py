"""The `liquid-fed` command line off the happy path, before any Ray process starts."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def liquid_fed(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "liquid_fed.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_of_a_planted_pickle_runs_no_code(tmp_path: Path) -> None:
    run = tmp_path / "victim"
    cfg = liquid_fed("validate", str(QUICKSTART))
    assert cfg.returncode == 0, cfg.stderr
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.stdout)
    marker = tmp_path / "PWNED"
    (run / "checkpoints" / "server.pt").write_bytes(pickle.dumps(_Payload(marker)))
    proc = liquid_fed("run", str(QUICKSTART), "--out", str(run), "--resume")
    assert proc.returncode == 2
    assert "no complete checkpoint to resume from" in proc.stderr
    assert "server.pt: pickled files of an older liquid-fed, never loaded" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize(("sets", "message"), [
    (["server.device=cuda"], 'server.device: got "cuda"; this machine has no CUDA device'),
    (["optim.lr=.nan"], "optim.lr: got nan; expected a finite number"),
    (["name=../../escape"], "name: got '../../escape'; a run name is one folder name"),
    (["experts.kind=cnn", "experts.options={}", "data.name=wine", "views.kind=blocks",
      "views.options={}"], "experts: cnn in_shape must be (h, w) or (c, h, w)"),
    (["simulation.num_gpus_per_client=1"], "simulation.num_gpus_per_client: got 1.0; this "
                                           "machine has no CUDA device"),
], ids=["device", "nan", "name", "cnn-on-tabular", "gpus"])
def test_validate_refuses_what_would_fail_inside_ray(sets: list[str], message: str) -> None:
    proc = liquid_fed("validate", str(QUICKSTART), *[a for s in sets for a in ("--set", s)])
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr.startswith("liquid-fed: error: ") and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_centralized_never_overwrites_results(tmp_path: Path) -> None:
    out = tmp_path / "central"
    out.mkdir()
    (out / "summary.json").write_text('{"mine": 1}')
    proc = liquid_fed("centralized", str(QUICKSTART), "--out", str(out), "--quiet",
                      "--set", "train.epochs=1")
    assert proc.returncode == 2 and "already holds results" in proc.stderr
    assert (out / "summary.json").read_text() == '{"mine": 1}'
