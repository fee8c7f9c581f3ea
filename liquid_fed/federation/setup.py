"""Set-up of a federation's data and experts: what each party holds, built from the config.

The server holds the labels and the splits (:class:`ServerData`); client ``k`` holds its own
view of the features, standardised on the training ids (:class:`ClientView`), and an expert
initialised from ``(seed, k)`` (:func:`build_client_expert`), so the federation, the
centralized reference and every comparison method build the same experts on the same data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from liquid_fed.config import RunConfig
from liquid_fed.data import (
    Dataset,
    IdIndex,
    Splits,
    Standardizer,
    load_dataset,
    make_views,
    split_ids,
)
from liquid_fed.data.views import ViewPlan
from liquid_fed.errors import ConfigError, DataError, LiquidFedError
from liquid_fed.experts import Expert, build_expert
from liquid_fed.train import DTYPES

log = logging.getLogger(__name__)


@lru_cache(maxsize=4)
def _dataset(name: str, options_json: str) -> Dataset:
    return load_dataset(name, **json.loads(options_json))


def load_data(cfg: RunConfig) -> Dataset:
    """The run's data set (cached per process: simulation actors serve many clients)."""
    try:
        return _dataset(cfg.data.name, json.dumps(cfg.data.options, sort_keys=True))
    except (ValueError, TypeError) as exc:
        if isinstance(exc, LiquidFedError) and str(exc).startswith("data"):
            raise
        raise DataError(f"data: {exc}") from exc


def make_plan(cfg: RunConfig, ds: Dataset) -> ViewPlan:
    """The run's views, reproducible from ``cfg.seed``."""
    v = cfg.views
    try:
        return make_views(ds, v.kind, v.n_views, seed=cfg.seed, overlap=v.overlap,
                          noise=v.noise, missing=v.missing, **v.options)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"views: {exc}") from exc


def id_tokens(ids: np.ndarray, salt: bytes) -> np.ndarray:
    """Sample ids as the run's tokens: 64-bit BLAKE2b hashes keyed with the run's salt.

    The protocol names samples by token, never by raw id, so raw ids stay out of messages and
    logs and tokens cannot be linked across runs. It is no private set intersection: every
    party knows the salt and can hash candidate ids (see the README).
    """
    out = np.empty(len(ids), dtype=np.int64)
    for i, value in enumerate(np.asarray(ids, dtype=np.int64).tolist()):
        digest = hashlib.blake2b(value.to_bytes(8, "little", signed=True), key=salt,
                                 digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little", signed=True)
    return out


@dataclass
class ClientView:
    """What one client holds: ids and its own features (standardised once fitted), never
    labels; with the run's salt, the token of every id (what the server asks by)."""

    ids: np.ndarray  # (N,) int64
    x: np.ndarray  # (N, *view_shape)
    present: np.ndarray  # (N,) bool: rows this view really has
    layout: str = "tabular"
    scaler: Standardizer | None = None
    tokens: np.ndarray | None = None  # (N,) int64 once tokenized

    def __post_init__(self) -> None:
        self._index = IdIndex(self.ids, "client")
        self._tokens = (None if self.tokens is None
                        else IdIndex(self.tokens, "client", "the sample of token"))

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Positions of ``ids``; an unknown id is an error naming it."""
        return self._index.rows(ids)

    def lookup_tokens(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions, found) of tokens, tolerating tokens of samples this view lacks."""
        if self._tokens is None:
            raise ValueError("client view has no tokens: tokenize() it with the run's salt")
        return self._tokens.lookup(tokens)

    def token_rows(self, tokens: np.ndarray) -> np.ndarray:
        """Positions of the samples the server names by ``tokens``."""
        if self._tokens is None:
            raise ValueError("client view has no tokens: tokenize() it with the run's salt")
        return self._tokens.rows(tokens)

    def tokenize(self, salt: bytes) -> ClientView:
        """The same view, its ids also as the run's tokens (collisions are an error)."""
        tokens = id_tokens(self.ids, salt)
        if np.unique(tokens).size != tokens.size:
            raise ValueError("two sample ids hash to one token; start the run again (a new salt)")
        return dataclasses.replace(self, tokens=tokens)

    def standardised(self, train_rows: np.ndarray) -> ClientView:
        """The view standardised with statistics of the training rows it holds; rows it lacks
        stay 0."""
        pos = np.asarray(train_rows, dtype=np.int64)
        pos = pos[self.present[pos]]
        scaler = Standardizer(self.layout).fit(self.x[pos])
        x = scaler.transform(self.x)
        x[~self.present] = 0.0
        return dataclasses.replace(self, x=np.ascontiguousarray(x, dtype=np.float32),
                                   scaler=scaler)


def client_view(cfg: RunConfig, index: int) -> ClientView:
    """Client ``index``'s view, cut from the config's data set (not standardised)."""
    ds = load_data(cfg)
    plan = make_plan(cfg, ds)
    return ClientView(ids=ds.ids.copy(),
                      x=np.ascontiguousarray(plan.apply(ds, index), dtype=np.float32),
                      present=plan.present(ds, index), layout=ds.layout)


def load_client_view(cfg: RunConfig, index: int, train_ids: np.ndarray | None) -> ClientView:
    """Client ``index``'s view of the data, standardised on the training ids only."""
    view = client_view(cfg, index)
    if cfg.data.standardize and train_ids is not None:
        view = view.standardised(view.rows(train_ids))
    return view


@dataclass
class ServerData:
    """What the server holds: ids, labels and the splits."""

    ids: np.ndarray
    labels: np.ndarray
    task: str
    n_outputs: int
    splits: Splits
    informative: np.ndarray | None = None  # ground truth of synthetic tasks, for evaluation
    regions: np.ndarray | None = None

    def __post_init__(self) -> None:
        self._index = IdIndex(self.ids, "server")

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Positions of labelled sample ids; an unknown id is an error naming it."""
        return self._index.rows(ids)

    def labels_of(self, ids: np.ndarray) -> np.ndarray:
        return self.labels[self._index.rows(ids)]

    def informative_of(self, ids: np.ndarray) -> np.ndarray | None:
        if self.informative is None:
            return None
        return self.informative[self._index.rows(ids)]

    def regions_of(self, ids: np.ndarray) -> np.ndarray | None:
        if self.regions is None:
            return None
        return self.regions[self._index.rows(ids)]


def load_server_data(cfg: RunConfig) -> ServerData:
    """Labels and splits (stratified by label for classification) from the config."""
    ds = load_data(cfg)
    splits = split_ids(ds, cfg.data.val, cfg.data.test, cfg.seed)
    informative = None
    natural = cfg.views.kind == "natural" or (cfg.views.kind == "groups" and not cfg.views.options)
    if ds.informative_view is not None and natural:
        informative = ds.informative_view.copy()  # view k is group k
    regions = None if ds.regions is None else ds.regions.copy()
    return ServerData(ds.ids.copy(), ds.labels.copy(), ds.task, ds.n_outputs, splits,
                      informative, regions)


def drop_unseen(splits: Splits, absent: Sequence[np.ndarray]) -> Splits:
    """Remove ids that no client holds (every view misses them): nobody can predict them."""
    unseen = absent[0]
    for a in absent[1:]:
        unseen = np.intersect1d(unseen, a)
    if unseen.size == 0:
        return splits
    log.warning("%d sample ids are missing from every view and are left out: %s",
                unseen.size, unseen[:5].tolist())
    return Splits(*(s[~np.isin(s, unseen)] for s in (splits.train, splits.val, splits.test)))


def build_client_expert(cfg: RunConfig, index: int, in_shape: Sequence[int],
                        out_dim: int) -> Expert:
    """Client ``index``'s expert, initialised from (seed, index) so every path builds the same."""
    spec = cfg.experts.per_client[index] if cfg.experts.per_client else {}
    kind = spec.get("kind", cfg.experts.kind)
    options = {**(cfg.experts.options if "kind" not in spec else {}), **spec.get("options", {})}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed * 100_003 + index)
        try:
            expert = build_expert(kind, in_shape, out_dim, cfg.n_clients, index, **options)
        except (ValueError, TypeError) as exc:
            where = f"experts.per_client[{index}]" if spec else "experts"
            raise ConfigError(f"{where}: {exc}") from exc
    return expert.to(DTYPES[cfg.train.dtype])
