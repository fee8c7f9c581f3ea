"""The party side of a deployment: one SuperNode for party K, on the party's own machine.

    liquid-fed party-host --superlink HOST:PORT --keys KEYS/party-K --data-dir SHARDS/party-K
        --partition-id K --num-partitions N [--port PORT] [--work-dir DIR] [--insecure]

``party-host`` starts one SuperNode that trusts only the CA in ``KEYS/party-K/ca.crt``, signs
its requests with ``KEYS/party-K/supernode.key`` and gives its ClientApp the node config
``partition-id=K num-partitions=N data-dir="SHARDS/party-K"``; it runs until stopped (Ctrl-C
or SIGTERM) or until the SuperNode exits. Its local runtime API listens on 127.0.0.1 only.
Paths may be relative to where the command is typed (they are resolved before anything
starts). Its logs and work folder are private (0600 files in 0700 folders; every file its
children write is 0600).

It says why it cannot connect, within ``--connect-timeout`` seconds (60), and exits with status
1: before starting the SuperNode it probes the address itself (Flower would retry silently) —
nothing listening (retried until the timeout), a server that does not speak TLS (or does when
the party runs ``--insecure``), a certificate that does not name the address or that the
party's CA did not sign — then watches the SuperNode until it is let in: a key the SuperLink
refuses (not registered, or its node still online from an earlier start) is named as such.
Whatever kills ``party-host`` (SIGKILL included), its SuperNode and ClientApp worker go too
(:class:`liquid_fed.procs.ProcessGroup`).

A party whose SuperNode or worker died (crash, kill -9, reboot) rejoins the running run when
the same command is started again: the SuperNode reclaims its key's node at the SuperLink
(its id is kept in ``KEYS/party-K/supernode.key.node-id``), the server sets the party up
again from its own last checkpoint in ``SHARDS/party-K/checkpoints``, and it takes part in
the next rounds.
How the SuperNode runs the ClientApp (``--mode``) is :mod:`clients.supernode`'s business; the
commands and flags every SuperNode of a deployment gets (here and in the loopback rehearsal,
:mod:`server.deploy_local`) are built by this module.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from clients.supernode import EXIT_WORKER_DIED, MODES
from liquid_fed import procs
from liquid_fed.errors import ConfigError, DeploymentError
from liquid_fed.procs import ProcessGroup, check_insecure
from liquid_fed.rundir import private_folder
from server.keys import PartyKeys, load_keys

log = logging.getLogger("liquid_fed.hosts")

#: The mode SuperNodes run in unless told otherwise (see :mod:`clients.supernode`).
DEFAULT_MODE = "fast"
#: What a SuperNode logs once the SuperLink has let it in.
NODE_ID = re.compile(r"SuperNode ID: (\d+)")


def supernode_security_args(keys: PartyKeys | None, private_key: Path | None = None
                            ) -> list[str]:
    """``flower-supernode`` flags: the CA that signed the SuperLink's certificate and the
    node's auth key (``private_key`` replaces the party's own), or ``--insecure``."""
    if keys is None:
        return ["--insecure"]
    return ["--root-certificates", str(keys.ca),
            "--auth-supernode-private-key", str(private_key or keys.private_key)]


def supernode_command(mode: str, name: str, flower: list[str]) -> list[str]:
    """A SuperNode with ``flower-supernode`` flags ``flower``, run as ``mode`` says
    (:mod:`clients.supernode`); its runtime API on 127.0.0.1."""
    if mode == "stock":
        return [procs.executable("flower-supernode"), *flower, "--host", "127.0.0.1"]
    return [sys.executable, "-m", "clients.supernode", "--mode", mode, "--name", name, "--",
            *flower, "--host", "127.0.0.1"]


def node_config(k: int, n: int, data_dir: Path | None = None) -> str:
    """A SuperNode's ``--node-config``: its partition and, with shards, its private folder."""
    text = f"partition-id={k} num-partitions={n}"
    if data_dir is not None:
        path = str(Path(data_dir).resolve())
        if any(c in path for c in "\"'\n"):
            raise ConfigError(f"data-dir: got {path!r}; Flower's node config cannot carry "
                              "quotes or newlines in a path")
        text += f' data-dir="{path}"'
    return text


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) -> (host, port); raises ConfigError naming the value."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"--superlink: got {address!r}; accepted: HOST:PORT, e.g. "
                          "10.0.0.5:9092 or [fd00::5]:9092")
    return host.strip("[]"), int(port)


def _check_shard(folder: Path, k: int) -> None:
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        raise ConfigError(f"--data-dir {folder}: no manifest.json (expected party-{k} written "
                          "by `liquid-fed split`)")
    try:
        data = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--data-dir {folder}: its manifest.json cannot be read ({exc})") from exc
    if not isinstance(data, dict) or data.get("role") == "server" or "party" not in data:
        what = ("the server's label folder" if isinstance(data, dict)
                and data.get("role") == "server" else "no party's shard")
        raise ConfigError(f"--data-dir {folder} holds {what}, not party {k}'s shard (give it "
                          f"the party-{k} folder of `liquid-fed split`)")
    if data.get("party") != k:
        raise ConfigError(f"--data-dir {folder} holds party {data.get('party')}'s shard, not "
                          f"party {k}'s (--partition-id)")


#: How long a party waits by default for the SuperLink to answer and let it in (seconds).
CONNECT_TIMEOUT = 60.0
#: OpenSSL's verify codes that mean "not signed by a CA we trust".
_UNTRUSTED = {2, 7, 18, 19, 20, 21, 27}
_HOSTNAME_MISMATCH = {62, 64}


def _display(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def certificate_names(host: str, port: int, timeout: float = 5.0) -> list[str]:
    """The names (subjectAltName IPs and DNS names) in the certificate served at host:port,
    read without verifying it; [] when none can be read."""
    from cryptography import x509

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock, \
                ctx.wrap_socket(sock) as tls:
            der = tls.getpeercert(binary_form=True)
        cert = x509.load_der_x509_certificate(der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return []
    return [str(v) for v in san.get_values_for_type(x509.IPAddress)] + list(
        san.get_values_for_type(x509.DNSName))


def _connect(host: str, port: int, deadline: float, timeout: float,
             on_wait: Callable[[str], None] | None) -> socket.socket:
    """A TCP connection to host:port, retried while nothing listens until ``deadline``."""
    address, told = _display(host, port), False
    while True:
        left = deadline - time.monotonic()
        try:
            return socket.create_connection((host, port), timeout=max(0.5, min(5.0, left)))
        except socket.gaierror as exc:
            raise DeploymentError(f"cannot reach the SuperLink at {address}: the name {host!r} "
                                  f"does not resolve ({exc.strerror}); check --superlink"
                                  ) from None
        except ConnectionRefusedError:
            reason = ("connection refused: nothing listens on that port (is server-host "
                      "running there, and is the port its public one?)")
        except TimeoutError:
            reason = "no answer (a wrong host, or a firewall drops the connection)"
        except OSError as exc:
            reason = exc.strerror or str(exc)
        if time.monotonic() >= deadline:
            raise DeploymentError(f"cannot reach the SuperLink at {address} within {timeout:g} "
                                  f"s (--connect-timeout): {reason}")
        if not told and on_wait is not None:
            on_wait(f"the SuperLink at {address} does not answer yet: {reason}; retrying for "
                    f"up to {timeout:g} s (--connect-timeout)")
            told = True
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def _check_tls(sock: socket.socket, host: str, port: int, ca: Path) -> None:
    """A TLS handshake on ``sock`` that trusts only ``ca`` and expects the name ``host``."""
    address = _display(host, port)
    ctx = ssl.create_default_context(cafile=str(ca))
    try:
        with ctx.wrap_socket(sock, server_hostname=host):
            return
    except ssl.SSLCertVerificationError as exc:
        code = exc.verify_code
        if code in _HOSTNAME_MISMATCH:
            names = certificate_names(host, port)
            raise DeploymentError(
                f"the SuperLink's certificate at {address} does not name {host} (it names "
                f"{', '.join(names) or 'nothing readable'}): give --superlink one of those "
                f"names, or make keys whose --host includes {host}") from None
        if code in _UNTRUSTED:
            raise DeploymentError(
                f"the certificate served at {address} is not signed by this party's CA "
                f"({ca}): the party's keys and the server's come from different `liquid-fed "
                "keys` runs, or another server answers at that address") from None
        raise DeploymentError(f"the certificate served at {address} cannot be verified "
                              f"with {ca}: {exc.verify_message}") from None
    except TimeoutError:
        raise DeploymentError(f"the server at {address} accepted a connection but did not "
                              "complete a TLS handshake") from None
    except (ssl.SSLError, ConnectionError) as exc:
        raise DeploymentError(
            f"the server at {address} does not speak TLS ({getattr(exc, 'reason', None) or exc}"
            "): it runs without keys (--insecure), or another service listens there; this "
            "party expects TLS (--keys)") from None


def _check_plain(sock: socket.socket, host: str, port: int) -> None:
    """A plain HTTP request on ``sock`` must get a plain HTTP answer (an --insecure party)."""
    address = _display(host, port)
    try:
        sock.sendall(f"GET / HTTP/1.0\r\nHost: {address}\r\n\r\n".encode())
        answer = sock.recv(16)
    except TimeoutError:
        raise DeploymentError(f"the server at {address} did not answer a plain HTTP request "
                              "(it may expect TLS: this party runs --insecure)") from None
    except ConnectionError:
        answer = b""
    if not answer.startswith(b"HTTP/"):
        raise DeploymentError(
            f"the server at {address} does not answer in plain HTTP (it expects TLS): this "
            "party runs --insecure; give it --keys (its folder of `liquid-fed keys`) instead")


def probe_superlink(host: str, port: int, ca: Path | None, timeout: float = CONNECT_TIMEOUT,
                    on_wait: Callable[[str], None] | None = None) -> None:
    """Check that the SuperLink at host:port can be reached and verified, as the SuperNode
    will need it (Flower itself retries such failures silently).

    Args:
        host: the address's host, as named in the server's certificate.
        port: its port.
        ca: the party's CA certificate (None: the party runs without TLS).
        timeout: seconds to keep retrying while nothing listens there.
        on_wait: told once, in words, why it is still waiting.

    Raises:
        DeploymentError: nothing answered within ``timeout``, or the server's TLS (or its
            absence) or certificate does not fit; the message says which.
    """
    deadline = time.monotonic() + timeout
    sock = _connect(host, port, deadline, timeout, on_wait)
    with sock:
        sock.settimeout(max(5.0, deadline - time.monotonic()))
        if ca is None:
            _check_plain(sock, host, port)
        else:
            _check_tls(sock, host, port, ca)


#: SuperNode log lines that say why it could not join, and what a user should read instead.
_REFUSED = re.compile(
    r"Failed to activate SuperNode|(refused to|does not) activate this key's node")
_FLOWER_EXIT = re.compile(r"Failed to initialize the connection to the SuperLink")
_ERROR = re.compile(r"\b(ERROR|CRITICAL)\b[: ]*(.*)")


def supernode_failure(lines: list[str], status: int | None, address: str,
                      key: Path | None) -> str:
    """One line: why the SuperNode stopped (or never got in), from its log and exit status."""
    text = "\n".join(lines)
    if _REFUSED.search(text):
        return (f"the SuperLink at {address} refused this party's key ({key}): either the key "
                "is not registered there (server-host registers the public keys of its --keys "
                "folder: were both made by the same `liquid-fed keys` run?), or a node of this "
                "key is still online from an earlier start that died (it goes offline 20 s "
                "after; start again then)")
    if status == EXIT_WORKER_DIED:
        worker = [m.group(0) for line in lines if (m := re.search(r"worker .*", line))]
        return ("its ClientApp worker died" + (f" ({worker[-1]})" if worker else ""))
    for i, line in enumerate(lines):
        if _FLOWER_EXIT.search(line):
            detail = lines[i + 1].strip() if i + 1 < len(lines) else ""
            return f"Flower could not connect to the SuperLink at {address}: {detail}".rstrip()
    errors = [m.group(2).strip() for line in lines if (m := _ERROR.search(line))]
    errors = [e for e in errors if e and not e.startswith("Traceback")]
    if errors:
        return errors[-1]
    last = next((line.strip() for line in reversed(lines) if line.strip()), "no output")
    return (f"exit status {status}; " if status is not None else "") + f"its last line: {last}"


def _resolve(path: str | None) -> Path | None:
    """A path argument resolved against where the command was typed (children run elsewhere)."""
    return None if path is None else Path(path).expanduser().resolve()


def party_host(superlink: str, keys: str | None, data_dir: str, partition_id: int,
               num_partitions: int, port: int | None = None, mode: str = DEFAULT_MODE,
               work_dir: str | None = None, insecure: bool = False, quiet: bool = False,
               connect_timeout: float = CONNECT_TIMEOUT) -> int:
    """Run one SuperNode for party K until it exits or this command is stopped.

    Args:
        superlink: ``HOST:PORT`` of the server host, as named in its certificate.
        keys: this party's folder of ``liquid-fed keys`` (None only with ``insecure``).
        data_dir: this party's shard (``party-K`` of ``liquid-fed split``).
        partition_id: K.
        num_partitions: the number of parties.
        port: the SuperNode's local runtime API port on 127.0.0.1 (default: a free one).
        mode: how the SuperNode runs the ClientApp (:data:`clients.supernode.MODES`).
        work_dir: logs and Flower home (default: a new temporary folder); created 0700.
        insecure: no TLS, no authentication (refused unless the SuperLink is on loopback).
        quiet: don't echo the SuperNode's log.
        connect_timeout: seconds from the start within which the SuperLink must answer,
            verify and let this party in.

    Returns:
        The SuperNode's exit status.

    Raises:
        ConfigError: a bad address, partition, key folder or shard (before anything starts).
        DeploymentError: the SuperLink cannot be reached or verified, or refuses this party's
            key, within ``connect_timeout`` (the message says which; nothing is left running).
    """
    t0 = time.monotonic()
    if mode not in MODES:
        raise ConfigError(f"--mode: got {mode!r}; accepted: {', '.join(MODES)}")
    if not connect_timeout > 0:
        raise ConfigError(f"--connect-timeout: got {connect_timeout!r}; accepted: seconds > 0")
    host, superlink_port = split_address(superlink)
    check_insecure(insecure, [host], "--superlink")
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"--partition-id: got {partition_id}; accepted: 0.."
                          f"{num_partitions - 1} (--num-partitions {num_partitions})")
    keys_dir = _resolve(keys)
    party_keys = load_keys(keys_dir, insecure, PartyKeys, "this party's folder")
    shard = _resolve(data_dir)
    assert shard is not None
    _check_shard(shard, partition_id)
    address = _display(host, superlink_port)

    def waiting(why: str) -> None:
        print(f"party {partition_id}: {why}", file=sys.stderr)

    probe_superlink(host, superlink_port, party_keys.ca if party_keys else None,
                    connect_timeout, waiting)
    work = (private_folder(_resolve(work_dir), claim=False) if work_dir  # type: ignore[arg-type]
            else Path(tempfile.mkdtemp(prefix="lf-party-")))
    # The log is echoed only once the party is in: a failure is told in one line first.
    group = ProcessGroup(work, None if quiet else sys.stderr, umask=0o077)
    with group:
        runtime_port = port or procs.free_port()
        group.ports.append(runtime_port)
        node = group.spawn(f"supernode-{partition_id}", supernode_command(
            mode, f"supernode-{partition_id}", [
                *supernode_security_args(party_keys), "--superlink", address,
                "--port", str(runtime_port),
                "--node-config", node_config(partition_id, num_partitions, shard),
            ]), work / "supernode-home")
        key = party_keys.private_key if party_keys else None
        deadline = t0 + connect_timeout
        while not (hits := node.find(NODE_ID)):
            if node.proc.poll() is not None:
                node.wait_closed(2)
                raise DeploymentError(
                    f"party {partition_id} could not join: "
                    f"{supernode_failure(node.text(), node.proc.returncode, address, key)}"
                    f"\n(the SuperNode's log: {node.log_path})")
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"party {partition_id} was not let in by the SuperLink at {address} within "
                    f"{connect_timeout:g} s (--connect-timeout): "
                    f"{supernode_failure(node.text(), None, address, key)}"
                    f"\n(the SuperNode's log: {node.log_path})")
            time.sleep(0.2)
        print(f"party {partition_id} connected to {address} as SuperNode "
              f"{hits[0][1].group(1)}; Ctrl-C stops it (logs: {work})", file=sys.stderr)
        if not quiet:
            node.echo = sys.stderr
        while node.proc.poll() is None:
            time.sleep(0.2)
        node.wait_closed(2)
        rc = node.proc.returncode
    if rc != 0:
        print(f"liquid-fed party-host: the SuperNode stopped (status {rc}): "
              f"{supernode_failure(node.text(), rc, address, key)}\n"
              f"The run goes on without this party if the server allows absences "
              "(federation.min_clients); start the same command again (same --keys and "
              f"--data-dir) to rejoin it. Its log: {node.log_path}", file=sys.stderr)
    return rc
