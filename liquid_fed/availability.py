"""Parties that miss training rounds: which parties answer in each round (config ``availability``).

Dimension letters: ``B`` samples, ``K`` parties (experts).

``availability.dropout: P`` makes each party miss each training round with probability ``P``;
``availability.absent`` schedules absences (``{client: K, from_round: A, to_round: B}``, rounds
counted from 1, both ends included). :func:`round_presence` turns both into the (K,) mask of the
parties that answer in one round; it is drawn from ``(seed, round)`` alone, so the federated
server and the centralized reference (:func:`liquid_fed.train.fit`) draw the same masks.

A party absent from a round is not asked: its expert and its optimizer are untouched, and the
round combines the others with ``present`` False for it on every sample of the chunk
(:func:`liquid_fed.ensemble.combine`: an absent expert passes its vote on). Samples that no
answering party holds (``views.missing`` on top of the round's absences) take no part in that
round's loss (:func:`answered_rows`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

# Keeps the rounds' random stream apart from every other draw seeded by the run's ``seed``.
_ROUND_STREAM = 0xD4097


def scheduled_absent(absent: Sequence[dict[str, Any]], k: int, round_number: int) -> np.ndarray:
    """(K,) bool: the parties whose scheduled absence covers ``round_number`` (counted from 1)."""
    out = np.zeros(k, dtype=bool)
    for entry in absent:
        if int(entry["from_round"]) <= round_number <= int(entry["to_round"]):
            out[int(entry["client"])] = True
    return out


def faulted(faults: Sequence[dict[str, Any]], k: int, round_number: int) -> np.ndarray:
    """(K,) bool: the parties an injected fault (``federation.faults``) takes out of training
    round ``round_number`` (counted from 1). Every fault kind makes its party absent from
    that round: a crashed or hung client never replies; a NaN reply is dropped, and the
    signals its client applied before answering are the ones it would have applied at its
    next message anyway."""
    out = np.zeros(k, dtype=bool)
    for entry in faults:
        if int(entry["round"]) == round_number:
            out[int(entry["client"])] = True
    return out


def round_presence(dropout: float, absent: Sequence[dict[str, Any]], k: int,
                   round_index: int, seed: int) -> np.ndarray:
    """The parties that answer in training round ``round_index`` (counted from 0).

    Each party is dropped when a uniform draw falls below ``dropout``; the scheduled absences
    (rounds counted from 1: round index ``r`` is round ``r + 1``) are added; when no party is
    left, one of those not scheduled away is kept, drawn uniformly. The same arguments always
    give the same mask.

    Args:
        dropout: each party's probability of missing the round, in ``[0, 1)``.
        absent: the scheduled absences, ``{client, from_round, to_round}`` each (checked by
            :mod:`liquid_fed.config`).
        k: parties.
        round_index: the training round, counted from 0.
        seed: the run's seed.

    Returns:
        (K,) bool with at least one True.

    Raises:
        ValueError: every party is scheduled away in this round (the config refuses that).
    """
    away = scheduled_absent(absent, k, round_index + 1)
    if away.all():
        raise ValueError(f"round {round_index + 1}: every party is scheduled absent; at least "
                         "one must answer")
    if dropout <= 0:
        return ~away
    return drop_keeping_one(stream_rng(seed, _ROUND_STREAM, round_index), ~away[None],
                            dropout)[0]


def stream_rng(seed: int, stream: int, key: int) -> np.random.Generator:
    """A generator for draw ``key`` of the random stream ``stream`` of a run of seed ``seed``
    (streams keep the absences' draws apart from every other draw seeded by the run's seed)."""
    return np.random.default_rng(np.random.SeedSequence(
        [abs(int(seed)), int(seed < 0), int(stream), int(key)]))


def drop_keeping_one(rng: np.random.Generator, held: np.ndarray, rate: float) -> np.ndarray:
    """(B, K) bool: each party held in ``held`` (B, K) dropped with probability ``rate``; a row
    that loses every party it holds keeps one of them, drawn uniformly.

    Both draws are made whatever ``held`` is, so the stream does not depend on it."""
    drop = rng.random(held.shape) < rate  # (B, K)
    rescue = rng.random(held.shape)  # (B, K)
    keep = held & ~drop
    lost = ~keep.any(-1)
    choice = np.where(held, rescue, -1.0).argmax(-1)  # (B,)
    keep[lost, choice[lost]] = True
    return keep


def answered_rows(mask: Tensor) -> Tensor | None:
    """Rows (B,) of a presence mask (B, K) with at least one party present, or None when
    every row has one (the chunk is used whole)."""
    rows = mask.any(-1)
    if bool(rows.all()):
        return None
    if not bool(rows.any()):
        raise ValueError("no sample of the chunk is held by a party that answered this round; "
                         "lower availability.dropout or views.missing")
    return rows


def round_mask(view_present: Tensor | None, answering: np.ndarray, n: int) -> Tensor | None:
    """The presence (B, K) a training round combines with: the data's own (``view_present``
    (B, K) or None) and the round's parties (``answering`` (K,)); None when all is present."""
    if bool(answering.all()):
        return view_present
    mask = torch.from_numpy(np.broadcast_to(answering, (n, answering.size)).copy())
    return mask if view_present is None else view_present & mask
