"""One request over HTTP/1.1 or h2c (prior knowledge), for the response checks."""
from __future__ import annotations

import http.client
import socket
from typing import List, Optional, Tuple

Response = Tuple[int, Optional[str], bytes]


def http1(port: int, method: str, path: str, body: Optional[bytes] = None,
          content_type: Optional[str] = None, timeout: float = 5.0, host: str = "127.0.0.1") -> Response:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        headers = {"Content-Type": content_type} if content_type else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, resp.getheader("Content-Type"), data
    finally:
        conn.close()


def h2c(port: int, method: str, path: str, body: Optional[bytes] = None,
        content_type: Optional[str] = None, timeout: float = 5.0, host: str = "127.0.0.1") -> Response:
    """HTTP/2 over cleartext with prior knowledge (what h2load does for http:// URLs)."""
    import h2.config
    import h2.connection
    import h2.events

    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        headers: List[Tuple[str, str]] = [(":method", method), (":path", path), (":scheme", "http"),
                                          (":authority", "%s:%d" % (host, port))]
        if content_type:
            headers.append(("content-type", content_type))
        if body:
            headers.append(("content-length", str(len(body))))
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, headers, end_stream=not body)
        if body:
            conn.send_data(stream, body, end_stream=True)
        sock.sendall(conn.data_to_send())
        status, ctype, chunks = None, None, []
        while True:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed before the response ended")
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream:
                    fields = dict(event.headers)
                    status = int(fields[":status"])
                    ctype = fields.get("content-type")
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == stream:
                    chunks.append(event.data)
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                    if status is None:
                        raise ConnectionError("stream ended without response headers")
                    return status, ctype, b"".join(chunks)
                elif isinstance(event, h2.events.StreamReset) and event.stream_id == stream:
                    raise ConnectionError("stream reset by the server (error code %s)" % event.error_code)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    raise ConnectionError("connection terminated by the server (GOAWAY %s)" % event.error_code)
            pending = conn.data_to_send()
            if pending:
                sock.sendall(pending)
    finally:
        sock.close()
