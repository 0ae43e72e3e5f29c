"""The broker's certificate (deadend.tlscert): generation, loading and the context, without a handshake.

Handshakes with real clients over loopback are in tests/loopback/test_tls_clients.py.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from deadend.tlscert import (
    LIFETIME,
    MAX_AGE_DAYS,
    MAX_FILE,
    Certificate,
    TlsCertError,
    generate_certificate,
    load_certificate,
    lowest_tls_version,
    server_context,
)

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def cert_of(material: Certificate) -> x509.Certificate:
    return x509.load_pem_x509_certificate(material.cert_pem)


def names(material: Certificate) -> list[object]:
    san = cert_of(material).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [n.value for n in san]


def attribute(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str:
    (value,) = cert.subject.get_attributes_for_oid(oid)
    return str(value.value)


@pytest.mark.parametrize("key_type", ["ecdsa", "rsa"])
def test_generated_certificate_reads_like_a_real_servers(key_type: str) -> None:
    material = generate_certificate("mail.example.com", key_type, now=NOW)
    cert = cert_of(material)
    assert attribute(cert, NameOID.COMMON_NAME) == "mail.example.com"
    assert names(material) == ["mail.example.com"]
    assert attribute(cert, NameOID.ORGANIZATION_NAME).startswith("Example ")
    for oid in (NameOID.COUNTRY_NAME, NameOID.STATE_OR_PROVINCE_NAME, NameOID.LOCALITY_NAME):
        assert attribute(cert, oid)
    assert cert.issuer == cert.subject
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    assert NOW - timedelta(days=MAX_AGE_DAYS) <= start <= NOW - timedelta(days=1)
    assert end - start == LIFETIME and start.microsecond == 0
    assert cert.serial_number > 2**64
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert (
        usage.digital_signature and usage.key_encipherment == (key_type == "rsa") and not usage.key_cert_sign
    )
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    key = serialization.load_pem_private_key(material.key_pem, password=None)
    if key_type == "rsa":
        assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    else:
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    cert.verify_directly_issued_by(cert)  # self-signed with its own key
    assert "mail.example.com" in material.description and "key_pem" not in repr(material)
    assert b"PRIVATE KEY" not in repr(material).encode()


def test_each_generated_certificate_is_new() -> None:
    a, b = generate_certificate("example.com"), generate_certificate("example.com")
    assert cert_of(a).serial_number != cert_of(b).serial_number and a.key_pem != b.key_pem


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("example.com", ["example.com", "www.example.com"]),  # the bare domain comes with its www
        ("www.example.com", ["www.example.com", "example.com"]),
        ("mx1.mail.example.co.uk", ["mx1.mail.example.co.uk"]),
        ("*.example.net", ["*.example.net"]),
        ("localhost", ["localhost"]),
        ("203.0.113.9", [ipaddress.ip_address("203.0.113.9")]),
        ("2001:db8::1", [ipaddress.ip_address("2001:db8::1")]),
        ("a" * 63 + ".example", ["a" * 63 + ".example", "www." + "a" * 63 + ".example"]),
    ],
)
def test_alt_names(name: str, expected: list[object]) -> None:
    assert names(generate_certificate(name)) == expected


@pytest.mark.parametrize(
    "name",
    ["", "exa mple.com", "bücher.example", "-bad.example", "a..b", "a" * 64 + ".example", "*", "x.*.example"],
)
def test_bad_names_are_one_line_errors(name: str) -> None:
    with pytest.raises(TlsCertError) as e:
        generate_certificate(name)
    assert "\n" not in str(e.value) and "TLS name" in str(e.value)


def test_a_name_too_long_for_the_common_name_and_the_organisation() -> None:
    name = "a" * 63 + ".b" * 40 + ".example"
    material = generate_certificate(name, organization="O" * 64)
    cert = cert_of(material)
    assert names(material) == [name] and not cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert attribute(cert, NameOID.ORGANIZATION_NAME) == "O" * 64
    derived = attribute(cert_of(generate_certificate("a" * 63 + ".example")), NameOID.ORGANIZATION_NAME)
    assert len(derived) <= 64 and derived.startswith("Aaaa")
    with pytest.raises(TlsCertError, match="organisation"):
        generate_certificate("example.com", organization="O" * 65)


def test_bad_key_type() -> None:
    with pytest.raises(TlsCertError, match="key type 'dsa'"):
        generate_certificate("example.com", "dsa")


# --- the operator's files -------------------------------------------------------------------------


def write_pair(folder: Path, material: Certificate) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    cert.write_bytes(material.cert_pem)
    key.write_bytes(material.key_pem)
    key.chmod(0o600)
    return cert, key


def test_load_the_operators_pair(tmp_path: Path) -> None:
    material = generate_certificate("www.example.org", "rsa")
    cert, key = write_pair(tmp_path, material)
    loaded = load_certificate(cert, key)
    assert loaded.cert_pem == material.cert_pem
    loaded_key = serialization.load_pem_private_key(loaded.key_pem, None)
    original_key = serialization.load_pem_private_key(material.key_pem, None)
    assert isinstance(loaded_key, rsa.RSAPrivateKey) and isinstance(original_key, rsa.RSAPrivateKey)
    assert loaded_key.public_key().public_numbers() == original_key.public_key().public_numbers()
    assert str(cert) in loaded.description and "RSA 2048" in loaded.description
    server_context(loaded)


def test_load_a_chain_and_a_traditional_key(tmp_path: Path) -> None:
    leaf, other = generate_certificate("a.example"), generate_certificate("b.example")
    key = serialization.load_pem_private_key(leaf.key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    sec1 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    (tmp_path / "chain.pem").write_bytes(leaf.cert_pem + other.cert_pem)
    (tmp_path / "key.pem").write_bytes(sec1)
    loaded = load_certificate(tmp_path / "chain.pem", tmp_path / "key.pem")
    assert loaded.cert_pem == leaf.cert_pem + other.cert_pem
    server_context(loaded)


def one_line_error(cert: Path, key: Path) -> str:
    with pytest.raises(TlsCertError) as e:
        load_certificate(cert, key)
    text = str(e.value)
    assert "\n" not in text and len(text) < 300
    return text


def test_mismatched_pair_is_one_line(tmp_path: Path) -> None:
    cert, _ = write_pair(tmp_path, generate_certificate("a.example"))
    other = tmp_path / "other.key"
    other.write_bytes(generate_certificate("a.example").key_pem)
    assert one_line_error(cert, other) == f"TLS certificate {cert} and key {other} do not match"


def test_unusable_files_are_one_line_errors(tmp_path: Path) -> None:
    material = generate_certificate("a.example")
    cert, key = write_pair(tmp_path, material)
    missing = tmp_path / "missing.pem"
    assert one_line_error(missing, key).startswith(f"cannot read TLS certificate {missing}: ")
    assert one_line_error(cert, tmp_path).startswith(f"cannot read TLS key {tmp_path}: ")
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"\x00\xffnot a certificate\n")
    assert "holds no PEM certificate" in one_line_error(garbage, key)
    assert "holds no PEM private key" in one_line_error(cert, garbage)
    assert "holds no PEM private key" in one_line_error(cert, cert)  # the two swapped
    big = tmp_path / "big.pem"
    big.write_bytes(b"x" * (MAX_FILE + 1))
    assert "larger than" in one_line_error(big, key)
    if os.geteuid() != 0:  # root reads a mode-000 file all the same
        key.chmod(0)
        assert "Permission denied" in one_line_error(cert, key)


def test_encrypted_key_is_refused_without_asking_for_a_passphrase(tmp_path: Path) -> None:
    material = generate_certificate("a.example")
    cert, key = write_pair(tmp_path, material)
    secret = serialization.load_pem_private_key(material.key_pem, None)
    key.write_bytes(
        secret.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"hunter2"),
        )
    )
    assert "is encrypted" in one_line_error(cert, key)


def test_a_key_type_clients_cannot_use_is_refused(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ed.example")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + LIFETIME)
        .sign(key, None)
    )
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "k.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    assert "neither RSA nor ECDSA" in one_line_error(tmp_path / "c.pem", tmp_path / "k.pem")


# --- the context ----------------------------------------------------------------------------------


def open_fds() -> set[str]:
    return {
        os.readlink(f"/proc/self/fd/{fd}")
        for fd in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{fd}")
    }


def test_context_settings_and_no_key_left_anywhere() -> None:
    before = open_fds()
    context = server_context(generate_certificate("example.com"))
    assert open_fds() == before  # the memory file is closed again
    assert not any("deadend-tls" in target for target in open_fds())
    assert context.minimum_version == lowest_tls_version()
    assert context.options & ssl.OP_NO_RENEGOTIATION
    assert context.verify_mode == ssl.CERT_NONE  # a server that asks no client for a certificate
    if ssl.HAS_TLSv1:
        assert lowest_tls_version() == ssl.TLSVersion.TLSv1


def test_a_pair_openssl_refuses_is_a_one_line_error() -> None:
    # A Certificate built by hand, bypassing load_certificate's checks: OpenSSL's refusal is one line too.
    a, b = generate_certificate("a.example"), generate_certificate("b.example")
    with pytest.raises(TlsCertError, match=r"^OpenSSL refused the TLS certificate or key: ") as e:
        server_context(Certificate(a.cert_pem, b.key_pem, "mismatched"))
    assert "\n" not in str(e.value)
