"""The broker's TLS certificate, and the server-side `ssl.SSLContext` that presents it.

The operator gives a certificate and key (`load_certificate`), or the broker makes a self-signed one at
start-up (`generate_certificate`) that reads like a real server's: the name as CN and in subjectAltName,
organisation and place fields, a validity that began a random number of days ago and lasts a year, a
random serial, an ECDSA P-256 key (RSA 2048 on request). A fresh one each start: nothing to store, and
nothing that fingerprints this honeypot across restarts.

Either way the material is held in memory as PEM (`Certificate`) and `server_context` hands it to OpenSSL
through an anonymous memory file (memfd): Python's ssl module loads keys only from a path, and the
generated key is never written to any filesystem. Every failure is a `TlsCertError` whose message is one
line naming the file and what is wrong with it.
"""

from __future__ import annotations

import ipaddress
import os
import random
import re
import ssl
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KEY_TYPES: Final = ("ecdsa", "rsa")  # ECDSA P-256, RSA 2048
MAX_FILE: Final = 1 << 20  # a certificate chain or key file larger than this is not one
LIFETIME: Final = timedelta(days=365)  # a commercial certificate's year
MAX_AGE_DAYS: Final = 180  # it began up to this long ago, so half a year or more is left at start-up

# Where plausible organisations of a scanned server sit: (country, state or province, locality).
_PLACES: Final = (
    ("US", "California", "San Francisco"),
    ("US", "Virginia", "Ashburn"),
    ("US", "New York", "New York"),
    ("US", "Texas", "Austin"),
    ("DE", "Hessen", "Frankfurt am Main"),
    ("NL", "Noord-Holland", "Amsterdam"),
    ("GB", "England", "London"),
)
_LEGAL_FORMS: Final = {"US": "Inc.", "DE": "GmbH", "NL": "B.V.", "GB": "Ltd"}
_MAX_ATTRIBUTE: Final = 64  # RFC 5280's upper bound for a CN or an O
_LABEL: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


class TlsCertError(ValueError):
    """The certificate or key cannot be used; the message is one line for the operator."""


@dataclass(frozen=True, slots=True)
class Certificate:
    """A certificate (with any chain after it) and its unencrypted private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    description: str  # one line for the start-up log: the names, the key, the expiry, where it came from


def load_certificate(cert_path: str | Path, key_path: str | Path) -> Certificate:
    """The operator's certificate chain and key, read now (before the broker drops its privileges)."""
    cert_data, key_data = _read(cert_path, "certificate"), _read(key_path, "key")
    try:
        chain = x509.load_pem_x509_certificates(cert_data)
    except ValueError:
        raise TlsCertError(f"TLS certificate {cert_path} holds no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        raise TlsCertError(f"TLS key {key_path} is encrypted; give deadend an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TlsCertError(f"TLS key {key_path} holds no PEM private key deadend can use") from None
    if _spki(chain[0].public_key()) != _spki(key.public_key()):
        raise TlsCertError(f"TLS certificate {cert_path} and key {key_path} do not match")
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        # What OpenSSL serves to every client: DSA and the Edwards curves leave most of them out.
        raise TlsCertError(f"TLS key {key_path} is neither RSA nor ECDSA")
    cert_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    return Certificate(cert_pem, _key_pem(key), _describe(chain[0], key, f"from {cert_path}"))


def _read(path: str | Path, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError as e:
        raise TlsCertError(f"cannot read TLS {what} {path}: {e.strerror or e}") from None
    if len(data) > MAX_FILE:
        raise TlsCertError(f"TLS {what} {path} is larger than {MAX_FILE} bytes")
    return data


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _key_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def generate_certificate(
    name: str,
    key_type: str = "ecdsa",
    *,
    organization: str | None = None,
    now: datetime | None = None,
) -> Certificate:
    """A self-signed certificate for `name` (a DNS name, possibly `*.`-wildcarded, or an IP address)."""
    if key_type not in KEY_TYPES:
        raise TlsCertError(f"TLS key type {key_type!r} is not one of {', '.join(KEY_TYPES)}")
    alt_names = _alt_names(name)
    rnd = random.SystemRandom()
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if key_type == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    if organization is not None and not 0 < len(organization) <= _MAX_ATTRIBUTE:
        raise TlsCertError(f"TLS organisation must be 1 to {_MAX_ATTRIBUTE} characters")
    country, state, locality = rnd.choice(_PLACES)
    attributes = [
        x509.NameAttribute(NameOID.COUNTRY_NAME, country),
        x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, state),
        x509.NameAttribute(NameOID.LOCALITY_NAME, locality),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization or _organization(name, country)),
    ]
    if len(name) <= _MAX_ATTRIBUTE:  # a longer name lives in subjectAltName only, as public CAs do it
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, name))
    subject = x509.Name(attributes)
    # Issued at a plausible moment some days ago, to the second, not at the broker's start.
    start = (now or datetime.now(UTC)) - timedelta(seconds=rnd.randrange(86400, MAX_AGE_DAYS * 86400))
    start = start.replace(microsecond=0)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(rsa_key=key_type == "rsa"), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    return Certificate(pem, _key_pem(key), _describe(cert, key, "self-signed, generated"))


def _alt_names(name: str) -> list[x509.GeneralName]:
    try:
        return [x509.IPAddress(ipaddress.ip_address(name))]
    except ValueError:
        pass
    labels = name.split(".")
    wildcard = labels[0] == "*" and len(labels) > 2
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels[wildcard:]):
        raise TlsCertError(f"TLS name {name!r} is neither a DNS name (in ASCII) nor an IP address")
    # As the certificates of most sites have it: the bare domain and its www together.
    if len(labels) == 2:
        return [x509.DNSName(name), x509.DNSName("www." + name)]
    if len(labels) == 3 and labels[0].lower() == "www":
        return [x509.DNSName(name), x509.DNSName(name[4:])]
    return [x509.DNSName(name)]


def _organization(name: str, country: str) -> str:
    """ "Example Inc." for mail.example.com: the owner a visitor would guess from the name."""
    labels = [label for label in name.split(".") if label != "*"]
    form = _LEGAL_FORMS[country]
    if len(labels) < 2 or labels[-1].isdigit() or ":" in name:
        return f"Network Services {form}"
    return f"{labels[-2].replace('-', ' ').title()[: _MAX_ATTRIBUTE - len(form) - 1]} {form}"


def _key_usage(rsa_key: bool) -> x509.KeyUsage:
    # An RSA key may also encipher the premaster secret (TLS 1.0-1.2 RSA key exchange); ECDSA only signs.
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=rsa_key,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _describe(cert: x509.Certificate, key: object, origin: str) -> str:
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        shown = ", ".join(str(n.value) for n in names)
    except x509.ExtensionNotFound:
        shown = cert.subject.rfc4514_string()
    kind = f"RSA {key.key_size}" if isinstance(key, rsa.RSAPrivateKey) else "ECDSA"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        kind = f"ECDSA {key.curve.name}"
    expiry = cert.not_valid_after_utc.strftime("%Y-%m-%d")
    return f"{shown} ({kind}, valid until {expiry}, {origin})"


def server_context(cert: Certificate, alpn: Sequence[str] = ("http/1.1",)) -> ssl.SSLContext:
    """A server-side context presenting `cert`. `alpn` lists the protocols it selects when a client offers
    one of them (first match in this order); a client that offers none of them still connects."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # A honeypot wants to hear what scanners say, and scanners still offer TLS 1.0 and 1.1: allow the
    # oldest version this OpenSSL was built with (never SSL 3.0), and security level 0, without which
    # OpenSSL 3 refuses the SHA-1 signatures those versions need. Nothing confidential crosses it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "ssl.TLSVersion.TLSv1 is deprecated"
        context.minimum_version = lowest_tls_version()
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    # Client-initiated renegotiation only costs the broker CPU; no client we serve needs it.
    context.options |= ssl.OP_NO_RENEGOTIATION
    if alpn:
        context.set_alpn_protocols(list(alpn))
    _load_chain(context, cert)
    return context


def lowest_tls_version() -> ssl.TLSVersion:
    """The oldest TLS version the local OpenSSL can speak, from 1.0 up."""
    for version, built in (
        (ssl.TLSVersion.TLSv1, ssl.HAS_TLSv1),
        (ssl.TLSVersion.TLSv1_1, ssl.HAS_TLSv1_1),
    ):
        if built:
            return version
    return ssl.TLSVersion.TLSv1_2


def _load_chain(context: ssl.SSLContext, cert: Certificate) -> None:
    try:
        fd = os.memfd_create("deadend-tls", os.MFD_CLOEXEC)
    except OSError as e:
        raise TlsCertError(f"cannot hold the TLS key in memory (memfd_create: {e.strerror or e})") from None
    try:
        view = memoryview(cert.cert_pem + cert.key_pem)
        while view:
            view = view[os.write(fd, view) :]
        # The path under /proc opens the memory file afresh, from its start. The file is on no filesystem
        # and is gone when closed, a moment later; the key then lives only in this process's memory.
        context.load_cert_chain(f"/proc/self/fd/{fd}", password=_no_password)
    except (OSError, ssl.SSLError) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or type(e).__name__
        raise TlsCertError(f"OpenSSL refused the TLS certificate or key: {reason}") from None
    finally:
        os.close(fd)


def _no_password() -> str:
    # Without a callback OpenSSL would ask for a passphrase on the terminal; never wait for one.
    raise TlsCertError("the TLS key is encrypted; give deadend an unencrypted key")
