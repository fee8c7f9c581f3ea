"""Private shards: each party holds its own columns and ids, the server its labels; experts and
their optimizers stay with their party; everything equals the run from the whole data set."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from liquid_fed.config import build_config
from liquid_fed.errors import DataError, RunFolderError
from liquid_fed.federation import Federation, LocalTransport, client_view
from liquid_fed.rundir import RunDir, load_checkpoint
from liquid_fed.shards import load_party_shard, load_server_shard, write_shards

ROOT = Path(__file__).resolve().parent.parent
TINY = {"train": {"epochs": 2, "chunk_size": 128, "batch_size": 64, "eval_every": 0,
                  "checkpoint_every": 4},
        "experts": {"options": {"hidden": [16]}},
        "baselines": {"uniform": False, "independent": False}}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    cfg = build_config(TINY)
    out = tmp_path_factory.mktemp("shards")
    write_shards(cfg, out)
    return cfg, out


def test_each_shard_holds_only_its_part(shards) -> None:
    cfg, out = shards
    assert sorted(p.name for p in out.iterdir()) == ["party-0", "party-1", "party-2", "party-3",
                                                      "server"]
    for k in range(4):
        with np.load(out / f"party-{k}" / "features.npz", allow_pickle=False) as z:
            assert sorted(z.files) == ["ids", "present", "x"]  # no labels, no other columns
            whole = client_view(cfg, k)
            np.testing.assert_array_equal(z["x"], whole.x)  # exactly its quadrant
            assert z["x"].shape == (1797, 4, 4)
        manifest = json.loads((out / f"party-{k}" / "manifest.json").read_text())
        data = (out / f"party-{k}" / "features.npz").read_bytes()
        assert manifest["files"]["features.npz"] == hashlib.sha256(data).hexdigest()
        assert manifest["party"] == k and manifest["role"] == "party"
    with np.load(out / "server" / "labels.npz", allow_pickle=False) as z:
        assert "x" not in z.files and {"ids", "labels", "train", "val", "test"} <= set(z.files)
    with pytest.raises(RunFolderError, match="already holds shards"):
        write_shards(cfg, out)


def test_a_run_from_shards_equals_the_run_from_the_data_set(shards, tmp_path: Path) -> None:
    cfg, out = shards
    whole = Federation(cfg, LocalTransport(4)).run()
    dirs = [out / f"party-{k}" for k in range(4)]
    fed = Federation(cfg, LocalTransport(4, dirs), RunDir(tmp_path / "run"),
                     data=load_server_shard(out / "server", cfg))
    private = fed.run()
    np.testing.assert_array_equal(private.train_losses, whole.train_losses)
    assert {k: v for k, v in private.test.items() if not k.startswith("bytes")} == {
        k: v for k, v in whole.test.items() if not k.startswith("bytes")}
    assert fed.shards == [str(d) for d in dirs]  # each party said which shard it read


def test_experts_stay_home_and_resume_from_the_pieces(shards, tmp_path: Path) -> None:
    cfg, out = shards
    parties = tmp_path / "parties"
    shutil.copytree(out, parties)
    dirs = [parties / f"party-{k}" for k in range(4)]
    server = load_server_shard(parties / "server", cfg)
    run = RunDir(tmp_path / "run")
    whole = Federation(cfg, LocalTransport(4)).run()
    assert Federation(cfg, LocalTransport(4, dirs), run, data=server).run(stop_after=5) is None
    ckpt = load_checkpoint(run.path, 4)
    assert ckpt.round == 5 and ckpt.clients == []  # the server kept only receipts
    assert [p["generation"] for p in ckpt.server["parties"]]
    # No file on the server's side holds any client's parameters.
    party_ckpt = load_checkpoint(dirs[2] / "checkpoints" / ckpt.server["run_id"], 1)
    weight = next(v for k, v in party_ckpt.clients[0].items() if k.startswith("model/"))
    needle = np.ascontiguousarray(weight).tobytes()[:64]
    for f in run.files():
        assert needle not in f.read_bytes(), f
        if f.suffix == ".npz":
            with np.load(f, allow_pickle=False) as z:
                assert not [k for k in z.files if k.startswith(("model/", "optimizer/"))], f
    # Fresh clients (nothing in memory) resume from their own folders and the server's receipt.
    resumed = Federation(cfg, LocalTransport(4, dirs), run,
                         data=load_server_shard(parties / "server", cfg)).run(ckpt)
    np.testing.assert_array_equal(resumed.train_losses, whole.train_losses)
    assert resumed.test["accuracy"] == whole.test["accuracy"]
    # A party whose checkpoint is gone cannot pretend: the resume fails naming it.
    shutil.rmtree(dirs[1] / "checkpoints")
    with pytest.raises(RunFolderError, match=r"party 1: cannot resume: no complete checkpoint"):
        Federation(cfg, LocalTransport(4, dirs), RunDir(tmp_path / "run"),
                   data=load_server_shard(parties / "server", cfg)).run(load_checkpoint(
                       run.path, 4))


def test_wrong_damaged_or_foreign_shards_are_refused(shards, tmp_path: Path) -> None:
    cfg, out = shards
    with pytest.raises(DataError, match=r"party 2 was given the shard of party 1 \(.*party-1\)"):
        load_party_shard(out / "party-1", 2, cfg)
    with pytest.raises(DataError, match=r"party 0: .* holds the server's shard"):
        load_party_shard(out / "server", 0, cfg)
    with pytest.raises(DataError, match="server: .* holds party 3's shard"):
        load_server_shard(out / "party-3", cfg)
    other = build_config(TINY, ["seed=4"])
    with pytest.raises(DataError, match=r"party 0: the shard in .* was cut for another config "
                                        r"\(seed: shard 0, run 4\)"):
        load_party_shard(out / "party-0", 0, other)
    broken = tmp_path / "broken"
    shutil.copytree(out / "party-0", broken)
    data = bytearray((broken / "features.npz").read_bytes())
    data[200] ^= 0xFF
    (broken / "features.npz").write_bytes(bytes(data))
    with pytest.raises(DataError, match="party 0: .* does not match its manifest's checksum"):
        load_party_shard(broken, 0, cfg)
    with pytest.raises(DataError, match="holds no shard"):
        load_party_shard(tmp_path, 0, cfg)


def test_misaligned_shards_name_the_party_and_its_folder(shards, tmp_path: Path) -> None:
    cfg, out = shards
    parties = tmp_path / "p"
    shutil.copytree(out, parties)
    folder = parties / "party-2"  # a party that lost some rows
    with np.load(folder / "features.npz", allow_pickle=False) as z:
        arrays = {k: z[k][7:] for k in z.files}
    RunDir(folder).write_npz("features.npz", arrays)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["features.npz"] = hashlib.sha256(
        (folder / "features.npz").read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    dirs = [parties / f"party-{k}" for k in range(4)]
    fed = Federation(cfg, LocalTransport(4, dirs), data=load_server_shard(parties / "server",
                                                                          cfg))
    with pytest.raises(ValueError, match=rf"7 missing at 'client_2 \(shard {folder}\)'"):
        fed.setup()


def test_split_command(tmp_path: Path) -> None:
    out = tmp_path / "shards"
    proc = subprocess.run([sys.executable, "-m", "liquid_fed.cli", "split",
                           str(ROOT / "configs" / "quickstart.yaml"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(out / f"party-{k}") for k in range(4)] + [
        str(out / "server")]
    again = subprocess.run([sys.executable, "-m", "liquid_fed.cli", "split",
                            str(ROOT / "configs" / "quickstart.yaml"), "--out", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already holds shards" in again.stderr


def test_shards_and_a_partys_checkpoints_are_private(tmp_path: Path) -> None:
    import stat

    from liquid_fed.federation.client import own_file
    from liquid_fed.rundir import Checkpoint, load_checkpoint, save_checkpoint

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    cfg = build_config({"data": {"name": "iris"}, "views": {"kind": "random", "n_views": 2,
                                                            "options": {}}})
    folders = write_shards(cfg, tmp_path / "shards")
    for folder in folders:
        assert mode(folder) == 0o700, folder
        for f in folder.iterdir():
            assert mode(f) == 0o600, f
    # A party's own checkpoint: 0700 folders, 0600 files, its file named by its index.
    where = tmp_path / "party" / "checkpoints" / "run-1"
    state = {"model/w": np.arange(3.0)}
    save_checkpoint(where, Checkpoint(4, {"party": 3}, clients=[state],
                                      client_files=[own_file(3)]), private=True)
    [gen] = (where / "checkpoints").iterdir()
    assert "party_3.npz" in {p.name for p in gen.iterdir()}
    assert not any(p.name.startswith("client_") for p in gen.iterdir())
    assert {mode(p) for p in gen.iterdir()} == {0o600}
    assert mode(gen) == mode(where / "checkpoints") == mode(where) == 0o700
    back = load_checkpoint(where, 1)
    assert back.client_files == ["party_3.npz"] and back.round == 4
    np.testing.assert_array_equal(back.clients[0]["model/w"], state["model/w"])
