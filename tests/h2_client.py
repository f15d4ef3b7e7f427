"""A small blocking HTTP/2 client on the h2 library: several streams on ONE connection."""
from __future__ import annotations

import socket
import ssl
import time
from typing import Dict, List, Optional, Tuple

import h2.config
import h2.connection
import h2.events


class StreamResult:
    def __init__(self):
        self.status: Optional[int] = None
        self.headers: List[Tuple[str, str]] = []
        self.body = b""
        self.reset: Optional[int] = None
        self.ended = False


def h2_exchange(port: int, requests: List[Tuple[str, str, bytes]], tls: bool = False,
                headers: Optional[List[Tuple[str, str]]] = None, timeout: float = 30.0,
                host: str = "127.0.0.1") -> List[StreamResult]:
    """Send every (method, path, body) at once on one connection; wait for all answers."""
    raw = socket.create_connection((host, port), timeout=timeout)
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["h2"])
        sock = context.wrap_socket(raw, server_hostname="localhost")
        assert sock.selected_alpn_protocol() == "h2"
    else:
        sock = raw
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    connection.initiate_connection()
    connection.increment_flow_control_window(2 ** 30)
    results: Dict[int, StreamResult] = {}
    order = []
    pending: Dict[int, bytes] = {}

    def send_pending():
        # Request bodies go out as the flow-control windows allow.
        for stream_id in list(pending):
            body = pending[stream_id]
            while body:
                window = min(connection.local_flow_control_window(stream_id), connection.max_outbound_frame_size)
                if window <= 0:
                    break
                chunk, body = body[:window], body[window:]
                connection.send_data(stream_id, chunk, end_stream=not body)
            if body:
                pending[stream_id] = body
            else:
                del pending[stream_id]

    for method, path, body in requests:
        stream_id = connection.get_next_available_stream_id()
        request_headers = [(":method", method), (":path", path), (":scheme", "https" if tls else "http"),
                           (":authority", "127.0.0.1:%d" % port)] + list(headers or [])
        connection.send_headers(stream_id, request_headers, end_stream=not body)
        if body:
            pending[stream_id] = body
        results[stream_id] = StreamResult()
        order.append(stream_id)
    send_pending()
    sock.sendall(connection.data_to_send())
    deadline = time.monotonic() + timeout
    try:
        while not all(r.ended for r in results.values()):
            if time.monotonic() > deadline:
                raise AssertionError("HTTP/2 streams not answered in time")
            data = sock.recv(65536)
            if not data:
                break
            for event in connection.receive_data(data):
                result = results.get(getattr(event, "stream_id", None))
                if isinstance(event, h2.events.ResponseReceived):
                    result.headers = [(k, v) for k, v in event.headers]
                    result.status = int(dict(event.headers)[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    result.body += event.data
                    connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    result.ended = True
                elif isinstance(event, h2.events.StreamReset):
                    result.reset = event.error_code
                    result.ended = True
            send_pending()
            outgoing = connection.data_to_send()
            if outgoing:
                sock.sendall(outgoing)
    finally:
        sock.close()
    return [results[stream_id] for stream_id in order]
