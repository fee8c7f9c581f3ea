"""What `flwr run` sends to every party: the apps' code and shipped configs, nothing else."""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from server.deploy_local import stage_app

ROOT = Path(__file__).resolve().parent.parent
#: Flower's bundler builds its path filters with pathspec's deprecated "gitwildmatch" style, one
#: warning per pattern and build (flwr 1.41): 1 200 lines of noise in the suite's summary.
pytestmark = pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")


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


def _checkout(where: Path) -> Path:
    """A copy of the app's folders as a checkout holds them, with what else a checkout holds:
    a virtual environment, run folders, an operator's files."""
    app = where / "checkout"
    for part in ("liquid_fed", "clients", "server", "configs", "simulations", "docs"):
        shutil.copytree(ROOT / part, app / part, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", ".gitignore"):
        shutil.copy(ROOT / name, app / name)
    for k in range(300):  # stands in for .venv's 60 000 files
        site = app / ".venv" / "lib" / f"pkg{k}"
        site.mkdir(parents=True)
        (site / "__init__.py").write_text("x = 1\n")
    (app / "runs" / "a").mkdir(parents=True)
    (app / "runs" / "a" / "config.yaml").write_text("seed: 1\n")
    (app / "labels.jsonl").write_text("{}")
    (app / "server" / "operator.yaml").write_text("token: x")
    return app


def test_the_staged_app_gives_the_same_bundle_from_its_own_files(tmp_path: Path) -> None:
    app = _checkout(tmp_path)
    with stage_app(tmp_path / "staged", app) as staged:
        assert staged == tmp_path / "staged"
        assert build_fab_from_disk(staged) == build_fab_from_disk(app)  # byte for byte
        copied = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    names = set(zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))).namelist())
    # Only the bundle's files were copied (and the two files its filters read), nothing of
    # the environment, the runs or the operator's files.
    assert copied == names - {".info/CONTENT"} | {".gitignore"}
    assert not {".venv", "runs", "labels.jsonl"} & {c.split("/")[0] for c in copied}
    assert not staged.exists()  # removed once the run has its bundle
    # Staged where an earlier copy was left (its submit killed): replaced, not added to.
    (staged / "liquid_fed").mkdir(parents=True)
    (staged / "liquid_fed" / "stale.py").write_text("")
    with stage_app(staged, app) as again:
        assert build_fab_from_disk(again) == build_fab_from_disk(app)


def test_the_real_app_stages_to_the_real_bundle(tmp_path: Path) -> None:
    with stage_app(tmp_path / "app") as staged:
        assert staged != ROOT
        assert build_fab_from_disk(staged) == build_fab_from_disk(ROOT)


def test_a_pattern_that_starts_with_a_glob_bundles_from_the_app_itself(tmp_path: Path) -> None:
    app = _checkout(tmp_path)
    text = (app / "pyproject.toml").read_text()
    assert 'fab-include = ["liquid_fed/**/*.py"' in text
    old = 'fab-include = ["liquid_fed/**/*.py"'
    (app / "pyproject.toml").write_text(text.replace(old, old.replace('["', '["**/app.py", "')))
    with stage_app(tmp_path / "staged", app) as staged:
        assert staged == app
        assert not (tmp_path / "staged").exists()
    assert app.is_dir()  # the app itself is never removed


def test_an_app_without_a_readable_pyproject_is_left_to_flwr_run(tmp_path: Path) -> None:
    app = tmp_path / "installed"
    (app / "liquid_fed").mkdir(parents=True)
    with stage_app(tmp_path / "staged", app) as staged:
        assert staged == app  # no pyproject.toml
    (app / "pyproject.toml").write_text("[tool.flwr.app\n")  # not TOML
    with stage_app(tmp_path / "staged", app) as staged:
        assert staged == app
    assert not (tmp_path / "staged").exists()
    assert (app / "liquid_fed").is_dir()
