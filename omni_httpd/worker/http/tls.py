"""TLS for ``https`` listeners: certificate loading and ALPN (h2, http/1.1).

`server_context_factory` reads the files once, checks them, and returns a Twisted
context factory for `TLSMemoryBIOFactory` (or ``listenSSL``). Problems with the files
raise `TLSConfigError` with a one-line message an operator can act on.
"""
from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization
import OpenSSL
from OpenSSL import crypto
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.protocols.tls import TLSMemoryBIOFactory

# pyOpenSSL 24.3 takes cryptography's certificate and key objects directly (and deprecates
# its own X509/PKey there); older versions need its own.
_TAKES_CRYPTOGRAPHY_OBJECTS = tuple(int(part) for part in OpenSSL.__version__.split(".")[:2]) >= (24, 3)

#: ALPN protocols offered, in order of preference.
ALPN_PROTOCOLS = [b"h2", b"http/1.1"]


class TLSConfigError(Exception):
    """The certificate or key cannot be used; the message is one line."""


def server_context_factory(cert_path: str, key_path: str) -> CertificateOptions:
    """A server context factory for the PEM certificate chain and key at these paths.

    The certificate file may hold the full chain (leaf first). TLS 1.2 is the minimum.
    """
    if not cert_path or not key_path:
        raise TLSConfigError("an https listener needs --tls-cert and --tls-key")
    cert_data = _read(cert_path, "certificate")
    key_data = _read(key_path, "key")
    try:
        chain = x509.load_pem_x509_certificates(cert_data)
    except ValueError:
        chain = []
    if not chain:
        raise TLSConfigError("TLS certificate %s: no PEM certificate found" % cert_path)
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        raise TLSConfigError("TLS key %s is encrypted; give an unencrypted key" % key_path)
    except Exception as exc:  # cryptography raises ValueError, UnsupportedAlgorithm, ...
        raise TLSConfigError("TLS key %s: not a usable PEM private key (%s)"
                             % (key_path, _first_line(exc)))
    leaf = chain[0]
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if leaf.public_key().public_bytes(encoding, public) != key.public_key().public_bytes(encoding, public):
        raise TLSConfigError("TLS key %s does not match certificate %s" % (key_path, cert_path))
    if _TAKES_CRYPTOGRAPHY_OBJECTS:
        private_key, certificate, extra = key, leaf, list(chain[1:])
    else:
        private_key = crypto.PKey.from_cryptography_key(key)
        certificate = crypto.X509.from_cryptography(leaf)
        extra = [crypto.X509.from_cryptography(cert) for cert in chain[1:]]
    return CertificateOptions(
        privateKey=private_key,
        certificate=certificate,
        extraCertChain=extra,
        acceptableProtocols=ALPN_PROTOCOLS,
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )


def tls_factory(context_factory: CertificateOptions, wrapped_factory) -> TLSMemoryBIOFactory:
    """Wrap a listener's `ServerFactory` so it serves TLS."""
    return TLSMemoryBIOFactory(context_factory, False, wrapped_factory)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise TLSConfigError("cannot read TLS %s %s: %s" % (what, path, exc.strerror or exc))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
