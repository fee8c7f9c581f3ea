"""The Flower apps' codec: arrays packed into one buffer, and what a hostile index gets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from test_rejoin import _Grid, _transport, stand_in_messages  # noqa: F401 (a fixture)

from clients.app import pack_state, unpack_state
from clients.codec import (
    ALIGN,
    ARRAYS,
    INDEX,
    PACKED,
    PACKED_STYPE,
    array_buffer,
    buffer_array,
    decode,
    encode,
    pack,
    unpack,
)
from liquid_fed.config import build_config
from liquid_fed.errors import ClientFailure
from liquid_fed.federation import Federation, LocalTransport
from liquid_fed.federation.transport import NoReply

ARRAYS_IN = {
    "f32": np.arange(12, dtype=np.float32).reshape(3, 4),
    "f64": np.linspace(-1, 1, 7),
    "i64": np.array([2**62, -5, 0], dtype=np.int64),
    "u8": np.frombuffer(b"hello", dtype=np.uint8),
    "bool": np.array([[True, False], [False, True]]),
    "empty": np.zeros((0, 3), dtype=np.float32),
    "scalar": np.array(3.5, dtype=np.float32),
    "strided": np.arange(20, dtype=np.int32)[::3],  # not contiguous: packed C-ordered
    "fortran": np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
}


def test_pack_round_trip_keeps_values_dtypes_and_alignment() -> None:
    buffer, index = pack(ARRAYS_IN)
    got = unpack(buffer, index)
    assert list(got) == list(ARRAYS_IN)
    for name, want in ARRAYS_IN.items():
        assert got[name].dtype == want.dtype, name
        # np.ascontiguousarray makes a 0-d array 1-d, as the codec always did.
        assert got[name].shape == (want.shape or (1,)), name
        np.testing.assert_array_equal(got[name].reshape(want.shape), want)
        assert got[name].ctypes.data % ALIGN == buffer.ctypes.data % ALIGN
    for _, _, _, start, _ in json.loads(index):
        assert start % ALIGN == 0
    assert buffer.size == sum(-(-a.nbytes // ALIGN) * ALIGN for a in ARRAYS_IN.values())


def test_encode_decode_through_a_flower_record_dict() -> None:
    content = encode(ARRAYS_IN, {"round": 3, "kind": "train", "ok": True})
    assert list(content.array_records[ARRAYS].keys()) == [PACKED]  # one Array per message
    arrays, settings = decode(content)
    assert settings == {"round": 3, "kind": "train", "ok": True}
    np.testing.assert_array_equal(arrays["f32"], ARRAYS_IN["f32"])
    empty_arrays, only = decode(encode({}, {"a": 1}))
    assert empty_arrays == {} and only == {"a": 1}


def test_the_buffer_travels_as_its_own_bytes_not_an_npy_file() -> None:
    content = encode(ARRAYS_IN, {})
    array = content.array_records[ARRAYS][PACKED]
    buffer, _ = pack(ARRAYS_IN)
    assert array.stype == PACKED_STYPE and array.data == buffer.tobytes()  # no .npy header
    assert array.dtype == "|u1" and array.shape == (buffer.size,)
    arrays, _ = decode(content)
    arrays["f64"][0] = 7.0  # a writable copy, not a view of the message's bytes
    assert array.data == buffer.tobytes()
    # A message or state of the earlier format (an .npy Array) still reads.
    legacy = RecordDict({ARRAYS: ArrayRecord({PACKED: Array(buffer)}),
                         INDEX: content.config_records[INDEX]})
    for name, want in ARRAYS_IN.items():
        np.testing.assert_array_equal(decode(legacy)[0][name].reshape(want.shape), want)


@pytest.mark.parametrize("dtype,shape", [("<f4", (16,)), ("|u1", (15,)), ("|u1", (4, 4))])
def test_a_buffer_array_whose_header_lies_is_refused(dtype, shape) -> None:
    lying = Array(dtype=dtype, shape=shape, stype=PACKED_STYPE, data=bytes(16))
    with pytest.raises(ValueError, match=r"the buffer's Array says dtype .* for 16 bytes"):
        array_buffer(lying)
    np.testing.assert_array_equal(array_buffer(buffer_array(np.arange(16, dtype=np.uint8))),
                                  np.arange(16))


def test_object_and_structured_arrays_cannot_travel() -> None:
    with pytest.raises(ValueError, match="'obj': dtype object cannot travel"):
        pack({"obj": np.array([object()], dtype=object)})
    with pytest.raises(ValueError, match="cannot travel"):
        pack({"rec": np.zeros(2, dtype=[("a", "<f4")])})


def _index(*entries: list) -> str:
    return json.dumps(list(entries))


BUF = np.zeros(256, dtype=np.uint8)


@pytest.mark.parametrize("index,message", [
    ("not json", "the index is not JSON"),
    (json.dumps({"a": 1}), "must be a list"),
    (_index(["x", "<f4", [2], 0]), "bad index entry"),
    (_index(["x", "<f4", [-1], 0, 4]), "bad index entry"),
    (_index(["x", "<f4", [2], 0, 8.0]), "bad index entry"),
    (_index(["x", "|O", [1], 0, 8]), "'x' has dtype '|O'; only native numbers"),
    (_index(["x", "V8", [1], 0, 8]), "only native numbers"),
    (_index(["x", "[('a', '<f4')]", [1], 0, 4]), "unknown dtype|only native numbers"),
    (_index(["x", ">f4", [2], 0, 8]), "only native numbers"),
    (_index(["x", "<U4", [1], 0, 16]), "only native numbers"),
    (_index(["x", "nonsense", [1], 0, 4]), "unknown dtype"),
    (_index(["x", "<f4", [100], 0, 400]), "lies outside the buffer"),
    (_index(["x", "<f4", [2], 4, 8]), "unaligned"),
    (_index(["x", "<f4", [3], 0, 8]), r"shape \[3\] of float32 \(12 bytes\) but 8 bytes"),
    (_index(["x", "<f4", [2], 0, 8], ["x", "<f4", [2], 64, 8]), "'x' appears twice"),
    (json.dumps([["x", "<f4", [1], 0, 4]] * 5000), "at most 4096 entries"),
])
def test_a_hostile_index_is_refused_naming_why(index: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        unpack(BUF, index)


def test_a_message_not_packed_by_liquid_fed_is_refused() -> None:
    loose = RecordDict({ARRAYS: ArrayRecord({"pred": Array(np.zeros(3))}),
                        INDEX: ConfigRecord({INDEX: "[]"})})
    with pytest.raises(ValueError, match=r"not packed as liquid-fed packs them \(arrays \['pred'"):
        decode(loose)
    no_index = RecordDict({ARRAYS: ArrayRecord({PACKED: Array(np.zeros(8, np.uint8))})})
    with pytest.raises(ValueError, match="not packed"):
        decode(no_index)
    with pytest.raises(ValueError, match="not bytes"):
        unpack(np.zeros(4, dtype=np.float32), "[]")


def test_client_state_round_trips_through_the_context() -> None:
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    assert unpack_state(context) == {}
    pack_state(context, ARRAYS_IN)
    got = unpack_state(context)
    for name, want in ARRAYS_IN.items():
        np.testing.assert_array_equal(got[name].reshape(want.shape), want)
    # A node's state written one Array per entry (before the packing) still reads.
    context.state["liquid-fed.state"] = ArrayRecord({"a": Array(np.arange(3.0))})
    np.testing.assert_array_equal(unpack_state(context)["a"], np.arange(3.0))


def test_an_unreadable_reply_is_a_bad_reply_of_that_client(stand_in_messages,  # noqa: F811
                                                         monkeypatch) -> None:
    import server.app as app

    real = app.decode
    garbled = iter([False, True])  # node 11's reply reads; node 12's was garbled on the way

    def decode_one(content):
        if next(garbled):
            return real(RecordDict({ARRAYS: ArrayRecord({PACKED: Array(BUF)}),
                                    INDEX: ConfigRecord({INDEX: _index(["x", "<f4", [100],
                                                                        0, 400])})}))
        return real(content)

    monkeypatch.setattr(app, "decode", decode_one)
    t = _transport(_Grid([11, 12], lambda node, kind: {"info": {"ok": node}}), [11, 12])
    first, second = t.exchange("train", [{}, {}], [{}, {}])
    assert first == ({}, {"ok": 11})
    assert isinstance(second, NoReply) and second.cause == "bad_reply"
    assert second.reason.startswith('client 1 (node 12) sent an unreadable reply to "train": '
                                    "packed arrays: 'x' lies outside the buffer")
    assert t.missed == {1}


class _Unreadable(LocalTransport):
    """Client 1's training replies cannot be read (as GridTransport reports them)."""

    def exchange(self, kind, arrays, settings, clients=None):
        replies = super().exchange(kind, arrays, settings, clients)
        clients = range(len(self.states)) if clients is None else clients
        return [NoReply("bad_reply", f"client {k} sent an unreadable reply")
                if kind == "train" and k == 1 else r for k, r in zip(clients, replies, strict=True)]


def test_unreadable_replies_follow_on_bad_reply() -> None:
    base = {"train": {"epochs": 1, "eval_every": 0},
            "baselines": {"uniform": False, "independent": False}}
    with pytest.raises(ClientFailure, match=r"client 1 sent an unreadable reply "
                                            r"\(federation.on_bad_reply = fail\)"):
        Federation(build_config(base, ["federation.on_bad_reply=fail"]),
                   _Unreadable(4)).run()
    fed = Federation(build_config(base), _Unreadable(4))
    result = fed.run()
    assert result.rounds > 0
    assert fed.absences[1]["bad_reply"] == result.rounds
    assert all(not fed.absences[k] for k in (0, 2, 3))
