"""TLS certificates for the coordinator's SuperLink: a private CA and one server certificate.

    create (or reuse) the federation's CA       ca.crt, ca.key (0600)
    issue the SuperLink's server certificate    server.crt, server.key (0600)
        subject alternative names: the names and addresses hospitals dial, plus
        localhost and 127.0.0.1 (the SuperLink's own SuperExec connects over loopback)

`flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.crt --ssl-keyfile server.key`
serves every API over TLS with them; each hospital's SuperNode verifies the SuperLink with
`--root-certificates ca.crt`, and the coordinator's `flwr` CLI with `root-certificates` in
its connection. Only ca.crt leaves the coordinator; the keys never do.

Keys are EC P-384 (a NIST curve, as Flower's own node keys). Written with `cryptography`
only, so nothing depends on an openssl binary at a hospital or coordinator.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated

import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
# The SuperLink starts its SuperExec against 127.0.0.1:<port> (0.0.0.0 is rewritten to
# loopback) and verifies the same certificate, so loopback names are always included.
LOOPBACK_SANS = ("localhost", "127.0.0.1")
CLOCK_SKEW = dt.timedelta(minutes=5)


class CertError(ValueError):
    """Bad certificate request or unusable existing files; the message names which."""


@dataclass(frozen=True)
class CertPaths:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    ca_created: bool


def parse_san(value: str) -> x509.GeneralName:
    """'10.0.0.5' or '::1' -> IPAddress; 'coordinator.example.org' -> DNSName."""
    value = value.strip()
    if not value:
        raise CertError("empty subject alternative name")
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    try:
        value.encode("ascii")
    except UnicodeEncodeError:
        raise CertError(f"SAN {value!r}: use the IDNA (xn--) form of the host name") from None
    if any(c in value for c in " /:@") or value.startswith(".") or value.endswith("."):
        raise CertError(f"SAN {value!r}: not a host name or IP address (no scheme or port)")
    return x509.DNSName(value.lower())


def _write_private(path: Path, data: bytes) -> None:
    """Create `path` with mode 0600 from the start (never briefly world-readable)."""
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def create_ca(common_name: str, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA that may sign end-entity certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsynth federation")])
    now = dt.datetime.now(dt.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, hashes.SHA384())
    )
    return cert, key


def issue_server_cert(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                      sans: list[str], days: int) -> tuple[x509.Certificate,
                                                           ec.EllipticCurvePrivateKey]:
    """A TLS server certificate for the SuperLink, valid for `sans` (+ loopback names)."""
    names: list[x509.GeneralName] = []
    for value in [*sans, *LOOPBACK_SANS]:
        general = parse_san(value)
        if general not in names:
            names.append(general)
    first_dns = next((n.value for n in names if isinstance(n, x509.DNSName)), "superlink")
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, first_dns)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return cert, key


def _load_ca(cert_path: Path, key_path: Path) -> tuple[x509.Certificate,
                                                        ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise CertError(f"{cert_path.parent}: existing CA cannot be read ({e}); "
                        "move ca.crt/ca.key away to create a new CA") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or \
            key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise CertError(f"{key_path}: not the private key of {cert_path}")
    if cert.not_valid_after_utc <= dt.datetime.now(dt.timezone.utc):
        raise CertError(f"{cert_path}: the CA expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
                        "create a new CA and give every hospital the new ca.crt")
    return cert, key


def create_certificates(out_dir: Path, sans: list[str], days: int = 365,
                        ca_days: int = 3650, ca_name: str = "fedsynth federation CA",
                        force: bool = False) -> CertPaths:
    """Write the CA (unless one is already in `out_dir`) and a SuperLink server certificate.

    An existing CA in `out_dir` is reused, so renewing the server certificate does not make
    hospitals replace their ca.crt. An existing server certificate is only replaced with
    `force`. Keys are created with mode 0600, the folder 0700.
    """
    if not sans:
        raise CertError("give at least one --san: the host name or IP hospitals connect to")
    for value in sans:
        parse_san(value)
    if days < 1 or ca_days < 1:
        raise CertError("--days and --ca-days must be >= 1")
    out_dir = Path(out_dir)
    paths = CertPaths(out_dir / CA_CERT, out_dir / CA_KEY, out_dir / SERVER_CERT,
                      out_dir / SERVER_KEY, ca_created=False)
    if paths.server_cert.exists() and not force:
        raise CertError(f"{paths.server_cert} exists; pass --force to issue a new server "
                        "certificate (the CA is kept)")
    out_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(out_dir, 0o700)
    has_cert, has_key = paths.ca_cert.exists(), paths.ca_key.exists()
    if has_cert != has_key:
        raise CertError(f"{out_dir}: only one of ca.crt / ca.key is present; "
                        "restore the other or remove both to create a new CA")
    if has_cert:
        ca_cert, ca_key = _load_ca(paths.ca_cert, paths.ca_key)
    else:
        ca_cert, ca_key = create_ca(ca_name, ca_days)
        _write_private(paths.ca_key, _key_pem(ca_key))
        paths.ca_cert.write_bytes(_cert_pem(ca_cert))
        paths = replace(paths, ca_created=True)
    cert, key = issue_server_cert(ca_cert, ca_key, sans, days)
    _write_private(paths.server_key, _key_pem(key))
    paths.server_cert.write_bytes(_cert_pem(cert))
    return paths


def describe(cert: x509.Certificate) -> str:
    """One line: subject, SANs, validity and SHA-256 fingerprint (to read out to hospitals)."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = ", ".join(str(n.value) for n in sans)
    except x509.ExtensionNotFound:
        names = "-"
    fp = cert.fingerprint(hashes.SHA256()).hex(":").upper()
    return (f"{cert.subject.rfc4514_string()}  SANs [{names}]  valid "
            f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}  "
            f"SHA-256 {fp}")


def certs_command(
    out_dir: Annotated[Path, typer.Argument(help="Folder for ca.crt, ca.key, server.crt, server.key.")],
    san: Annotated[list[str], typer.Option(
        "--san", help="Host name or IP address hospitals use to reach the SuperLink "
                      "(repeatable); localhost and 127.0.0.1 are always added.")],
    days: Annotated[int, typer.Option(help="Validity of the server certificate, days.")] = 365,
    ca_days: Annotated[int, typer.Option(help="Validity of a new CA, days.")] = 3650,
    force: Annotated[bool, typer.Option(
        help="Replace an existing server certificate (an existing CA is always kept).")] = False,
) -> None:
    """Coordinator: create the federation's CA and the SuperLink's TLS server certificate.

    Reuses a CA already in OUT_DIR, so a renewed server certificate needs no change at the
    hospitals. Give hospitals ca.crt (and its fingerprint, over another channel); keep the
    .key files on the coordinator (mode 0600).
    """
    try:
        paths = create_certificates(out_dir, san, days=days, ca_days=ca_days, force=force)
    except CertError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    typer.echo(f"CA ({'new' if paths.ca_created else 'existing'}): {paths.ca_cert}\n  {describe(ca)}")
    typer.echo(f"server certificate: {paths.server_cert}\n  {describe(server)}")
    typer.echo(f"private keys (mode 0600, stay here): {paths.ca_key}, {paths.server_key}")
    typer.echo("start the SuperLink with:\n"
               f"  flower-superlink --ssl-ca-certfile {paths.ca_cert} "
               f"--ssl-certfile {paths.server_cert} --ssl-keyfile {paths.server_key} "
               "--enable-supernode-auth --disable-runtime-dependency-installation ...")
    typer.echo(f"give every hospital {paths.ca_cert} (for --root-certificates) and read "
               "them the CA fingerprint above to compare.")
