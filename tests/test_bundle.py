"""What `flwr run` sends to every party: the apps' code and shipped configs, nothing else."""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

ROOT = Path(__file__).resolve().parent.parent


def test_the_app_bundle_holds_only_the_apps_code_and_configs(tmp_path: Path) -> None:
    app = tmp_path / "checkout"
    for part in ("liquid_fed", "clients", "server", "configs", "simulations", "docs", "tests"):
        shutil.copytree(ROOT / part, app / part, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, app / name)
    # What an operator may keep in the server host's checkout: none of it may travel.
    (app / "keys").mkdir()
    (app / "keys" / "server.json").write_text('{"secret": 1}')
    (app / "notes.md").write_text("passwords")
    (app / "server" / "operator.yaml").write_text("token: x")
    (app / "labels.jsonl").write_text("{}")
    names = set(zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))).namelist())
    code = {str(p.relative_to(app)) for part in ("liquid_fed", "clients", "server")
            for p in (app / part).rglob("*.py")}
    configs = {str(p.relative_to(app)) for p in (app / "configs").rglob("*.yaml")}
    assert names - {".info/CONTENT"} == code | configs | {"pyproject.toml"}
    assert "server/app.py" in names and "configs/quickstart.yaml" in names
