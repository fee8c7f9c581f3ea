"""Keys and certificates for a deployment: TLS for the SuperLink, one auth key per party.

    liquid-fed keys DIR --nodes N [--host 127.0.0.1 --host server.example.org ...] [--days D]

writes one folder per machine, so that each gets exactly what it needs::

    DIR/ca/ca.crt, ca.key               the certificate authority (keep ca.key offline: it is
                                        needed only to issue a new server certificate)
    DIR/server/ca.crt                   the server host's folder (SuperLink + ``flwr run``):
    DIR/server/server.crt, server.key   its TLS certificate (subjectAltName: every --host)
    DIR/server/supernodes/party-K.pub   the public keys the SuperLink registers, one per party
    DIR/party-K/ca.crt                  party K's folder (SuperNode): the CA that signed the
    DIR/party-K/supernode.key, .pub     server's certificate, and its own auth key pair

Flower 1.41 authenticates SuperNodes by a NIST elliptic-curve key pair in OpenSSH format
(``flower-supernode --auth-supernode-private-key``; the SuperLink runs with
``--enable-supernode-auth`` and learns each public key from ``flwr supernode register KEY.pub``
on its Control API; ``--auth-list-public-keys`` is gone). Every request of a SuperNode carries
a signed time stamp; a key the SuperLink has not registered is refused. The keys here are
ECDSA P-384. Private keys are written with mode 0600, every file atomically.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from liquid_fed.errors import ConfigError, RunFolderError
from liquid_fed.rundir import atomic_write

log = logging.getLogger(__name__)

CURVE = ec.SECP384R1
PRIVATE = 0o600
PUBLIC = 0o644
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
MAX_NODES = 1000  # parties one key set serves; a key pair each (about 2 ms apiece)


@dataclass(frozen=True)
class ServerKeys:
    """What the server host holds: the CA certificate, its own certificate and key, and the
    public keys of the parties it lets in."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def cert(self) -> Path:
        return self.folder / "server.crt"

    @property
    def key(self) -> Path:
        return self.folder / "server.key"

    def node_public_keys(self) -> list[Path]:
        """The registered parties' public keys, in party order."""
        keys = sorted((self.folder / "supernodes").glob("party-*.pub"),
                      key=lambda p: int(p.stem.split("-")[1]))
        return keys

    def check(self) -> None:
        """Raises ConfigError naming the first file that is missing."""
        for path in (self.ca, self.cert, self.key):
            if not path.is_file():
                raise ConfigError(f"--keys {self.folder}: {path.name} is missing (expected the "
                                  "server folder written by `liquid-fed keys`)")
        if not self.node_public_keys():
            raise ConfigError(f"--keys {self.folder}: no supernodes/party-*.pub (the parties' "
                              "public keys written by `liquid-fed keys`)")


@dataclass(frozen=True)
class PartyKeys:
    """What party K's host holds: the CA certificate and its own auth key pair."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def private_key(self) -> Path:
        return self.folder / "supernode.key"

    @property
    def public_key(self) -> Path:
        return self.folder / "supernode.pub"

    def check(self) -> None:
        for path in (self.ca, self.private_key):
            if not path.is_file():
                raise ConfigError(f"--keys {self.folder}: {path.name} is missing (expected a "
                                  "party-K folder written by `liquid-fed keys`)")


@dataclass(frozen=True)
class KeySet:
    """Every folder ``liquid-fed keys`` wrote (only the launcher on one machine sees all)."""

    root: Path
    n_nodes: int

    @property
    def server(self) -> ServerKeys:
        return ServerKeys(self.root / "server")

    def party(self, k: int) -> PartyKeys:
        return PartyKeys(self.root / f"party-{k}")

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.crt"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "liquid-fed deployment"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _check_hosts(hosts: list[str]) -> list[str]:
    out: list[str] = []
    for host in hosts:
        host = host.strip()
        if not (_is_ip(host) or _is_dns_name(host)):
            shown = host if len(host) <= 80 else f"{host[:77]}..."
            raise ConfigError(f"--host: got {shown!r}; accepted: an IP address or a DNS name "
                              "(letters, digits and '-' in dot-separated labels of at most 63 "
                              "characters, 253 in all; no wildcard, port or scheme)")
        if host not in out:
            out.append(host)
    if not out:
        raise ConfigError("--host: at least one IP address or DNS name is needed")
    return out


_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _is_dns_name(host: str) -> bool:
    """A host name as RFC 1123 allows it (a certificate must never name a wildcard)."""
    return 0 < len(host) <= 253 and all(_LABEL.fullmatch(label)
                                        for label in host.removesuffix(".").split("."))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def node_key_pair() -> tuple[bytes, bytes]:
    """A SuperNode auth key pair as Flower 1.41 reads it: (OpenSSH private, OpenSSH public)."""
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def write_node_key(folder: str | Path, name: str = "supernode") -> tuple[Path, Path]:
    """A new auth key pair in ``folder`` (private 0600): returns (private, public) paths."""
    private, public = node_key_pair()
    folder = Path(folder)
    return (atomic_write(folder / f"{name}.key", private, PRIVATE),
            atomic_write(folder / f"{name}.pub", public, PUBLIC))


def make_keys(out: str | Path, nodes: int, hosts: list[str] | tuple[str, ...] = DEFAULT_HOSTS,
              days: int = 365) -> KeySet:
    """A CA, a SuperLink certificate and one SuperNode auth key pair per party.

    Args:
        out: a new (or empty) folder.
        nodes: number of parties (SuperNodes).
        hosts: IP addresses and DNS names the SuperNodes use to reach the SuperLink; each goes
            into the server certificate's subjectAltName.
        days: validity of the certificates.

    Returns:
        The :class:`KeySet` written.

    Raises:
        ConfigError: ``nodes``, ``hosts`` or ``days`` out of range.
        RunFolderError: ``out`` already holds files (keys are never overwritten).
    """
    if isinstance(nodes, bool) or not isinstance(nodes, int) or not 1 <= nodes <= MAX_NODES:
        raise ConfigError(f"--nodes: got {nodes!r}; accepted: an integer in 1..{MAX_NODES}")
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 3650:
        raise ConfigError(f"--days: got {days!r}; accepted: an integer in 1..3650")
    hosts = _check_hosts(list(hosts))
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise RunFolderError(f"{root} is a file, not a folder; give a new folder for the keys")
    if root.exists() and any(root.iterdir()):
        raise RunFolderError(f"{root} is not empty; keys are never overwritten (choose a new "
                             "folder)")
    # Everything is written into a hidden sibling, renamed into place when whole: an
    # interrupted or failed run leaves no partial key folder.
    resolved = root.resolve()
    partial = resolved.with_name(f".{resolved.name}.partial-{os.getpid()}")
    try:
        keys = _write_keys(partial, nodes, hosts, days)
        if root.exists():
            root.rmdir()  # empty (checked above)
        os.replace(partial, root)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log.info("keys for %d parties and hosts %s in %s", nodes, hosts, root)
    return KeySet(root, keys.n_nodes)


def _write_keys(root: Path, nodes: int, hosts: list[str], days: int) -> KeySet:
    """The whole key set of :func:`make_keys`, written into ``root``."""
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(CURVE())
    ca_name = _name("liquid-fed CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (x509.CertificateBuilder()
               .subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=True,
                                            crl_sign=True, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(ca_ski, critical=False)
               .sign(ca_key, hashes.SHA384()))

    server_key = ec.generate_private_key(CURVE())
    server_cert = (x509.CertificateBuilder()
                   .subject_name(_name(hosts[0])).issuer_name(ca_name)
                   .public_key(server_key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True,
                                                content_commitment=False,
                                                key_encipherment=False, data_encipherment=False,
                                                key_agreement=True, key_cert_sign=False,
                                                crl_sign=False, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                  critical=False)
                   .add_extension(_san(hosts), critical=False)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(
                       server_key.public_key()), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                       ca_ski), critical=False)
                   .sign(ca_key, hashes.SHA384()))

    keys = KeySet(root, nodes)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    atomic_write(root / "ca" / "ca.key", _private_pem(ca_key), PRIVATE)
    atomic_write(keys.ca_cert, ca_pem, PUBLIC)
    server = keys.server
    atomic_write(server.key, _private_pem(server_key), PRIVATE)
    atomic_write(server.cert, server_cert.public_bytes(serialization.Encoding.PEM), PUBLIC)
    atomic_write(server.ca, ca_pem, PUBLIC)
    for k in range(nodes):
        party = keys.party(k)
        atomic_write(party.ca, ca_pem, PUBLIC)
        _, public = write_node_key(party.folder)
        atomic_write(server.folder / "supernodes" / f"party-{k}.pub", public.read_bytes(),
                     PUBLIC)
    for folder in (root, root / "ca", server.folder, *(keys.party(k).folder
                                                       for k in range(nodes))):
        folder.chmod(0o700)
    return keys


def load_keys(folder: str | Path | None, insecure: bool, kind: type, which: str) -> Any:
    """The checked key folder ``folder`` (a :class:`ServerKeys` or :class:`PartyKeys`), or None
    with ``insecure``; ``which`` names the folder expected in the error."""
    if insecure:
        return None
    if not folder:
        raise ConfigError(f"--keys: missing; give {which} written by `liquid-fed keys` (or "
                          "--insecure on 127.0.0.1 only)")
    keys = kind(Path(folder))
    keys.check()
    return keys


def verify_server_cert(cert_path: str | Path, ca_path: str | Path, host: str) -> None:
    """Check that ``cert_path`` was signed by ``ca_path``, is valid now and names ``host``.

    Raises:
        ValueError: the signature, the validity period or the name does not match.
    """
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    ca = x509.load_pem_x509_certificate(Path(ca_path).read_bytes())
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, TypeError, ValueError) as exc:
        raise ValueError(f"{cert_path} was not signed by the CA in {ca_path}") from exc
    now = datetime.datetime.now(datetime.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ValueError(f"{cert_path} is not valid now ({cert.not_valid_before_utc} .. "
                         f"{cert.not_valid_after_utc})")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = [str(v) for v in san.get_values_for_type(x509.IPAddress)]
    names += san.get_values_for_type(x509.DNSName)
    if host not in names:
        raise ValueError(f"{cert_path} does not name {host} (subjectAltName: {names})")
