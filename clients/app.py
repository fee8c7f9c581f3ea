"""Flower ClientApp: one expert per node, its own view of the features, never the labels.

A thin adapter: every message is decoded and handed to
:func:`liquid_fed.federation.handle_client_message`; the expert and optimizer state live in
``Context.state`` between messages (in deployment every message starts a new process).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from clients.codec import INDEX, PACKED, array_buffer, buffer_array, decode, encode, pack, unpack
from liquid_fed.federation import handle_client_message
from liquid_fed.federation.client import obey_fault

STATE_ARRAYS = "liquid-fed.state"
STATE_SETTINGS = "liquid-fed.settings"
#: Where each of the state's arrays lies in its packed buffer (clients.codec.pack: one Array,
#: one header to write and parse per message instead of one per parameter and moment).
STATE_INDEX = "liquid-fed.state-index"
SETTING_KEYS = ("config", "index", "out_dim", "salt", "run_id", "threads")

app = ClientApp()


def _handle(kind: str, msg: Message, context: Context) -> Message:
    arrays, settings = decode(msg.content)
    obey_fault(settings)  # an injected crash or hang (simulations only) ends here
    stored = context.state.config_records.get(STATE_SETTINGS, ConfigRecord())
    settings = {**dict(stored), **settings}
    # A deployed node reads its private shard (node config `data-dir`), never the data set,
    # and keeps its own checkpoints there; the server cannot set this.
    settings["data_dir"] = str(context.node_config.get("data-dir", ""))
    torch.set_num_threads(int(settings.get("threads", 1)))
    state = unpack_state(context)
    reply, info, state = handle_client_message(kind, arrays, settings, state)
    pack_state(context, state)
    if kind == "setup":
        context.state[STATE_SETTINGS] = ConfigRecord(
            {k: settings[k] for k in SETTING_KEYS if k in settings})
    return Message(encode(reply, info), reply_to=msg)


def pack_state(context: Context, state: dict[str, np.ndarray]) -> None:
    """Keep ``state`` in ``context.state`` as one packed buffer and its index."""
    buffer, index = pack(state)
    context.state[STATE_ARRAYS] = ArrayRecord({PACKED: buffer_array(buffer)})
    context.state[STATE_INDEX] = ConfigRecord({INDEX: index})


def unpack_state(context: Context) -> dict[str, np.ndarray]:
    """What :func:`pack_state` kept: arrays that are views into one buffer (empty when the
    node holds no state yet)."""
    record = context.state.array_records.get(STATE_ARRAYS)
    if record is None:
        return {}
    if PACKED not in record:  # a state written before the packing: one Array per entry
        return {k: v.numpy() for k, v in record.items()}
    return unpack(array_buffer(record[PACKED]),
                  context.state.config_records[STATE_INDEX][INDEX])


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    """Tell the server which partition (client index) this node is."""
    info = {k.replace("-", "_"): v for k, v in context.node_config.items()
            if isinstance(v, (int, float, str, bool))}
    return Message(encode({}, info), reply_to=msg)


@app.query("setup")
def setup(msg: Message, context: Context) -> Message:
    """Build the expert for the run's config; report the ids held."""
    return _handle("setup", msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Apply pending signals, then predict and delegate on the next chunk."""
    return _handle("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Apply pending signals, then predict and delegate on evaluation ids."""
    return _handle("evaluate", msg, context)


@app.query("checkpoint")
def checkpoint(msg: Message, context: Context) -> Message:
    """Apply pending signals and return the expert's and optimizer's state."""
    return _handle("checkpoint", msg, context)
