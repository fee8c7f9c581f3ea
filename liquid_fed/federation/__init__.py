"""The federated Liquid Ensemble, independent of any transport: one module per job.

- :mod:`~liquid_fed.federation.setup`: each party's data and expert, built from the config.
- :mod:`~liquid_fed.federation.state`: expert and optimizer state as plain arrays.
- :mod:`~liquid_fed.federation.client`: the client runtime, one pure step per message.
- :mod:`~liquid_fed.federation.replies`: the server's checks of every client reply.
- :mod:`~liquid_fed.federation.server`: the server's step (loss, signals, metrics).
- :mod:`~liquid_fed.federation.transport`: how the server reaches its clients.
- :mod:`~liquid_fed.federation.loop`: the round loop (:class:`Federation`).

Labels stay at the server (but see :mod:`liquid_fed.privacy`). None of this imports Flower:
the Flower apps in ``clients/`` and ``server/`` are thin adapters over it.
"""

from liquid_fed.federation.client import handle_client_message
from liquid_fed.federation.loop import Federation, FederationResult, RoundInfo
from liquid_fed.federation.server import Evaluation, ServerStep, TrainStep
from liquid_fed.federation.setup import (
    ClientView,
    ServerData,
    build_client_expert,
    client_view,
    drop_unseen,
    id_tokens,
    load_client_view,
    load_data,
    load_server_data,
    make_plan,
)
from liquid_fed.federation.transport import LocalTransport, Transport, payload_bytes

__all__ = [
    "ClientView", "Evaluation", "Federation", "FederationResult", "LocalTransport",
    "RoundInfo", "ServerData", "ServerStep", "TrainStep", "Transport", "build_client_expert",
    "client_view", "drop_unseen", "handle_client_message", "id_tokens", "load_client_view",
    "load_data", "load_server_data", "make_plan", "payload_bytes",
]
