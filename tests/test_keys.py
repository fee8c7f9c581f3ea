"""Deployment keys: the files each machine gets, their permissions, a certificate that a TLS
client accepts for the named hosts only, auth keys in the form Flower 1.41 loads."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_ssh_private_key,
    load_ssh_public_key,
)

from liquid_fed.cli import main
from liquid_fed.errors import ConfigError, RunFolderError
from server.keys import make_keys, verify_server_cert


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):
    return make_keys(tmp_path_factory.mktemp("k") / "keys", 3,
                     ["127.0.0.1", "localhost", "10.1.2.3", "server.example.org"])


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_each_machine_gets_its_folder_and_private_keys_are_0600(keys) -> None:
    root = keys.root
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == sorted([
        "ca/ca.crt", "ca/ca.key",
        "server/ca.crt", "server/server.crt", "server/server.key",
        *[f"server/supernodes/party-{k}.pub" for k in range(3)],
        *[f"party-{k}/{name}" for k in range(3)
          for name in ("ca.crt", "supernode.key", "supernode.pub")]])
    private = [root / "ca" / "ca.key", keys.server.key,
               *[keys.party(k).private_key for k in range(3)]]
    for path in private:
        assert _mode(path) == 0o600, path
        assert b"PRIVATE KEY" in path.read_bytes()
    for path in root.rglob("*"):  # no private key anywhere else, no temporary file left
        if path.is_file() and path not in private:
            assert b"PRIVATE" not in path.read_bytes(), path
        assert not path.name.startswith("."), path
    for folder in (root, root / "ca", keys.server.folder, keys.party(0).folder):
        assert _mode(folder) == 0o700, folder
    # The server's copy of each public key is the party's, and it matches the private key.
    for k in range(3):
        party = keys.party(k)
        assert (keys.server.folder / "supernodes" / f"party-{k}.pub").read_bytes() == (
            party.public_key.read_bytes())
        private_key = load_ssh_private_key(party.private_key.read_bytes(), None)
        public_key = load_ssh_public_key(party.public_key.read_bytes())
        assert isinstance(private_key, ec.EllipticCurvePrivateKey)
        assert private_key.curve.name == "secp384r1"
        assert private_key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH) == (
            public_key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH))
    assert len({keys.party(k).private_key.read_bytes() for k in range(3)}) == 3


def test_private_keys_stay_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        keys = make_keys(tmp_path / "keys", 1)
    finally:
        os.umask(old)
    assert _mode(keys.server.key) == 0o600 and _mode(keys.party(0).private_key) == 0o600


def test_flower_accepts_the_node_keys(keys) -> None:
    # What `flwr supernode register KEY.pub` and `flower-supernode
    # --auth-supernode-private-key KEY` run on the files (Flower's own loaders).
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    raw = try_load_public_key(keys.server.folder / "supernodes" / "party-1.pub")
    private_key = load_ssh_private_key(keys.party(1).private_key.read_bytes(), None)
    assert raw == public_key_to_bytes(private_key.public_key())


def test_server_certificate_verifies_against_the_ca_for_the_named_hosts(keys,
                                                                        tmp_path: Path) -> None:
    for host in ("127.0.0.1", "localhost", "10.1.2.3", "server.example.org"):
        verify_server_cert(keys.server.cert, keys.server.ca, host)
        verify_server_cert(keys.server.cert, keys.party(2).ca, host)
    with pytest.raises(ValueError, match="does not name 10.9.9.9"):
        verify_server_cert(keys.server.cert, keys.server.ca, "10.9.9.9")
    other = make_keys(tmp_path / "other", 1)
    with pytest.raises(ValueError, match="not signed by the CA"):
        verify_server_cert(keys.server.cert, other.ca_cert, "127.0.0.1")


def _handshake(keys, ca: Path, server_name: str) -> str:
    """A real TLS handshake on loopback: the server presents server.crt, the client trusts
    ``ca`` and checks ``server_name``; returns the negotiated protocol version."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(keys.server.cert, keys.server.key)
    client_ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                    client_ctx.wrap_socket(raw, server_hostname=server_name) as tls:
                tls.sendall(b"x")
                return str(tls.version())
        finally:
            thread.join(10)


def test_a_tls_client_trusting_the_ca_accepts_the_server_and_nothing_else(
        keys, tmp_path: Path) -> None:
    assert _handshake(keys, keys.party(0).ca, "127.0.0.1").startswith("TLS")
    assert _handshake(keys, keys.party(0).ca, "server.example.org").startswith("TLS")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(keys, keys.party(0).ca, "elsewhere.example.org")
    other = make_keys(tmp_path / "other", 1)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(keys, other.ca_cert, "127.0.0.1")


def test_keys_are_never_overwritten_and_bad_options_are_named(keys, tmp_path: Path) -> None:
    before = keys.server.key.read_bytes()
    with pytest.raises(RunFolderError, match="not empty"):
        make_keys(keys.root, 3)
    assert keys.server.key.read_bytes() == before
    with pytest.raises(ConfigError, match=r"--nodes: got 0"):
        make_keys(tmp_path / "a", 0)
    with pytest.raises(ConfigError, match=r"--host: got 'https://x:1'"):
        make_keys(tmp_path / "b", 1, ["https://x:1"])
    with pytest.raises(ConfigError, match=r"--days: got 0"):
        make_keys(tmp_path / "c", 1, days=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_keys_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", str(tmp_path / "k"), "--nodes", "2", "--host", "10.0.0.5"]) == 0
    out = capsys.readouterr().out.split()
    assert out == [str(tmp_path / "k" / "server"), str(tmp_path / "k" / "party-0"),
                   str(tmp_path / "k" / "party-1")]
    for host in ("127.0.0.1", "localhost", "10.0.0.5"):  # loopback always included
        verify_server_cert(tmp_path / "k" / "server" / "server.crt",
                           tmp_path / "k" / "ca" / "ca.crt", host)
    assert main(["keys", str(tmp_path / "k"), "--nodes", "2"]) == 2  # not overwritten
    assert "not empty" in capsys.readouterr().err


def test_small_bad_inputs_get_one_line_errors_and_leave_no_folder(tmp_path: Path,
                                                                   capsys) -> None:
    from server.keys import MAX_NODES

    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert main(["keys", str(a_file), "--nodes", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{a_file} is a file, not a folder" in err and "Traceback" not in err
    assert a_file.read_text() == "mine"
    for nodes in ("100000", "0"):
        assert main(["keys", str(tmp_path / "many"), "--nodes", nodes]) == 2
        assert f"--nodes: got {nodes}; accepted: an integer in 1..{MAX_NODES}" in (
            capsys.readouterr().err)
    for host in ("*", "*.example.org", "a" * 300, "-bad.example.org", "x..y"):
        assert main(["keys", str(tmp_path / "hosts"), "--nodes", "1", f"--host={host}"]) == 2
        err = capsys.readouterr().err
        assert "--host: got" in err and "no wildcard" in err and len(err) < 400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing half-made
    good = tmp_path / "good"
    assert main(["keys", str(good), "--nodes", "2", "--host", "server.example.org"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good", "notes.txt"]
    assert (good / "server" / "supernodes" / "party-1.pub").is_file()


def test_a_failure_midway_leaves_no_partial_key_folder(tmp_path: Path, monkeypatch) -> None:
    import server.keys as keys

    calls = []

    def failing(folder, name="supernode"):
        calls.append(folder)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second party's key is written
        return real(folder, name)

    real = keys.write_node_key
    monkeypatch.setattr(keys, "write_node_key", failing)
    with pytest.raises(KeyboardInterrupt):
        keys.make_keys(tmp_path / "keys", 3)
    assert list(tmp_path.iterdir()) == []
