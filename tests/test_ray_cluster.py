"""``liquid-fed run --ray ADDRESS`` on a real two-node Ray cluster that the test starts itself
(``ray start --head`` plus ``ray start --address``, token auth; see :mod:`raycluster`).

One cluster serves the whole module. The tests share the ``flower`` xdist group with the other
Ray tests, so no two Rays compete for the cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from raycluster import RayCluster, free_port, ray_cluster  # noqa: E402

from liquid_fed.config import load_config  # noqa: E402
from liquid_fed.errors import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("cluster")]

#: Small and quick: 2 epochs, no centralized baselines; one CPU per client, so the two
#: one-CPU nodes hold one client actor each and both must work.
SETS = ["train.epochs=2", "train.eval_every=0", "simulation.num_cpus_per_client=1",
        "baselines.uniform=false", "baselines.independent=false"]


@pytest.fixture(scope="module")
def cluster() -> RayCluster:
    with ray_cluster(num_cpus=1) as c:
        yield c
        # The cluster outlived every run (its processes are the test's to stop).
        assert len(c.daemons()) == 3


def cli(*args: str, env: dict[str, str], timeout: float = 400) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "liquid_fed.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


def sets(extra: list[str] = ()) -> list[str]:
    return [a for s in [*SETS, *extra] for a in ("--set", s)]


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def private_env() -> dict[str, str]:
    """The user's shell without any Ray cluster settings (a private run)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}


def client_actors(cluster: RayCluster, job: str) -> list[dict]:
    return [a for a in cluster.actors(job) if a["class_name"].endswith("ClientAppActor")]


def assert_job_gone(cluster: RayCluster, job: str, within: float = 30.0) -> list[dict]:
    """Every actor of ``job`` is dead (the cluster ended the job with its driver)."""
    deadline = time.monotonic() + within
    while True:
        actors = client_actors(cluster, job)
        alive = [a for a in actors if a["state"] != "DEAD"]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert actors, f"no client actor of job {job} in the cluster's actor table"
    assert alive == [], f"actors of job {job} outlived the run: {alive}"
    return actors


def test_a_run_on_the_cluster_equals_a_private_run_and_uses_both_nodes(
        cluster: RayCluster, tmp_path: Path) -> None:
    before = cluster.daemons()
    assert len(before) == 3  # one GCS, two raylets
    on_cluster, private = tmp_path / "cluster", tmp_path / "private"
    t0 = time.perf_counter()
    ok(cli("run", str(QUICKSTART), *sets(), "--out", str(on_cluster), "--quiet",
           "--ray", cluster.address, env=cluster.env))
    cluster_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    ok(cli("run", str(QUICKSTART), *sets(), "--out", str(private), "--quiet",
           env=private_env()))
    private_wall = time.perf_counter() - t0
    summary = json.loads((on_cluster / "summary.json").read_text())
    private_summary = json.loads((private / "summary.json").read_text())
    print(f"\nwall: cluster {cluster_wall:.1f} s, private {private_wall:.1f} s; cluster start "
          f"{cluster.start_seconds:.1f} s; engine (cluster) {summary['engine']}; engine "
          f"(private) {private_summary['engine']}")
    ray_info = summary["engine"]["ray"]
    assert ray_info["address"] == cluster.address
    # One one-CPU client actor on each one-CPU node: both nodes did the run's work.
    assert ray_info["actors_per_node"] == {node: 1 for node in cluster.node_ids.values()}
    private_info = private_summary["engine"]["ray"]
    assert private_info["address"] is None and len(private_info["nodes"]) == 1

    # Same seeds, same single-threaded arithmetic on the same CPU: every loss and metric is
    # bit-for-bit equal, bytes included (the config the clients get leaves out where the
    # server runs: tracking.party_config_yaml).
    got, want = metrics(on_cluster), metrics(private)
    assert len(got) == len(want) > 0
    assert got == want

    # Nothing of the run is left on any node; the cluster is untouched and still serves.
    actors = assert_job_gone(cluster, ray_info["job_id"])
    assert {a["node_id"] for a in actors} == set(cluster.node_ids.values())
    assert cluster.alive_nodes() == cluster.node_ids
    assert cluster.daemons() == before, "the run stopped processes of the cluster"


def run_processes(run: Path) -> list[str]:
    """Live processes of the launcher's side whose command line names the run folder."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(run) in cmd and state != "Z":
            found.append(f"{pid}: {cmd[:120]}")
    return found


# SIGINT only: a killed launcher's child takes the same way out on a cluster as privately
# (tests/test_federation.py kills one with SIGKILL); the suite's time is better spent elsewhere.
@pytest.mark.parametrize("sig", [signal.SIGINT], ids=["SIGINT"])
def test_a_stopped_run_leaves_no_actor_and_the_cluster_up(cluster: RayCluster, tmp_path: Path,
                                                          sig: signal.Signals) -> None:
    run = tmp_path / "interrupted"
    jobs_before = {a["job_id"] for a in cluster.actors()}
    cmd = [sys.executable, "-m", "liquid_fed.cli", "run", str(QUICKSTART),
           *sets(["train.epochs=400", "train.checkpoint_every=5"]), "--out", str(run),
           "--quiet", "--ray", cluster.address]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=cluster.env)
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoints").is_dir() or not any((run / "checkpoints").iterdir()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
        running = [a for a in cluster.actors() if a["job_id"] not in jobs_before
                   and a["class_name"].endswith("ClientAppActor")]
        assert {a["state"] for a in running} == {"ALIVE"} and len(running) == 2
        proc.send_signal(sig)  # SIGKILL: the launcher cannot clean up; its child must
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err[-3000:]
        assert "continue with --resume" in err
    else:
        assert proc.returncode == -signal.SIGKILL
        deadline = time.monotonic() + 30
        while run_processes(run) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert run_processes(run) == [], "the simulation child outlived its killed launcher"
    assert_job_gone(cluster, running[0]["job_id"])
    assert cluster.alive_nodes() == cluster.node_ids


def test_nothing_at_the_address_is_one_line_within_seconds(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    proc = cli("run", str(QUICKSTART), *sets(), "--out", str(tmp_path / "r"), "--quiet",
               "--ray", address, env=private_env())
    took = time.perf_counter() - t0
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("liquid-fed: error")]
    assert len(errors) == 1, proc.stderr
    assert f"nothing answers at {address}" in errors[0]
    assert "simulation.ray_address" in errors[0] and "ray start --head" in errors[0]
    # Refused before a run folder or a child exists: the launcher's probe waits at most 3 s;
    # the rest is the CLI's imports and checks (7 s here idle, over 15 s at a load of 16).
    assert not (tmp_path / "r").exists()
    assert took < 60, f"{took:.1f} s"


def test_a_missing_token_is_one_line_within_seconds(cluster: RayCluster,
                                                    tmp_path: Path) -> None:
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    t0 = time.perf_counter()
    proc = cli("run", str(QUICKSTART), *sets(), "--out", str(tmp_path / "r"), "--quiet",
               "--ray", cluster.address, env=env)
    took = time.perf_counter() - t0
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("liquid-fed: error")]
    assert len(errors) == 1, proc.stderr
    assert f"the Ray cluster at {cluster.address} refused" in errors[0]
    assert "RAY_AUTH_TOKEN_PATH" in errors[0]
    # Ray's core did not get to print its per-attempt complaints to the user.
    assert "gcs_client" not in proc.stderr, proc.stderr
    assert took < 90, f"{took:.1f} s"  # the CLI's imports and checks; the join is below


_JOIN = """
import sys, time
from pathlib import Path
from liquid_fed.config import load_config
from simulations.simulate import _join_cluster
cfg = load_config(sys.argv[1], [f"simulation.ray_address={sys.argv[2]}"])
t0 = time.perf_counter()
try:
    _join_cluster(cfg, Path(sys.argv[3]))
except Exception as exc:
    print(f"JOIN {time.perf_counter() - t0:.2f} {type(exc).__name__}: {exc}")
"""


def test_a_missing_token_fails_the_join_in_seconds_not_ray_s_twenty(
        cluster: RayCluster, tmp_path: Path) -> None:
    from simulations.simulate import ray_environment

    cfg = load_config(str(QUICKSTART), [f"simulation.ray_address={cluster.address}"])
    env = {**{k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")},
           **ray_environment(cfg, tmp_path)}  # what the launcher gives its child
    out = subprocess.run([sys.executable, "-c", _JOIN, str(QUICKSTART), cluster.address,
                          str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    line = next(x for x in out.stdout.splitlines() if x.startswith("JOIN "))
    seconds, message = float(line.split()[1]), line.split(" ", 2)[2]
    assert message.startswith("ConfigError: simulation.ray_address (--ray): the Ray cluster")
    # Ray's own default is 20 attempts of 1 s; the launcher's environment allows 3.
    assert seconds < 10, line


@pytest.mark.parametrize("value", ["6379", "ray://10.0.0.5:10001", "head:99999", "''", "[1, 2]"])
def test_a_bad_address_names_the_key(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(str(QUICKSTART), [f"simulation.ray_address={value}"])
    assert str(caught.value).startswith("simulation.ray_address: got ")
    assert "HOST:PORT" in str(caught.value)


def test_validate_accepts_an_address_and_run_checks_the_option() -> None:
    proc = ok(cli("validate", str(QUICKSTART), "--set", "simulation.ray_address=10.0.0.5:6379",
                  env=private_env(), timeout=120))
    assert "ray_address: 10.0.0.5:6379" in proc.stdout
    proc = cli("run", str(QUICKSTART), "--ray", "10.0.0.5", env=private_env(), timeout=120)
    assert proc.returncode == 2
    assert "liquid-fed: error: --ray: got '10.0.0.5'" in proc.stderr
