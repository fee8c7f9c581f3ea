"""Experiment tracking: TensorBoard event files and MLflow runs, beside the run folder's own
files (``tracking`` in a run config; :class:`liquid_fed.config.TrackingConfig`).

The server logs, where the rows of ``metrics.jsonl`` are made (:mod:`liquid_fed.federation.loop`,
:mod:`liquid_fed.centralized`, :mod:`liquid_fed.study`); clients log nothing. Steps are
training rounds, counted from 1 (an evaluation after round ``r`` has step ``r``). What is
logged:

* per training round: ``train/loss``, ``train/present/count`` and ``train/present/party_<k>``
  (1 when party ``k`` answered the round);
* per evaluation row: every number of the row as ``<split>/<key>`` (accuracy or rmse, nll,
  loss, power_entropy, mean_power_<k>, smoothing, bytes, ...) and each party's power share
  ``<split>/power_share/party_<k>`` (``mean_power_k / K``); the mean delegation heat map as
  an image (``<split>/delegation``: rows from party, columns to party, viridis over [0, 1]);
* per run: the config's keys as parameters (MLflow) and, at the end, the hyper-parameters
  with the final test metrics (TensorBoard's HParams view); in a study the cell's setting,
  seed, method, solver and mix are the hyper-parameters.

Tracking never changes a result and never fails a run once it has started: a backend that
fails mid-way is switched off with one warning and training goes on. What must work is
checked before training: the extras are installed (:func:`check_tracking`), the MLflow store
or server answers (:meth:`Tracker.open`). The run folder's ``tracking.json`` keeps the
experiment, the run name, a study cell's hyper-parameters and the MLflow run id, so a resumed
run appends to the same MLflow run; TensorBoard drops the events a resumed run logs again
(``purge_step``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import queue
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from liquid_fed.config import RunConfig, _flatten
from liquid_fed.errors import ConfigError

log = logging.getLogger(__name__)

#: The run folder's TensorBoard folder and the file that keeps the tracking context.
TENSORBOARD_DIR = "tensorboard"
STATE_FILE = "tracking.json"
#: What a user installs for each tracker.
EXTRAS = {"tensorboard": "pip install 'liquid-fed[tensorboard]'",
          "mlflow": "pip install 'liquid-fed[mlflow]'"}
#: Seconds the start-up check waits for an MLflow tracking server, and the end of a run for
#: the MLflow queue to drain.
REACH_TIMEOUT = 5.0
DRAIN_TIMEOUT = 60.0
#: Above this many parties, a round's presence is logged as its count only.
PER_PARTY_MAX = 64
#: The test metrics declared to TensorBoard's HParams view (those a run has).
HPARAM_METRICS = ("accuracy", "rmse", "nll", "loss", "power_entropy")
_MLFLOW_PARAM_CHARS = 6000  # MLflow's longest parameter value
_MLFLOW_BATCH = 100  # MLflow's most parameters per log_batch
_MLFLOW_METRICS = 1000  # MLflow's most metrics per log_batch
#: Seconds between two sends of the buffered MLflow metrics.
FLUSH_SECONDS = 5.0


# --------------------------------------------------------------------------------------------
# Checks at the door
# --------------------------------------------------------------------------------------------


def _import_tensorboard() -> Any:
    """torch's SummaryWriter (it needs the ``tensorboard`` package itself)."""
    import tensorboard  # noqa: F401  (torch.utils.tensorboard imports it lazily)
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter


def _import_mlflow() -> Any:
    import mlflow
    from mlflow.tracking import MlflowClient

    del mlflow
    return MlflowClient


def _missing_extra(key: str, extra: str, exc: ImportError) -> ConfigError:
    return ConfigError(f"{key}: tracking to {extra} needs the {extra} extra, which is not "
                       f"installed ({exc}); install it with: {EXTRAS[extra]}")


def _is_http(uri: str) -> bool:
    return uri.lower().startswith(("http://", "https://"))


def _is_file_store(uri: str) -> bool:
    return "://" not in uri or uri.lower().startswith("file:")


def check_tracking(cfg: RunConfig, reach: bool = False) -> None:
    """The trackers ``cfg.tracking`` asks for can be used here: the extras are installed, a
    file store is allowed by the installed MLflow, and (``reach``) a tracking server answers.

    Args:
        cfg: the resolved config.
        reach: also contact an ``http(s)://`` tracking server (within :data:`REACH_TIMEOUT`).

    Raises:
        ConfigError: naming ``tracking.tensorboard`` / ``tracking.mlflow``, the value and the
            extra to install or what to change.
    """
    tracking = cfg.tracking
    if tracking.tensorboard:
        try:
            _import_tensorboard()
        except ImportError as exc:
            raise _missing_extra("tracking.tensorboard", "tensorboard", exc) from None
    uri = tracking.mlflow
    if uri is None:
        return
    try:
        _import_mlflow()
    except ImportError as exc:
        raise _missing_extra("tracking.mlflow", "mlflow", exc) from None
    if _is_file_store(uri):
        with contextlib.suppress(ImportError, AttributeError):
            from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE

            if not MLFLOW_ALLOW_FILE_STORE.get():
                raise ConfigError(
                    f"tracking.mlflow: got {uri!r}, MLflow's file store, which the installed "
                    "MLflow refuses unless MLFLOW_ALLOW_FILE_STORE=true is set; use a local "
                    "SQLite store instead (tracking.mlflow=sqlite:///mlflow.db) or set that "
                    "variable")
    if reach and _is_http(uri):
        _reach(uri)


def _reach(uri: str) -> None:
    """Any HTTP answer from the server will do; no answer within the timeout is an error."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=REACH_TIMEOUT):
            pass
    except urllib.error.HTTPError:
        return  # it answered (a proxy's 404 or an auth error surfaces at the first call)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(f"tracking.mlflow: the tracking server {uri!r} cannot be reached "
                          f"({reason}); start it, fix the URI, or set tracking.mlflow=null"
                          ) from None


# --------------------------------------------------------------------------------------------
# The run folder's tracking context
# --------------------------------------------------------------------------------------------


def read_state(run_dir: str | Path) -> dict[str, Any]:
    """The run folder's ``tracking.json`` (empty when it has none or it is unreadable)."""
    path = Path(run_dir) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def write_context(run_dir: str | Path, experiment: str, run_name: str,
                  hparams: Mapping[str, Any]) -> None:
    """Name the experiment, run and hyper-parameters a run folder's trackers use (a study
    cell's, written before its run starts: the run may train in another process)."""
    from liquid_fed.rundir import RunDir

    # the folder's earlier MLflow run stays named: a new start replaces it (Tracker.open)
    earlier = {k: v for k, v in read_state(run_dir).items() if k == "mlflow_run_id"}
    RunDir(run_dir).write_json(STATE_FILE, {"experiment": experiment, "run_name": run_name,
                                            "hparams": dict(hparams), **earlier})


def party_config_yaml(cfg: RunConfig) -> str:
    """The config as the server sends it to the parties: without the ``tracking`` section
    and ``simulation.ray_address`` (the parties build their defaults), so neither a tracker's
    URI nor the cluster's address travels, and neither changes a byte of a run."""
    import yaml

    data = cfg.to_dict()
    data.pop("tracking", None)
    data.get("simulation", {}).pop("ray_address", None)
    return yaml.safe_dump(data, sort_keys=False)


def config_params(cfg: RunConfig) -> dict[str, Any]:
    """The config's keys, flattened to dotted names (``train.epochs``), as parameters."""
    return _flatten(cfg.to_dict())


def _hparam_value(value: Any) -> int | float | str | bool:
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def _numbers(row: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            and k != "round"}


def row_scalars(row: Mapping[str, Any], k: int) -> dict[str, float]:
    """The scalars of one metrics row: ``<split>/<key>`` for every number, and each party's
    power share ``<split>/power_share/party_<j>`` (``mean_power_j / K``)."""
    split = row["split"]
    out = {f"{split}/{key}": value for key, value in _numbers(row).items()}
    for j in range(k):
        if f"mean_power_{j}" in row:
            out[f"{split}/power_share/party_{j}"] = float(row[f"mean_power_{j}"]) / k
    return out


def delegation_image(mean_delegation: np.ndarray, cell: int | None = None) -> np.ndarray:
    """The heat map of a mean delegation matrix (K, K) (rows: from party, columns: to party;
    viridis over [0, 1], the colours of :func:`liquid_fed.plots.draw_delegation`) as an RGB
    image (H, W, 3) uint8, each entry a square of ``cell`` pixels (default: about 256 pixels
    a side). Drawn without a figure: it costs well under a millisecond per evaluation."""
    from matplotlib import colormaps

    m = np.asarray(mean_delegation, dtype=np.float64)  # (K, K)
    k = m.shape[0]
    cell = cell or max(4, 256 // max(k, 1))
    rgba = colormaps["viridis"](np.clip(np.nan_to_num(m, nan=0.0), 0.0, 1.0))  # (K, K, 4)
    rgb = (rgba[..., :3] * 255).round().astype(np.uint8)
    rgb[np.isnan(m)] = 128  # an entry without samples: grey
    return np.kron(rgb, np.ones((cell, cell, 1), dtype=np.uint8))  # (K*cell, K*cell, 3)


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


class _TensorBoard:
    """Event files in ``<run>/tensorboard``; a resumed run drops what it logs again."""

    name = "TensorBoard"

    def __init__(self, log_dir: Path, resume_round: int | None) -> None:
        writer_cls = _import_tensorboard()
        if resume_round is None:
            shutil.rmtree(log_dir, ignore_errors=True)  # an earlier run's events, started over
        # purge_step: events of rounds after the checkpoint, logged before the interruption,
        # are dropped when read back; the resumed run logs them again.
        self.writer = writer_cls(str(log_dir), purge_step=None if resume_round is None
                                 else resume_round + 1, flush_secs=10)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def hparams(self, params: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        from torch.utils.tensorboard.summary import hparams

        # The session's hyper-parameters in this run's own folder (SummaryWriter.add_hparams
        # would open a sub-folder); the metrics it names are scalars logged already.
        for summary in hparams({k: _hparam_value(v) for k, v in params.items()},
                               dict(metrics)):
            self.writer.file_writer.add_summary(summary)

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    """One MLflow run; calls go through a worker thread, so a slow server never holds up a
    round. The set-up (experiment, run) is synchronous: its failure is an error at start."""

    name = "MLflow"

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None,
                 tags: Mapping[str, str]) -> None:
        client_cls = _import_mlflow()
        if uri.lower().startswith("sqlite:///"):
            Path(uri[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True,
                                                                    exist_ok=True)
        self.client = client_cls(tracking_uri=uri)
        self.seen: dict[str, int] = {}  # key -> the last step logged (a resumed run)
        self.logged: set[str] = set()  # parameters the run holds (MLflow keeps the first)
        if run_id is not None:
            run = self.client.get_run(run_id)
            self.run_id = run.info.run_id
            self.logged = set(run.data.params)
            self.client.update_run(self.run_id, status="RUNNING")
            for key in run.data.metrics:
                history = self.client.get_metric_history(self.run_id, key)
                self.seen[key] = max((m.step for m in history), default=-1)
        else:
            experiment_id = self._experiment(uri, experiment)
            self.run_id = self.client.create_run(experiment_id, run_name=run_name,
                                                 tags=dict(tags)).info.run_id
        self.failed = False
        self.buffer: list[Any] = []  # metrics not sent yet
        self.flushed = time.monotonic()
        self.queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="mlflow-tracking", daemon=True)
        self.thread.start()

    def _experiment(self, uri: str, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        if uri.lower().startswith("sqlite:///"):
            # beside the database, not MLflow's default ./mlruns of whatever folder this runs in
            db = Path(uri[len("sqlite:///"):]).expanduser().resolve()
            location = (db.parent / "mlflow-artifacts").as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:  # another cell of a study created it first
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _work(self) -> None:
        while True:
            call = self.queue.get()
            if call is None:
                return
            if self.failed:
                continue
            try:
                call()
            except Exception as exc:  # the tracker's failure must not end the run
                self.failed = True
                log.warning("MLflow logging failed (%s: %s); it is off for the rest of this "
                            "run, which goes on", type(exc).__name__, exc)

    def _fresh(self, step: int, values: Mapping[str, float]) -> dict[str, float]:
        """The values not logged at this step before (a resumed run repeats the rounds after
        its checkpoint)."""
        fresh = {k: v for k, v in values.items() if step > self.seen.get(k, -1)}
        for key in fresh:
            self.seen[key] = step
        return fresh

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(1000 * time.time())
        self.buffer.extend(Metric(k, v, stamp, step)
                           for k, v in self._fresh(step, values).items())
        # One call per few seconds, not per round: each call is a transaction (or a request)
        # whose cost would otherwise compete with the rounds for the interpreter.
        if (len(self.buffer) >= _MLFLOW_METRICS
                or time.monotonic() - self.flushed >= FLUSH_SECONDS):
            self.flush()

    def flush(self) -> None:
        """Send the buffered metrics (in calls of at most MLflow's batch size)."""
        self.flushed = time.monotonic()
        metrics, self.buffer = self.buffer, []
        for start in range(0, len(metrics), _MLFLOW_METRICS):
            part = metrics[start:start + _MLFLOW_METRICS]
            self.queue.put(lambda part=part: self.client.log_batch(self.run_id, metrics=part))

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        if not self._fresh(step, {f"image:{tag}": 0.0}):
            return
        name = f"{tag}/round-{step:06d}.png"
        self.queue.put(lambda: self.client.log_image(self.run_id, image, artifact_file=name))

    def params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        # a parameter is set once (MLflow refuses another value): the first one stays
        items = [Param(k, str(_hparam_value(v))[:_MLFLOW_PARAM_CHARS])
                 for k, v in params.items() if k not in self.logged]
        self.logged.update(params)
        for start in range(0, len(items), _MLFLOW_BATCH):
            part = items[start:start + _MLFLOW_BATCH]
            self.queue.put(lambda part=part: self.client.log_batch(self.run_id, params=part))

    def hparams(self, params: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        self.params(params)

    def close(self, status: str = "FINISHED") -> None:
        self.flush()
        self.queue.put(lambda: self.client.set_terminated(self.run_id, status=status))
        self.queue.put(None)
        self.thread.join(DRAIN_TIMEOUT)
        if self.thread.is_alive():
            log.warning("MLflow: %d calls not sent within %.0f s; the run's tracking is "
                        "incomplete", self.queue.qsize(), DRAIN_TIMEOUT)


# --------------------------------------------------------------------------------------------
# The tracker the server logs to
# --------------------------------------------------------------------------------------------


class Tracker:
    """The trackers of one run folder. Every call is safe: a backend that raises is switched
    off with one warning (training goes on).

    Build it with :meth:`open`; call :meth:`close` at the end (also after a failure).
    """

    def __init__(self, backends: list[Any], k: int, hparams: Mapping[str, Any]) -> None:
        self.backends = backends
        self.k = k
        self.hparams = dict(hparams)  # a study cell's, else the config's keys

    @classmethod
    def open(cls, cfg: RunConfig, run_dir: str | Path, resume_round: int | None = None,
             params: Mapping[str, Any] | None = None) -> Tracker | None:
        """Start the trackers ``cfg.tracking`` asks for, for the run in ``run_dir``.

        The experiment and run name are those of the folder's ``tracking.json`` (a study cell's,
        :func:`write_context`), else the run's name and the folder's name.

        Args:
            cfg: the resolved config.
            run_dir: the run folder.
            resume_round: the checkpoint's round when resuming (None: a new run; an earlier
                run's TensorBoard events in the folder are removed, a new MLflow run starts
                and the folder's earlier MLflow run is deleted, as MLflow deletes: restorable).
            params: the parameters logged to MLflow (default: the config's dotted keys).

        Returns:
            The tracker, or None when no tracking is asked for.

        Raises:
            ConfigError: an extra is missing, or the MLflow store or server cannot be used
                (before any training).
        """
        tracking = cfg.tracking
        if not tracking.tensorboard and tracking.mlflow is None:
            return None
        check_tracking(cfg, reach=True)
        run_dir = Path(run_dir)
        state = read_state(run_dir)
        experiment = str(state.get("experiment") or cfg.name)
        run_name = str(state.get("run_name") or run_dir.name)
        backends: list[Any] = []
        if tracking.tensorboard:
            backends.append(_TensorBoard(run_dir / TENSORBOARD_DIR, resume_round))
        if tracking.mlflow is not None:
            previous = state.get("mlflow_run_id") if resume_round is not None else None
            try:
                mlflow = _MLflow(tracking.mlflow, experiment, run_name, previous,
                                 {"liquid_fed.run_dir": str(run_dir.resolve())})
            except Exception as exc:
                for backend in backends:
                    backend.close()
                raise ConfigError(f"tracking.mlflow: got {tracking.mlflow!r}; MLflow could not "
                                  f"start a run there: {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
            replaced = state.get("mlflow_run_id") if previous is None else None
            if replaced and replaced != mlflow.run_id:
                # the folder's earlier run (started over: --force, or a study cell trained
                # again after an interruption): one MLflow run per run folder
                mlflow.queue.put(lambda: mlflow.client.delete_run(replaced))
            state["mlflow_run_id"] = mlflow.run_id
            from liquid_fed.rundir import RunDir

            RunDir(run_dir).write_json(STATE_FILE, state)
            if previous is None:
                mlflow.params(config_params(cfg) if params is None else params)
            backends.append(mlflow)
        return cls(backends, cfg.n_clients,
                   dict(state.get("hparams") or {}) or config_params(cfg))

    def _each(self, method: str, *args: Any) -> None:
        for backend in list(self.backends):
            try:
                getattr(backend, method)(*args)
            except Exception as exc:  # the tracker's failure must not end the run
                self.backends.remove(backend)
                log.warning("%s logging failed (%s: %s); it is off for the rest of this run, "
                            "which goes on", backend.name, type(exc).__name__, exc)
                with contextlib.suppress(Exception):
                    backend.close()

    def train_round(self, step: int, loss: float, present: np.ndarray | None = None) -> None:
        """A training round's loss and (``present``: (K,) bool) the parties that answered:
        their count and, up to :data:`PER_PARTY_MAX` parties, each one's 0/1."""
        values = {"train/loss": float(loss)}
        if present is not None:
            values["train/present/count"] = float(np.sum(present))
            if len(present) <= PER_PARTY_MAX:
                values.update({f"train/present/party_{j}": float(present[j])
                               for j in range(len(present))})
        self._each("scalars", step, values)

    def evaluation(self, rows: list[dict[str, Any]],
                   delegations: Mapping[str, np.ndarray] | None = None) -> None:
        """The rows of one evaluation (``metrics.jsonl``'s) and, per split, the mean
        delegation matrix (K, K) drawn as a heat map."""
        for row in rows:
            self._each("scalars", int(row["round"]), row_scalars(row, self.k))
        for split, matrix in (delegations or {}).items():
            step = int(rows[0]["round"])
            try:
                image = delegation_image(matrix)
            except Exception as exc:  # a drawing failure must not end the run either
                log.warning("delegation heat map not drawn (%s: %s)", type(exc).__name__, exc)
                continue
            self._each("image", f"{split}/delegation", image, step)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Any scalars at ``step``."""
        self._each("scalars", step, dict(values))

    def final(self, step: int, val: Any, test: Any) -> None:
        """A run trained outside the federation loop (the centralized twin, a study's
        baselines): its final validation and test metrics at ``step`` (each a mapping, or
        None when the run has none), then :meth:`finish` with the test metrics."""
        self.evaluation([{"round": step, "split": split, **metrics}
                         for split, metrics in (("val", val), ("test", test))
                         if isinstance(metrics, dict)])
        self.finish(test)

    def finish(self, test: Mapping[str, Any], params: Mapping[str, Any] | None = None) -> None:
        """The run's hyper-parameters (``params``; default: a study cell's from
        ``tracking.json``, else the config's keys) against its final test metrics."""
        hp = dict(params if params is not None else self.hparams)
        metrics = {f"test/{key}": float(test[key]) for key in HPARAM_METRICS
                   if isinstance(test.get(key), (int, float)) and not isinstance(test[key], bool)
                   and math.isfinite(float(test[key]))}
        if hp:
            self._each("hparams", hp, metrics)

    def close(self, status: str = "FINISHED") -> None:
        """Flush and close every backend (MLflow's run ends with ``status``)."""
        for backend in self.backends:
            try:
                if isinstance(backend, _MLflow):
                    backend.close(status)
                else:
                    backend.close()
            except Exception as exc:
                log.warning("%s could not be closed (%s: %s)", backend.name,
                            type(exc).__name__, exc)
        self.backends = []
