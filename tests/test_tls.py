"""TLS listeners: certificate checks, ALPN h2 / http/1.1, clients without ALPN."""
from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os

import pytest
import pytest_twisted
import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor, ssl
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

from omni_httpd.worker.http.context import ListenerContext
from omni_httpd.worker.http.connection import ServerFactory
from omni_httpd.common.response import Response
from omni_httpd.common.settings import Settings
from omni_httpd.worker.http.tls import TLSConfigError, server_context_factory, tls_factory
from tests.test_http2 import MB, H2SocketClient, HeldDispatch, _poll, curl, echo_dispatch, within


def make_certificate(directory, name: str = "server"):
    """A self-signed certificate for localhost / 127.0.0.1; returns (cert path, key path)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = os.path.join(str(directory), name + ".crt")
    key_path = os.path.join(str(directory), name + ".key")
    with open(cert_path, "wb") as handle:
        handle.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return cert_path, key_path


# -- certificate loading ---------------------------------------------------------------------

def test_missing_files_are_a_clear_error(tmp_path):
    cert, key = make_certificate(tmp_path)
    with pytest.raises(TLSConfigError, match="cannot read TLS certificate .*nope.crt"):
        server_context_factory(str(tmp_path / "nope.crt"), key)
    with pytest.raises(TLSConfigError, match="cannot read TLS key .*nope.key"):
        server_context_factory(cert, str(tmp_path / "nope.key"))
    with pytest.raises(TLSConfigError, match="--tls-cert and --tls-key"):
        server_context_factory(None, None)


def test_invalid_files_are_a_clear_error(tmp_path):
    cert, key = make_certificate(tmp_path)
    other_cert, other_key = make_certificate(tmp_path, "other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a pem file\n")
    with pytest.raises(TLSConfigError, match="no PEM certificate"):
        server_context_factory(str(garbage), key)
    with pytest.raises(TLSConfigError, match="not a usable PEM private key"):
        server_context_factory(cert, str(garbage))
    with pytest.raises(TLSConfigError, match="does not match certificate"):
        server_context_factory(cert, other_key)
    encrypted = tmp_path / "encrypted.key"
    key_object = serialization.load_pem_private_key(open(key, "rb").read(), None)
    encrypted.write_bytes(key_object.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(TLSConfigError, match="encrypted"):
        server_context_factory(cert, str(encrypted))
    for error in _raised(lambda: server_context_factory(cert, other_key)):
        assert "\n" not in str(error)


def _raised(call):
    try:
        call()
    except TLSConfigError as exc:
        return [exc]
    return []


def test_certificate_chain_file_is_accepted(tmp_path):
    cert, key = make_certificate(tmp_path)
    other_cert, _other_key = make_certificate(tmp_path, "intermediate")
    chain = tmp_path / "chain.crt"
    chain.write_bytes(open(cert, "rb").read() + open(other_cert, "rb").read())
    options = server_context_factory(str(chain), key)
    assert len(options.extraCertChain) == 1


# -- real TLS sockets -----------------------------------------------------------------------------

@pytest.fixture
def tls_server(tmp_path):
    """Start an https ServerFactory on 127.0.0.1:0; yields start(dispatch) -> (port, factory)."""
    cert, key = make_certificate(tmp_path)
    ports = []

    def start(dispatch=echo_dispatch, **settings):
        factory = ServerFactory(ListenerContext(dispatch, Settings(access_log=False, **settings), 5, "https",
                                                clock=reactor))
        port = reactor.listenTCP(0, tls_factory(server_context_factory(cert, key), factory),
                                 interface="127.0.0.1")
        ports.append((port, factory))
        return port.getHost().port, factory

    start.cert_path = cert
    yield start
    for port, factory in ports:
        port.stopListening()
        factory.abort_all()


async def connect_h2_tls(port: int, cert_path: str, protocols=(b"h2",)) -> H2SocketClient:
    trust = ssl.Certificate.loadPEM(open(cert_path, "rb").read())
    options = ssl.optionsForClientTLS("localhost", trustRoot=trust,
                                      acceptableProtocols=list(protocols))
    client = H2SocketClient()
    endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", port, options)
    await within(connectProtocol(endpoint, client))
    return client


@pytest_twisted.ensureDeferred
async def test_alpn_h2_streams_multiplex_over_tls(tls_server):
    dispatch = HeldDispatch()
    port, _factory = tls_server(dispatch)
    client = await connect_h2_tls(port, tls_server.cert_path)
    first = client.request("GET", "/first")
    second = client.request("POST", "/second", b"payload")
    await within(_poll(lambda: len(dispatch.calls) == 2))
    assert client.transport.negotiatedProtocol == b"h2"
    request = dispatch.calls[1][0]
    assert (request.scheme, request.http_version, request.body) == ("https", "2", b"payload")
    assert dispatch.calls[1][1] is True   # HTTP/2 streams may run on a sibling
    dispatch.answer(1, Response(200, [], b"two"))
    dispatch.answer(0, Response(200, [], b"one"))
    assert bytes((await within(second)).body) == b"two"
    assert bytes((await within(first)).body) == b"one"
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_large_bodies_over_tls_h2(tls_server):
    port, _factory = tls_server(echo_dispatch)
    client = await connect_h2_tls(port, tls_server.cert_path)
    body = os.urandom(10 * MB)
    result = await within(client.request("POST", "/echo", body), 120)
    assert result.headers["x-body-sha256"] == hashlib.sha256(body).hexdigest()
    assert bytes(result.body) == body
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_curl_http2_over_tls(tls_server, tmp_path):
    port, _factory = tls_server(echo_dispatch)
    upload = tmp_path / "upload"
    upload.write_bytes(os.urandom(10 * MB))
    download = tmp_path / "download"
    out, err, code = await curl("--http2", "-k", "-o", str(download),
                                "-w", "%{http_version} %{response_code}",
                                "--data-binary", "@%s" % upload,
                                "https://127.0.0.1:%d/echo" % port)
    assert code == 0, err
    assert out == b"2 200"
    assert download.read_bytes() == upload.read_bytes()


@pytest_twisted.ensureDeferred
async def test_curl_http1_over_tls(tls_server):
    port, _factory = tls_server(echo_dispatch)
    out, err, code = await curl("--http1.1", "-k", "-i", "-w", "\n%{http_version}",
                                "https://127.0.0.1:%d/x" % port)
    assert code == 0, err
    assert out.endswith(b"\n1.1")
    assert b"x-remote: false" in out.lower()   # HTTP/1 never leaves its worker


@pytest_twisted.ensureDeferred
async def test_treq_without_alpn_gets_http1(tls_server):
    port, _factory = tls_server(echo_dispatch)
    trust = ssl.Certificate.loadPEM(open(tls_server.cert_path, "rb").read())
    agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust))
    response = await within(treq.get("https://localhost:%d/hello?a=b" % port, agent=agent,
                                     persistent=False))
    assert response.code == 200
    assert response.version == (b"HTTP", 1, 1)
    assert response.headers.getRawHeaders("x-query") == ["a=b"]
    assert await within(treq.content(response)) == b"hello"


@pytest_twisted.ensureDeferred
async def test_graceful_close_over_tls(tls_server):
    dispatch = HeldDispatch()
    port, factory = tls_server(dispatch)
    client = await connect_h2_tls(port, tls_server.cert_path)
    in_flight = client.request("GET", "/slow")
    await within(_poll(lambda: len(dispatch.calls) == 1))
    drained = factory.graceful_close()
    goaway = await within(client.goaway_received)
    assert goaway.error_code == 0
    dispatch.answer(0, Response(200, [], b"done"))
    assert bytes((await within(in_flight)).body) == b"done"
    await within(drained)
    assert factory.connections == set()
