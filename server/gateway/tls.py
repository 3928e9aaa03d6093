"""TLS for the device gateway: server credentials from PEM files, and a throwaway test CA.

``server_credentials(cert, key)`` is what ``start_server(..., credentials=...)`` takes (what a
device trusts is :func:`fedcoreml.ios_bridge.channel.channel_credentials`). A missing,
unreadable or non-PEM file is refused with a :class:`TLSConfigError` that names it.

:func:`generate_test_ca` writes a throwaway certificate authority and a server certificate
signed by it (for ``localhost`` and ``127.0.0.1`` by default), for tests and local deployments;
real deployments use certificates from their own CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcoreml.ios_bridge.atomic_file import SECRET_FILE_MODE, write_bytes_atomic
from fedcoreml.ios_bridge.channel import TLSConfigError, read_pem

__all__ = [
    "CertificatePaths",
    "TLSConfigError",
    "generate_test_ca",
    "server_credentials",
]

_CERT_MARKER = b"-----BEGIN CERTIFICATE-----"
_KEY_MARKER = b"PRIVATE KEY-----"
_ENCRYPTED_KEY_MARKER = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"


@dataclass(frozen=True)
class CertificatePaths:
    """The files :func:`generate_test_ca` wrote (PEM; the keys readable by their owner only)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _check_key_matches(cert_pem: bytes, key_pem: bytes, cert_path: Path, key_path: Path) -> None:
    """Refuse a key that cannot be parsed or that does not belong to the certificate."""
    try:
        cert = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError as exc:
        raise TLSConfigError(
            f"TLS certificate {cert_path}: not a valid certificate ({exc})"
        ) from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise TLSConfigError(
            f"TLS private key {key_path}: not a usable unencrypted private key ({exc})"
        ) from None
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*raw) != cert.public_key().public_bytes(*raw):
        raise TLSConfigError(
            f"TLS private key {key_path} does not belong to the certificate {cert_path}"
        )


def server_credentials(
    cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]
) -> grpc.ServerCredentials:
    """TLS credentials for the gateway: its certificate chain and private key (PEM files)."""
    cert = read_pem(cert_path, "TLS certificate", _CERT_MARKER)
    key = read_pem(key_path, "TLS private key", _KEY_MARKER)
    if _ENCRYPTED_KEY_MARKER in key:
        raise TLSConfigError(f"TLS private key {key_path}: encrypted keys are not supported")
    _check_key_matches(cert, key, Path(cert_path), Path(key_path))
    return grpc.ssl_server_credentials([(key, cert)])


# -- a throwaway CA -----------------------------------------------------------------------------


def generate_test_ca(
    directory: str | os.PathLike[str],
    hostnames: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = 365,
) -> CertificatePaths:
    """Write ``ca.pem``/``ca-key.pem`` and ``server.pem``/``server-key.pem`` into ``directory``.

    The server certificate is signed by the CA and valid for ``hostnames`` (IP addresses become
    IP subject alternative names, the others DNS names). Keys are ECDSA P-256.
    """

    if not hostnames:
        raise ValueError("generate_test_ca needs at least one hostname")
    folder = Path(directory)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    server_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("fedcoreml test CA")
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_cert = (
        _builder(_name(hostnames[0]), ca_name, server_key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_alt_names(hostnames)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = CertificatePaths(
        folder / "ca.pem", folder / "ca-key.pem", folder / "server.pem", folder / "server-key.pem"
    )
    write_bytes_atomic(paths.ca_cert, _cert_pem(ca_cert))
    write_bytes_atomic(paths.ca_key, _key_pem(ca_key), mode=SECRET_FILE_MODE)
    write_bytes_atomic(paths.server_cert, _cert_pem(server_cert))
    write_bytes_atomic(paths.server_key, _key_pem(server_key), mode=SECRET_FILE_MODE)
    return paths


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))  # tolerate a little clock skew
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _key_usage(signs_certificates: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not signs_certificates,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _alt_names(hostnames: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
