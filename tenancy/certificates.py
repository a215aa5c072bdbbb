"""TLS and SuperNode-authentication material for a Flower Deployment Engine federation.

One layout, written with restrictive permissions (directories 0700, private keys 0600)::

    OUT/ca/ca.crt, ca.key                       the CA (its key never leaves the operator)
    OUT/superlink/ca.crt, server.crt, server.key for ``flower-superlink --ssl-*``
    OUT/nodes/<tenant>/ca.crt, node.key, node.pub  one bundle to ship to each tenant site

The SuperLink certificate carries a SAN for every host name and IP address the nodes
use to reach it; node keys are ECDSA P-384 in OpenSSH format, as Flower expects for
``--auth-supernode-private-key`` and ``flwr supernode register``. Every ``hazmat`` import
of this feature lives here.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Names go into paths and X.509 common names: keep them boring.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
CA_DAYS = 3650
SERVER_DAYS = 825  # the longest leaf lifetime that common TLS clients still accept


class CredentialsError(ValueError):
    """The request cannot be fulfilled; the message says why, for the operator."""


@dataclass(frozen=True)
class NodeCredentials:
    tenant: str
    directory: Path

    @property
    def private_key(self) -> Path:
        return self.directory / "node.key"

    @property
    def public_key(self) -> Path:
        return self.directory / "node.pub"

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"


@dataclass(frozen=True)
class CredentialLayout:
    """Where every file of one federation's credentials lives."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def superlink_dir(self) -> Path:
        return self.root / "superlink"

    @property
    def server_cert(self) -> Path:
        return self.superlink_dir / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.superlink_dir / "server.key"

    @property
    def superlink_ca_cert(self) -> Path:
        return self.superlink_dir / "ca.crt"

    def node(self, tenant: str) -> NodeCredentials:
        return NodeCredentials(tenant, self.root / "nodes" / check_name(tenant))

    def nodes(self) -> list[NodeCredentials]:
        base = self.root / "nodes"
        if not base.is_dir():
            return []
        return [self.node(p.name) for p in sorted(base.iterdir()) if (p / "node.pub").is_file()]


@dataclass
class CreatedCredentials:
    layout: CredentialLayout
    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise CredentialsError(
            f"{name!r} is not a usable tenant node name (letters, digits, '.', '_', '-')."
        )
    return name


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` so the file never exists with wider permissions than ``mode``."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    tmp.chmod(mode)
    tmp.replace(path)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtext federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not re.match(r"^[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?$", host):
                raise CredentialsError(
                    f"{host!r} is neither a host name nor an IP address."
                ) from None
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def load_certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def certificate_hosts(path: Path) -> list[str]:
    """The DNS names and IP addresses in a certificate's SAN extension."""
    ext = load_certificate(path).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    dns = ext.value.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in ext.value.get_values_for_type(x509.IPAddress)]
    return [*dns, *ips]


def _create_ca(layout: CredentialLayout, now: dt.datetime) -> None:
    key = _new_key()
    name = _name("fedtext federation CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _private_dir(layout.ca_key.parent)
    _write(layout.ca_key, _pem_key(key), 0o600)
    _write(layout.ca_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _create_server_cert(layout: CredentialLayout, hosts: list[str], now: dt.datetime) -> None:
    ca_key = serialization.load_pem_private_key(layout.ca_key.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise CredentialsError(f"{layout.ca_key} is not an EC private key.")
    ca_cert = load_certificate(layout.ca_cert)
    key = _new_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    _private_dir(layout.superlink_dir)
    _write(layout.server_key, _pem_key(key), 0o600)
    _write(layout.server_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(layout.superlink_ca_cert, layout.ca_cert.read_bytes(), 0o644)


def _create_node_key(layout: CredentialLayout, node: NodeCredentials) -> None:
    key = _new_key()
    _private_dir(node.directory)
    _write(
        node.private_key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(node.public_key, public + f" fedtext-{node.tenant}\n".encode(), 0o644)
    _write(node.ca_cert, layout.ca_cert.read_bytes(), 0o644)


def create_credentials(
    root: Path,
    *,
    hosts: list[str],
    tenants: list[str],
    renew_server_cert: bool = False,
) -> CreatedCredentials:
    """Create what is missing under ``root``: CA, SuperLink certificate, node key pairs.

    Existing material is kept (a node key that changed would have to be registered
    again); ``renew_server_cert`` reissues the SuperLink certificate, e.g. for new hosts.
    """
    if not hosts:
        raise CredentialsError("Give at least one host name or IP address of the SuperLink.")
    for tenant in tenants:
        check_name(tenant)
    if len(set(tenants)) != len(tenants):
        raise CredentialsError("Tenant node names must be distinct.")
    _san(hosts)  # validate before anything is written
    layout = CredentialLayout(root)
    out = CreatedCredentials(layout)
    _private_dir(root)
    now = dt.datetime.now(dt.UTC)
    if layout.ca_cert.exists() != layout.ca_key.exists():
        raise CredentialsError(
            f"{layout.ca_cert.parent} holds only half of a CA; fix or remove it."
        )
    if layout.ca_cert.exists():
        out.kept.append(layout.ca_cert)
    else:
        _create_ca(layout, now)
        out.created += [layout.ca_cert, layout.ca_key]
    if layout.server_cert.exists() and not renew_server_cert:
        missing = sorted(set(hosts) - set(certificate_hosts(layout.server_cert)))
        if missing:
            raise CredentialsError(
                f"{layout.server_cert} does not name {', '.join(missing)}; "
                "reissue it with --renew-server-cert."
            )
        out.kept.append(layout.server_cert)
    else:
        _create_server_cert(layout, hosts, now)
        out.created += [layout.server_cert, layout.server_key]
    if tenants:
        _private_dir(root / "nodes")
    for tenant in tenants:
        node = layout.node(tenant)
        if node.private_key.exists():
            out.kept.append(node.private_key)
            continue
        _create_node_key(layout, node)
        out.created += [node.private_key, node.public_key]
    return out


def check_node_private_key(path: Path) -> None:
    """Raise ``CredentialsError`` unless ``path`` is an OpenSSH ECDSA private key."""
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise CredentialsError(f"Cannot read the node key {path}: {exc.strerror}.") from None
    except (ValueError, TypeError):
        raise CredentialsError(f"{path} is not an unencrypted OpenSSH private key.") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CredentialsError(f"{path} is not an ECDSA key; Flower needs ECDSA (P-384).")
