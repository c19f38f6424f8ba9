"""`fedsynth certs`: the CA and the SuperLink's server certificate, checked field by field and
by a real TLS handshake through Python's OpenSSL (what uvicorn serves and httpx verifies with).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from shared.certs import CertError, create_certificates, parse_san
from shared.cli import app


def load(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return create_certificates(tmp_path_factory.mktemp("pki") / "certs",
                               ["coordinator.example.org", "10.20.30.40"], days=30)


def test_ca_is_a_ca_and_signs_only_certificates(certs):
    ca = load(certs.ca_cert)
    assert ca.issuer == ca.subject
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    ca.verify_directly_issued_by(ca)          # self-signed, signature valid


def test_server_certificate_names_usage_and_validity(certs):
    ca, server = load(certs.ca_cert), load(certs.server_cert)
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["coordinator.example.org", "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.20.30.40"),
                                                        ipaddress.ip_address("127.0.0.1")]
    basic = server.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and not basic.value.ca
    usage = server.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    now = dt.datetime.now(dt.timezone.utc)
    assert server.not_valid_before_utc <= now < server.not_valid_after_utc
    assert dt.timedelta(days=29) < server.not_valid_after_utc - now <= dt.timedelta(days=30)
    assert ca.not_valid_after_utc - now > dt.timedelta(days=3000)
    key = serialization.load_pem_private_key(certs.server_key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert key.public_key() == server.public_key()


def test_private_keys_are_owner_only(certs):
    assert mode(certs.ca_key) == 0o600 and mode(certs.server_key) == 0o600
    assert mode(certs.ca_cert.parent) == 0o700
    assert mode(certs.ca_cert) & 0o004 and mode(certs.server_cert) & 0o004   # public parts


def _handshake(certs, server_hostname: str, cafile) -> None:
    """A TLS handshake over a socket pair; raises ssl.SSLError if the client refuses."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.server_cert, certs.server_key)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)     # verifies chain and host name
    client_ctx.load_verify_locations(cafile)
    a, b = socket.socketpair()
    a.settimeout(10), b.settimeout(10)

    def serve():
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                s.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname=server_hostname) as c:
            c.sendall(b"x")
    finally:
        b.close()
        thread.join(10)


@pytest.mark.parametrize("name", ["coordinator.example.org", "10.20.30.40", "localhost",
                                  "127.0.0.1"])
def test_tls_handshake_succeeds_for_every_san(certs, name):
    _handshake(certs, name, certs.ca_cert)


def test_tls_handshake_fails_for_other_names_and_other_cas(certs, tmp_path):
    with pytest.raises(ssl.SSLCertVerificationError, match="match|mismatch"):
        _handshake(certs, "evil.example.org", certs.ca_cert)
    other = create_certificates(tmp_path / "other", ["coordinator.example.org"])
    with pytest.raises(ssl.SSLCertVerificationError, match="issuer"):
        _handshake(certs, "coordinator.example.org", other.ca_cert)


def test_renewal_keeps_the_ca_and_needs_force(tmp_path):
    first = create_certificates(tmp_path, ["a.example.org"])
    ca_bytes, old_server = first.ca_cert.read_bytes(), load(first.server_cert)
    with pytest.raises(CertError, match="--force"):
        create_certificates(tmp_path, ["a.example.org"])
    again = create_certificates(tmp_path, ["b.example.org"], force=True)
    assert not again.ca_created and again.ca_cert.read_bytes() == ca_bytes
    new_server = load(again.server_cert)
    assert new_server.serial_number != old_server.serial_number
    new_server.verify_directly_issued_by(load(again.ca_cert))
    assert mode(again.server_key) == 0o600


@pytest.mark.parametrize("bad", ["https://host", "host:9092", "", "user@host", "exämple.org"])
def test_bad_sans_are_refused(bad):
    with pytest.raises(CertError):
        parse_san(bad)


def test_half_a_ca_is_refused(tmp_path):
    paths = create_certificates(tmp_path, ["a.example.org"])
    paths.ca_key.unlink()
    with pytest.raises(CertError, match="only one of ca.crt / ca.key"):
        create_certificates(tmp_path, ["a.example.org"], force=True)


def test_cli_writes_files_and_prints_the_superlink_flags(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["certs", str(tmp_path / "c"), "--san", "10.0.0.5"])
    assert result.exit_code == 0, result.output
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth"):
        assert flag in result.output
    assert "10.0.0.5" in result.output and "SHA-256" in result.output
    again = runner.invoke(app, ["certs", str(tmp_path / "c"), "--san", "10.0.0.5"])
    assert again.exit_code == 2 and "--force" in again.output
