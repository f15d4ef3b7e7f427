"""Static files (issue 13 item 4) through the real daemon, over HTTP/1.1 (treq, raw
sockets for hostile paths) and HTTP/2 (h2c and TLS, tests/h2_client.py); plus the pure
helpers of worker/static_files.py."""
from __future__ import annotations

import gzip
import os
import shutil
import socket
import subprocess
import tempfile

import pytest
import pytest_twisted
import treq

from daemon_support import Daemon, add_listener, effective_port, send_and_read, sql, wait_reloads, wait_until
from h2_client import h2_exchange
from omni_httpd.worker import static_files
from test_http2_daemon import _self_signed

HANDLER = "SELECT omni_httpd.http_response('handler ' || request.path) FROM request"
SECRET = b"TOP SECRET outside the root"
BIG = 48 * 1024 * 1024
MEDIUM = (bytes(range(256)) * 4096 * 3)[:3 * 1024 * 1024 + 123]    # streamed, yet quick for h2_client
STYLE = b"body { color: #333 }\n"
APP = b"console.log('hello, static world');\n" * 40
BROTLI = b"pretend-brotli-bytes"   # content is not decoded by anyone here
WEIRD = '<b>&"x".txt'


def _write(path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o644)


@pytest.fixture(scope="module")
def tree():
    """A root directory ``site`` and, beside it, ``outside`` holding a secret."""
    base = tempfile.mkdtemp(prefix="omni_httpd_static_")
    os.chmod(base, 0o755)      # the workers may run as another account
    site, outside, other = (os.path.join(base, name) for name in ("site", "outside", "other"))
    for directory in (site, outside, other, os.path.join(site, "sub"), os.path.join(site, "nolist"),
                      os.path.join(site, "deep"), os.path.join(site, "deep", "er")):
        os.mkdir(directory)
        os.chmod(directory, 0o755)
    _write(os.path.join(outside, "secret.txt"), SECRET)
    _write(os.path.join(site, "index.html"), b"<h1>home</h1>\n")
    _write(os.path.join(site, "style.css"), STYLE)
    _write(os.path.join(site, "app.js"), APP)
    _write(os.path.join(site, "app.js.gz"), gzip.compress(APP))
    _write(os.path.join(site, "app.js.br"), BROTLI)
    _write(os.path.join(site, "logo.png"), b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    _write(os.path.join(site, "data.bin"), bytes(range(256)) * 64)           # 16 KiB
    _write(os.path.join(site, "medium.bin"), MEDIUM)
    _write(os.path.join(site, "sub", "a.txt"), b"a text\n")
    _write(os.path.join(site, "sub", WEIRD), b"weird name\n")
    _write(os.path.join(site, "sub", ".hidden"), b"hidden\n")
    _write(os.path.join(site, "nolist", "x.txt"), b"x\n")
    _write(os.path.join(site, "deep", "er", "file.txt"), b"deep file\n")
    _write(os.path.join(other, "other.txt"), b"from the other root\n")
    with open(os.path.join(site, "big.bin"), "wb") as handle:
        handle.truncate(BIG)            # sparse: zeros, with markers at both ends
        handle.seek(0)
        handle.write(b"BEGIN")
        handle.seek(BIG - 3)
        handle.write(b"END")
    os.chmod(os.path.join(site, "big.bin"), 0o644)
    os.symlink("style.css", os.path.join(site, "inside_link.css"))
    os.symlink(os.path.join(outside, "secret.txt"), os.path.join(site, "escape_link.txt"))
    os.symlink("../outside", os.path.join(site, "escape_dir"))
    os.symlink(os.path.join(outside, "secret.txt"), os.path.join(site, "style2.css.gz"))
    _write(os.path.join(site, "style2.css"), STYLE)
    os.mkfifo(os.path.join(site, "fifo"))
    try:    # a character device (/dev/zero's numbers) inside the root: needs root
        import stat as stat_module
        os.mknod(os.path.join(site, "zero"), stat_module.S_IFCHR | 0o644, os.makedev(1, 5))
    except (PermissionError, AttributeError):
        pass
    try:
        yield site, outside, other
    finally:
        shutil.rmtree(base, ignore_errors=True)


class Site:
    def __init__(self, dsn, daemon, port, tls_port, listener_id, tls_listener_id):
        self.dsn, self.daemon, self.port, self.tls_port = dsn, daemon, port, tls_port
        self.listener_id, self.tls_listener_id = listener_id, tls_listener_id
        self.base = "http://127.0.0.1:%d" % port


@pytest.fixture(scope="module")
def site(module_dsn, tree, tmp_path_factory):
    root, _outside, other = tree
    cert, key = _self_signed(tmp_path_factory.mktemp("tls"))
    for path in (cert, key):
        os.chmod(path, 0o644)
        os.chmod(os.path.dirname(path), 0o755)
    daemon = Daemon(module_dsn, "--http-workers", "1", "--no-init", "--admin", "none",
                    "--static-root", "site=" + root, "--static-root", "other=" + other,
                    "--tls-cert", cert, "--tls-key", key)
    try:
        daemon.wait_ready()
        wait_reloads(module_dsn, 1)
        listener_id = add_listener(module_dsn, HANDLER)
        tls_listener_id = add_listener(module_dsn, HANDLER, protocol="https")
        wait_reloads(module_dsn, 2)
        sql(module_dsn, """
            INSERT INTO omni_httpd.static_files (listener_id, url_prefix, root, listing, cache_control)
            VALUES (%(l)s, '/static', 'site', true, 'public, max-age=60'),
                   (%(l)s, '/plain', 'site', false, NULL),
                   (%(l)s, '/ghost', 'nosuch', false, NULL),
                   (%(t)s, '/', 'site', false, NULL)""", dict(l=listener_id, t=tls_listener_id))
        wait_reloads(module_dsn, 1)
        yield Site(module_dsn, daemon, effective_port(module_dsn, listener_id),
                   effective_port(module_dsn, tls_listener_id), listener_id, tls_listener_id)
    finally:
        code = daemon.stop()
    assert code == 0, daemon.output[-3000:]


async def get(url, headers=None, method="GET"):
    response = await treq.request(method, url, headers=headers or {}, persistent=False)
    body = await treq.content(response)
    return response, body


def header(response, name):
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


def raw_get(port, target: bytes, extra: bytes = b"") -> bytes:
    return send_and_read(port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + extra + b"\r\n")


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


# -- the pure helpers -------------------------------------------------------------------------
@pytest.mark.parametrize("name, expected", [
    ("a.css", "text/css; charset=utf-8"), ("A.CSS", "text/css; charset=utf-8"),
    ("x.js", "text/javascript; charset=utf-8"), ("i.html", "text/html; charset=utf-8"),
    ("p.png", "image/png"), ("f.woff2", "font/woff2"), ("d.json", "application/json"),
    ("s.svg", "image/svg+xml"), ("noext", "application/octet-stream"),
    ("a.tar.gz", "application/gzip"), ("r.txt", "text/plain; charset=utf-8"),
])
def test_content_type_does_not_depend_on_the_host(name, expected):
    assert static_files.content_type(name) == expected


@pytest.mark.parametrize("header, expected", [
    ("bytes=0-9", (0, 9)), ("bytes=5-", (5, 99)), ("bytes=-10", (90, 99)), ("bytes=-1000", (0, 99)),
    ("bytes=90-1000", (90, 99)), ("bytes=100-", "unsatisfiable"), ("bytes=-0", "unsatisfiable"),
    ("bytes=0-1,5-6", None), ("bytes=9-3", None), ("bytes=a-b", None), ("items=0-1", None),
    ("bytes=", None), ("bytes=-", None), ("bytes=\u0661-", None),
])
def test_byte_range(header, expected):
    assert static_files._byte_range(header, 100) == expected


def test_accept_encoding_q_values():
    assert static_files._accepted_encodings("gzip, br;q=0.5, *;q=0") == {"gzip": 1.0, "br": 0.5, "*": 0.0}
    assert static_files._accepted_encodings("x-gzip;q=0.3, br;q=nonsense") == {"gzip": 0.3, "br": 0.0}
    assert static_files._accepted_encodings(None) == {}


def test_hostile_segments_are_refused_before_any_file_system_call():
    for rest in ("/%2e%2e/x", "/%2E%2e", "/a%2fb", "/a%2Fb", "/a\\b", "/a%5cb", "/a%00b", "/%2e/x"):
        with pytest.raises(static_files._Refused):
            static_files._decode(rest)
    assert static_files._decode("/a/%41b/") == ([b"a", b"Ab"], True)


# -- HTTP/1.1 through the daemon ----------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_a_file_with_its_headers(site, tree):
    response, body = await get(site.base + "/static/style.css")
    assert response.code == 200 and body == STYLE
    assert header(response, "content-type") == "text/css; charset=utf-8"
    assert response.length == len(STYLE)
    assert header(response, "cache-control") == "public, max-age=60"
    assert header(response, "accept-ranges") == "bytes"
    etag = header(response, "etag")
    assert etag.startswith('"') and etag.endswith('"') and not etag.startswith("W/")
    st = os.stat(os.path.join(tree[0], "style.css"))
    assert header(response, "last-modified") == static_files.format_http_date(int(st.st_mtime))
    assert header(response, "vary") is None      # no precompressed sibling
    response, body = await get(site.base + "/static/logo.png")
    assert header(response, "content-type") == "image/png" and body.startswith(b"\x89PNG")
    response, body = await get(site.base + "/static/inside_link.css")   # a symlink inside the root
    assert response.code == 200 and body == STYLE


@pytest_twisted.ensureDeferred
async def test_head_sends_the_length_and_no_body(site):
    answer = send_and_read(site.port, b"HEAD /static/big.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"content-length: %d" % BIG in head
    assert rest == b""
    response, body = await get(site.base + "/static/style.css", method="HEAD")
    assert response.code == 200 and body == b"" and header(response, "etag")


@pytest_twisted.ensureDeferred
async def test_conditional_requests(site):
    response, _ = await get(site.base + "/static/style.css")
    etag, modified = header(response, "etag"), header(response, "last-modified")
    response, body = await get(site.base + "/static/style.css", {"If-None-Match": etag})
    assert response.code == 304 and body == b""
    assert header(response, "etag") == etag and header(response, "cache-control") == "public, max-age=60"
    response, _ = await get(site.base + "/static/style.css", {"If-None-Match": '"other", W/' + etag})
    assert response.code == 304      # weak comparison for If-None-Match
    response, body = await get(site.base + "/static/style.css", {"If-None-Match": '"other"'})
    assert response.code == 200 and body == STYLE
    response, _ = await get(site.base + "/static/style.css", {"If-Modified-Since": modified})
    assert response.code == 304
    response, _ = await get(site.base + "/static/style.css", {"If-Modified-Since": "Sat, 01 Jan 2000 00:00:00 GMT"})
    assert response.code == 200
    # If-None-Match wins over If-Modified-Since (RFC 9110 13.1.3).
    response, _ = await get(site.base + "/static/style.css",
                            {"If-None-Match": '"other"', "If-Modified-Since": modified})
    assert response.code == 200
    response, _ = await get(site.base + "/static/style.css", {"If-Match": '"other"'})
    assert response.code == 412
    response, _ = await get(site.base + "/static/style.css", {"If-Match": etag})
    assert response.code == 200
    response, _ = await get(site.base + "/static/style.css",
                            {"If-Unmodified-Since": "Sat, 01 Jan 2000 00:00:00 GMT"})
    assert response.code == 412


@pytest_twisted.ensureDeferred
async def test_ranges(site):
    data = bytes(range(256)) * 64
    response, body = await get(site.base + "/static/data.bin", {"Range": "bytes=10-19"})
    assert response.code == 206 and body == data[10:20]
    assert header(response, "content-range") == "bytes 10-19/%d" % len(data)
    assert response.length == 10
    response, body = await get(site.base + "/static/data.bin", {"Range": "bytes=-5"})
    assert response.code == 206 and body == data[-5:]
    response, body = await get(site.base + "/static/data.bin", {"Range": "bytes=%d-" % len(data)})
    assert response.code == 416 and header(response, "content-range") == "bytes */%d" % len(data)
    response, body = await get(site.base + "/static/data.bin", {"Range": "bytes=0-1,4-5"})
    assert response.code == 200 and body == data          # several ranges: the whole file
    response, _ = await get(site.base + "/static/data.bin")
    etag = header(response, "etag")
    response, body = await get(site.base + "/static/data.bin", {"Range": "bytes=0-3", "If-Range": etag})
    assert response.code == 206 and body == data[:4]
    response, body = await get(site.base + "/static/data.bin", {"Range": "bytes=0-3", "If-Range": '"stale"'})
    assert response.code == 200 and body == data
    response, body = await get(site.base + "/static/data.bin",
                               {"Range": "bytes=0-3", "If-Range": header(response, "last-modified")})
    assert response.code == 206 and body == data[:4]
    # A range of a streamed (large) file.
    response, body = await get(site.base + "/static/big.bin", {"Range": "bytes=%d-" % (BIG - 10)})
    assert response.code == 206 and body == b"\0" * 7 + b"END"


def raw_answer(port, target: bytes, **headers):
    """(status, {header: value}, body) of a GET on its own connection (treq would decode
    gzip bodies itself)."""
    extra = b"".join(b"%s: %s\r\n" % (k.replace("_", "-").encode(), v.encode()) for k, v in headers.items())
    answer = raw_get(port, target, extra)
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), fields, body


def test_precompressed_siblings_by_accept_encoding(site):
    status, fields, body = raw_answer(site.port, b"/static/app.js")
    assert body == APP and fields["vary"] == "accept-encoding" and "content-encoding" not in fields
    status, fields, body = raw_answer(site.port, b"/static/app.js", accept_encoding="gzip")
    assert fields["content-encoding"] == "gzip" and gzip.decompress(body) == APP
    assert fields["content-type"] == "text/javascript; charset=utf-8"
    assert fields["content-length"] == str(len(body))
    status, fields, body = raw_answer(site.port, b"/static/app.js", accept_encoding="gzip, br")
    assert fields["content-encoding"] == "br" and body == BROTLI       # br wins a tie
    status, fields, body = raw_answer(site.port, b"/static/app.js", accept_encoding="br;q=0.4, gzip;q=0.8")
    assert fields["content-encoding"] == "gzip"
    status, fields, body = raw_answer(site.port, b"/static/app.js", accept_encoding="br;q=0, gzip;q=0")
    assert "content-encoding" not in fields and body == APP
    status, fields, body = raw_answer(site.port, b"/static/app.js", accept_encoding="*")
    assert fields["content-encoding"] == "br"
    gz_etag = raw_answer(site.port, b"/static/app.js", accept_encoding="gzip")[1]["etag"]
    plain_etag = raw_answer(site.port, b"/static/app.js")[1]["etag"]
    assert gz_etag != plain_etag            # each representation has its own strong ETag
    status, fields, body = raw_answer(site.port, b"/static/app.js", accept_encoding="gzip",
                                      if_none_match=gz_etag)
    assert status == 304 and fields["vary"] == "accept-encoding"
    # A sibling that is a symlink out of the root is not used.
    status, fields, body = raw_answer(site.port, b"/static/style2.css", accept_encoding="gzip")
    assert body == STYLE and "content-encoding" not in fields and SECRET not in body


@pytest_twisted.ensureDeferred
async def test_directories_index_and_listing(site):
    answer = raw_get(site.port, b"/static")
    assert status_of(answer) == 301 and b"\r\nlocation: /static/\r\n" in answer
    answer = raw_get(site.port, b"/static/sub?x=1")
    assert status_of(answer) == 301 and b"\r\nlocation: /static/sub/?x=1\r\n" in answer
    response, body = await get(site.base + "/static/")
    assert response.code == 200 and body == b"<h1>home</h1>\n"
    assert header(response, "content-type") == "text/html; charset=utf-8"
    response, body = await get(site.base + "/static/sub/")
    text = body.decode()
    assert response.code == 200 and header(response, "content-type") == "text/html; charset=utf-8"
    assert '<a href="a.txt">a.txt</a>' in text
    assert "&lt;b&gt;&amp;&quot;x&quot;.txt" in text and WEIRD not in text     # escaped
    assert 'href="%3Cb%3E%26%22x%22.txt"' in text
    assert ".hidden" not in text and '<a href="../">' in text
    response, body = await get(site.base + "/static/sub/" + "%3Cb%3E%26%22x%22.txt")
    assert body == b"weird name\n"
    response, body = await get(site.base + "/static/deep/er/file.txt")
    assert body == b"deep file\n"
    # Listing off: a directory without index is a 404; the index is served as before.
    response, body = await get(site.base + "/plain/sub/")
    assert response.code == 404
    response, body = await get(site.base + "/plain/")
    assert response.code == 200 and body == b"<h1>home</h1>\n"
    # The root's listing does not show the symlinks that leave it.
    sql(site.dsn, "UPDATE omni_httpd.static_files SET index_file = NULL WHERE url_prefix = '/static'")
    wait_reloads(site.dsn, 1)
    try:
        response, body = await get(site.base + "/static/")
        text = body.decode()
        assert "style.css" in text and "escape_link" not in text and "escape_dir" not in text
        assert "fifo" not in text and '<a href="../">' not in text
    finally:
        sql(site.dsn, "UPDATE omni_httpd.static_files SET index_file = DEFAULT WHERE url_prefix = '/static'")
        wait_reloads(site.dsn, 1)


@pytest_twisted.ensureDeferred
async def test_misses_methods_and_the_handler(site, tree):
    response, body = await get(site.base + "/static/nope.css")
    assert response.code == 404                         # a miss under a prefix: not the handler
    response, body = await get(site.base + "/static/style.css/")
    assert response.code == 404                         # a file is not a directory
    response, body = await get(site.base + "/staticfoo")
    assert body == b"handler /staticfoo"                # whole segments only
    response, body = await get(site.base + "/elsewhere")
    assert body == b"handler /elsewhere"
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        response, body = await get(site.base + "/static/style.css", method=method)
        assert response.code == 405 and header(response, "allow") == "GET, HEAD"
    response, body = await get(site.base + "/static/fifo")     # not a regular file: at once
    assert response.code == 404
    if os.path.exists(os.path.join(tree[0], "zero")):
        response, body = await get(site.base + "/static/zero")     # a device: never read
        assert response.code == 404 and body == b"Not found"


def test_an_unknown_root_is_logged_and_not_served(site):
    site.daemon.wait_for(r"names root 'nosuch', which no --static-root gives; not served")
    answer = raw_get(site.port, b"/ghost/x")
    assert answer.endswith(b"handler /ghost/x")


@pytest.mark.parametrize("target", [
    b"/static/%2e%2e/outside/secret.txt", b"/static/%2E%2E/outside/secret.txt",
    b"/static/..%2foutside%2fsecret.txt", b"/static/sub/%2e%2e%2f%2e%2e%2foutside/secret.txt",
    b"/static/sub%2F..%2F..%2Foutside%2Fsecret.txt", b"/static/%5c..%5coutside%5csecret.txt",
    b"/static/..\\outside\\secret.txt", b"/static/style.css%00.png", b"/static/%00",
    b"/static/%2e/style.css",
])
def test_traversal_is_refused(site, target):
    answer = raw_get(site.port, target)
    assert status_of(answer) == 400, answer
    assert SECRET not in answer


@pytest.mark.parametrize("target", [
    b"/static/escape_link.txt", b"/static/escape_dir/secret.txt", b"/static/escape_dir/",
    b"/static/../outside/secret.txt",
])
def test_symlinks_and_dot_segments_never_leave_the_root(site, target):
    answer = raw_get(site.port, target)
    assert SECRET not in answer
    assert status_of(answer) in (404, 200), answer
    if status_of(answer) == 200:     # "/static/../x" is "/x" (RFC 3986): the handler's
        assert answer.endswith(b"handler /outside/secret.txt")


@pytest_twisted.ensureDeferred
async def test_a_large_file_is_streamed_to_a_slow_reader(site):
    """A 48 MiB file to a client that does not read: the worker does not load it."""
    pid = site.daemon.worker_pids()[0]

    def rss_kib():
        with open("/proc/%d/status" % pid) as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])

    before = rss_kib()
    sock = socket.create_connection(("127.0.0.1", site.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.sendall(b"GET /static/big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
    first = sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200")
    # While we do not read, the worker keeps answering other clients (reactor not blocked)
    # and its memory stays far below the file's size.
    response, body = await get(site.base + "/static/style.css")
    assert body == STYLE
    assert rss_kib() - before < 16 * 1024
    received = len(first) - first.index(b"\r\n\r\n") - 4
    head = first[:first.index(b"\r\n\r\n")]
    assert b"content-length: %d" % BIG in head
    tail = b""
    sock.settimeout(30)
    while received < BIG:
        chunk = sock.recv(1024 * 1024)
        assert chunk
        received += len(chunk)
        tail = (tail + chunk)[-3:]
    assert received == BIG and tail == b"END"
    # The connection is still usable for the next request.
    sock.sendall(b"GET /static/style.css HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    rest = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    assert rest.startswith(b"HTTP/1.1 200") and rest.endswith(STYLE)
    sock.close()


@pytest_twisted.ensureDeferred
async def test_a_large_file_whole_over_treq(site):
    response, body = await get(site.base + "/static/big.bin")
    assert response.code == 200 and len(body) == BIG
    assert body[:5] == b"BEGIN" and body[-3:] == b"END"


def test_live_reconfiguration(site, tree):
    _root, _outside, other = tree
    assert raw_get(site.port, b"/more/other.txt").endswith(b"handler /more/other.txt")
    sql(site.dsn, "INSERT INTO omni_httpd.static_files (listener_id, url_prefix, root) VALUES (%s, '/more/', 'other')",
        (site.listener_id,))
    wait_reloads(site.dsn, 1)          # counted in configuration_reloads like any change
    answer = raw_get(site.port, b"/more/other.txt")
    assert status_of(answer) == 200 and answer.endswith(b"from the other root\n")
    sql(site.dsn, "DELETE FROM omni_httpd.static_files WHERE url_prefix = '/more/'")
    wait_reloads(site.dsn, 1)
    assert raw_get(site.port, b"/more/other.txt").endswith(b"handler /more/other.txt")


@pytest.mark.parametrize("column, value", [
    ("url_prefix", "static"), ("url_prefix", "/a/../b"), ("url_prefix", "/a//b"), ("url_prefix", "/a?b"),
    ("url_prefix", "/a\\b"), ("url_prefix", "/a%2fb"), ("root", "/etc"), ("root", "../x"),
    ("index_file", "../x.html"), ("index_file", "a/b.html"), ("cache_control", "a\r\nSet-Cookie: x"),
])
def test_the_table_refuses_paths_and_header_injection(site, column, value):
    import psycopg2
    values = dict(url_prefix="/x", root="site", index_file="index.html", cache_control=None)
    values[column] = value
    with pytest.raises(psycopg2.errors.CheckViolation):
        sql(site.dsn, "INSERT INTO omni_httpd.static_files (listener_id, url_prefix, root, index_file, cache_control)"
                      " VALUES (%s, %s, %s, %s, %s)",
            (site.listener_id, values["url_prefix"], values["root"], values["index_file"], values["cache_control"]))


# -- HTTP/2 ----------------------------------------------------------------------------------------
def _h(result, name):
    for key, value in result.headers:
        if key == name:
            return value
    return None


def test_http2_cleartext(site):
    etag = None
    results = h2_exchange(site.port, [("GET", "/static/style.css", b""), ("HEAD", "/static/big.bin", b""),
                                      ("GET", "/static/medium.bin", b""), ("GET", "/static/nope", b""),
                                      ("POST", "/static/style.css", b"x"), ("GET", "/static/sub/", b""),
                                      ("GET", "/static/%2e%2e/outside/secret.txt", b""),
                                      ("GET", "/elsewhere", b"")])
    css, head, big, missing, post, listing, hostile, handler = results
    assert css.status == 200 and css.body == STYLE and _h(css, "content-type") == "text/css; charset=utf-8"
    etag = _h(css, "etag")
    assert head.status == 200 and head.body == b"" and _h(head, "content-length") == str(BIG)
    assert big.status == 200 and big.body == MEDIUM
    assert missing.status == 404 and post.status == 405 and _h(post, "allow") == "GET, HEAD"
    assert listing.status == 200 and b"a.txt" in listing.body
    assert hostile.status == 400 and SECRET not in hostile.body
    assert handler.body == b"handler /elsewhere"
    [cached] = h2_exchange(site.port, [("GET", "/static/style.css", b"")], headers=[("if-none-match", etag)])
    assert cached.status == 304 and cached.body == b""
    [part, gz] = h2_exchange(site.port, [("GET", "/static/big.bin", b""), ("GET", "/static/app.js", b"")],
                             headers=[("range", "bytes=0-4"), ("accept-encoding", "gzip")])
    assert part.status == 206 and part.body == b"BEGIN" and _h(part, "content-range") == "bytes 0-4/%d" % BIG
    assert gz.status == 206 and _h(gz, "content-encoding") == "gzip"


def test_http2_over_tls(site):
    results = h2_exchange(site.tls_port, [("GET", "/style.css", b""), ("GET", "/medium.bin", b""),
                                          ("GET", "/", b"")], tls=True)
    css, big, index = results
    assert css.status == 200 and css.body == STYLE
    assert big.status == 200 and big.body == MEDIUM
    assert index.status == 200 and index.body == b"<h1>home</h1>\n"


def test_http2_a_large_file_with_curl(site):
    """48 MiB over h2c (curl: h2_client's body concatenation is too slow for it)."""
    out = subprocess.run(["curl", "-s", "--http2-prior-knowledge", "-o", "-", "--max-time", "60",
                          "-w", "\n%{http_version} %{http_code} %{size_download}",
                          site.base + "/static/big.bin"], capture_output=True, check=True).stdout
    body, _, summary = out.rpartition(b"\n")
    assert summary == b"2 200 %d" % BIG
    assert body[:5] == b"BEGIN" and body.endswith(b"END")


def test_http1_over_tls_streams_a_large_file(site):
    import ssl
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", site.tls_port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = bytearray()
            while True:
                chunk = sock.recv(1024 * 1024)
                if not chunk:
                    break
                data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and len(body) == BIG and body.endswith(b"END")


def test_worker_keeps_serving_after_clients_abandon_streams(site):
    """Clients that go away mid-file: their files are closed, nothing leaks."""
    pid = site.daemon.worker_pids()[0]
    fds_before = len(os.listdir("/proc/%d/fd" % pid))
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", site.port)) as sock:
            sock.sendall(b"GET /static/big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    wait_until(lambda: len(os.listdir("/proc/%d/fd" % pid)) <= fds_before, what="files closed")
    assert raw_get(site.port, b"/static/style.css").endswith(STYLE)


# -- the protocols' file bodies, in memory ---------------------------------------------------------
def test_http2_file_body_follows_flow_control(tmp_path):
    """A file body goes out chunk by chunk as the client opens its window; a stream reset
    mid-file closes the file."""
    from twisted.internet import defer as _defer
    from omni_httpd.common.response import Response
    from test_http2 import MemoryClient, make_factory

    path = tmp_path / "f.bin"
    path.write_bytes(MEDIUM)
    opened = []

    def dispatch(request, allow_remote):
        body = static_files.FileBody(os.open(path, os.O_RDONLY), 0, len(MEDIUM))
        opened.append(body)
        return _defer.succeed(Response(200, [], file=body))

    client = MemoryClient(make_factory(dispatch))
    stream_id = client.request("GET", "/whole")
    result = client.results[stream_id]
    assert result.ended and bytes(result.body) == MEDIUM and opened[0].fd == -1
    client.auto_ack = False             # the client stops opening its window
    stream_id = client.request("GET", "/reset")
    result = client.results[stream_id]
    assert not result.ended and 0 < len(result.body) <= 65535    # one window at most
    assert opened[1].fd >= 0 and opened[1].remaining > 0         # one chunk read ahead, no more
    assert opened[1].remaining >= len(MEDIUM) - 2 * static_files.CHUNK
    client.h2.reset_stream(stream_id)
    client.pump()
    assert opened[1].fd == -1


def test_http1_pipelined_answers_wait_for_a_streamed_file(site):
    answer = send_and_read(site.port, b"GET /static/medium.bin HTTP/1.1\r\nHost: x\r\n\r\n"
                                      b"GET /elsewhere HTTP/1.1\r\nHost: x\r\n\r\n"
                                      b"GET /static/style.css HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    first, _, rest = answer.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200") and rest[:len(MEDIUM)] == MEDIUM
    rest = rest[len(MEDIUM):]
    assert rest.startswith(b"HTTP/1.1 200") and b"handler /elsewhere" in rest
    assert rest.endswith(STYLE) and rest.index(b"handler /elsewhere") < rest.rindex(b"HTTP/1.1 200")


def test_open_refuses_what_was_swapped_in_after_the_check(tmp_path):
    checked, swapped, fifo = tmp_path / "checked", tmp_path / "swapped", tmp_path / "fifo"
    checked.write_bytes(b"checked")
    swapped.write_bytes(b"swapped")
    os.mkfifo(fifo)
    expected = os.stat(checked)
    fd = static_files._open_checked(os.fsencode(checked), expected)
    assert fd is not None
    os.close(fd)
    os.replace(swapped, checked)           # another inode at the checked path
    assert static_files._open_checked(os.fsencode(checked), expected) is None
    # A FIFO put in its place neither blocks the worker nor is read.
    os.replace(fifo, checked)
    assert static_files._open_checked(os.fsencode(checked), expected) is None


def test_a_directory_redirect_never_names_another_host(tmp_path):
    from omni_httpd.common.request import Request
    (tmp_path / "evil.example").mkdir()
    files = static_files.StaticFiles({"r": str(tmp_path)})
    files.configure([dict(listener_id=1, url_prefix="/", root="r", index_file=None, listing=False,
                          cache_control=None)])
    request = Request("GET", "//evil.example", None, [], b"", 1)
    response = files.serve(files.mount_for(1, request.path), request)
    assert response.status == 301 and dict(response.headers)["location"] == "/evil.example/"


def test_http1_file_body_follows_transport_back_pressure(tmp_path):
    """The file goes out while the transport takes it; a full write buffer pauses it, its
    draining resumes it; the next pipelined answer follows the file; a lost connection
    closes the file."""
    from twisted.internet.testing import StringTransport
    from omni_httpd.common.response import Response
    from test_http1 import Conn, FakeDispatch

    class Buffering(StringTransport):
        """Pauses its producer once more than 128 KiB wait, as Twisted's TCP transport does."""

        def write(self, data):
            super().write(data)
            if len(self.io.getvalue()) > 128 * 1024 and self.producer is not None:
                self.producer.pauseProducing()

    path = tmp_path / "f.bin"
    path.write_bytes(MEDIUM)
    opened = []

    def answer(request):
        if request.path == "/small":
            return Response(200, [], b"small")
        body = static_files.FileBody(os.open(path, os.O_RDONLY), 0, len(MEDIUM))
        opened.append(body)
        return Response(200, [], file=body)

    conn = Conn(FakeDispatch(answer), transport=Buffering())
    conn.send(b"GET /file HTTP/1.1\r\nHost: x\r\n\r\nGET /small HTTP/1.1\r\nHost: x\r\n\r\n")
    received = bytearray()
    rounds = 0
    while b"small" not in received[-10:]:
        chunk = conn.transport.value()
        assert chunk, "the stream stalled"
        assert len(chunk) < 128 * 1024 + 2 * static_files.CHUNK + 1024     # bounded per round
        received += chunk
        conn.transport.clear()
        conn.proto.resumeProducing()
        rounds += 1
    assert rounds > len(MEDIUM) // (256 * 1024)
    head, _, rest = bytes(received).partition(b"\r\n\r\n")
    assert b"content-length: %d" % len(MEDIUM) in head and rest[:len(MEDIUM)] == MEDIUM
    assert rest[len(MEDIUM):].startswith(b"HTTP/1.1 200") and rest.endswith(b"small")
    assert opened[0].fd == -1
    # Lost mid-file: the file is closed.
    conn = Conn(FakeDispatch(answer), transport=Buffering())
    conn.send(b"GET /file HTTP/1.1\r\nHost: x\r\n\r\n")
    assert opened[1].fd >= 0 and opened[1].remaining > 0
    conn.proto.connectionLost(None)
    assert opened[1].fd == -1


@pytest.mark.parametrize("statement", [
    "INSERT INTO omni_httpd.static_files (listener_id, url_prefix, root) SELECT id, '/b', 'r' FROM omni_httpd.listeners",
    "UPDATE omni_httpd.static_files SET listing = true",
    "DELETE FROM omni_httpd.static_files",
    "TRUNCATE omni_httpd.static_files",
], ids=["insert", "update", "delete", "truncate"])
def test_static_files_changes_request_a_reload(db, connect, statement):
    from sql_support import execute, notifications, one
    listener = connect()
    execute(listener, "LISTEN omni_httpd_reload")
    execute(db, "INSERT INTO omni_httpd.listeners DEFAULT VALUES")
    execute(db, "INSERT INTO omni_httpd.static_files (listener_id, url_prefix, root) "
                "SELECT id, '/a', 'r' FROM omni_httpd.listeners")
    execute(db, "SELECT pg_notify('omni_httpd_reload', 'ready')")
    notifications(listener, "ready")
    execute(db, statement)
    execute(db, "SELECT pg_notify('omni_httpd_reload', 'marker')")
    assert notifications(listener, "marker") == ["", "marker"]
    # Deleting the listener takes its mounts with it.
    execute(db, "DELETE FROM omni_httpd.listeners")
    assert one(db, "SELECT count(*) FROM omni_httpd.static_files") == 0


def test_a_root_that_disappears_answers_404_and_comes_back(tmp_path):
    from omni_httpd.common.request import Request
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.txt").write_bytes(b"a")
    files = static_files.StaticFiles({"r": str(root)})
    files.configure([dict(listener_id=1, url_prefix="/s", root="r", index_file=None, listing=False,
                          cache_control=None)])
    request = Request("GET", "/s/a.txt", None, [], b"", 1)
    assert files.serve(files.mount_for(1, request.path), request).body == b"a"
    moved = tmp_path / "moved"
    root.rename(moved)
    files._real_roots.clear()           # skip the one-second reuse of the root's realpath
    assert files.serve(files.mount_for(1, request.path), request).status == 404
    assert files.serve(files.mount_for(1, request.path), request).status == 404
    moved.rename(root)
    assert files.serve(files.mount_for(1, request.path), request).body == b"a"


@pytest.mark.parametrize("prefix", ["/", "/static", "/static/", "/a/b/c", "/.well-known", "/caf\u00e9", "/a-b_c~d"])
def test_the_table_takes_ordinary_prefixes(db, prefix):
    from sql_support import execute, one
    execute(db, "INSERT INTO omni_httpd.listeners DEFAULT VALUES")
    execute(db, "INSERT INTO omni_httpd.static_files (listener_id, url_prefix, root) "
                "SELECT id, %s, 'site' FROM omni_httpd.listeners", (prefix,))
    assert one(db, "SELECT index_file FROM omni_httpd.static_files") == "index.html"
