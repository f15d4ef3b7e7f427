"""What counting a request in the metrics costs, in microseconds, without a network.

Drives `HTTP1Protocol` over an in-memory transport (one keep-alive connection, a
dispatcher answering at once, no access log) with the metrics recorder of a real
scoreboard file and with the default recorder that counts nothing, interleaved, and
prints the best of many short rounds of each (CPU time of this thread, so time the
machine gives to other processes is not counted), their difference, and the recorder
call on its own. A busy machine makes whole-server figures (bench/run.py --metrics) noisy; this
isolates the per-request work the metrics add.

    python bench/counting_cost.py [--requests 5000] [--rounds 41]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

from omni_httpd.common.response import Response  # noqa: E402
from omni_httpd.common.scoreboard import Scoreboard  # noqa: E402
from omni_httpd.common.settings import Settings  # noqa: E402
from omni_httpd.worker.http.context import ListenerContext  # noqa: E402
from omni_httpd.worker.http.http1 import HTTP1Protocol  # noqa: E402

REQUEST = b"GET /bench HTTP/1.1\r\nHost: bench\r\nUser-Agent: counting_cost\r\n\r\n"
ANSWER = Response(status=200, headers=[("content-type", "text/plain")], body=b"ok")


def run(requests: int, record) -> float:
    """Seconds per request over one connection."""
    clock = task.Clock()
    settings = Settings(access_log=False)
    context = ListenerContext(lambda request, allow_remote=False: defer.succeed(ANSWER), settings, 1,
                              clock=clock, record_h1=record)
    protocol = HTTP1Protocol(context)
    transport = StringTransport()
    protocol.makeConnection(transport)
    start = time.thread_time()
    for _ in range(requests):
        protocol.dataReceived(REQUEST)
        transport.clear()
    elapsed = time.thread_time() - start
    protocol.connectionLost(None)
    return elapsed / requests


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=41)
    args = parser.parse_args(argv)
    directory = tempfile.mkdtemp(prefix="counting_cost_")
    board = Scoreboard(os.path.join(directory, "scoreboard"), 2, create=True)
    try:
        counting = board.writer(0).recorder(1, 0)
        context_default = ListenerContext(None, Settings(), 1, clock=task.Clock()).record_h1
        without, with_ = [], []
        for _ in range(args.rounds):
            without.append(run(args.requests, context_default))
            with_.append(run(args.requests, counting))
        calls = 200000
        start = time.thread_time()
        for _ in range(calls):
            counting(200, 0.0042)
        alone = (time.thread_time() - start) / calls
        start = time.thread_time()
        for _ in range(calls):
            context_default(200, 0.0042)
        empty = (time.thread_time() - start) / calls
        best_without, best_with = min(without), min(with_)
        print("HTTP/1.1 request through HTTP1Protocol (in memory), best of %d rounds of %d:"
              % (args.rounds, args.requests))
        print("  without counting: %.2f us/request" % (best_without * 1e6))
        print("  with counting:    %.2f us/request" % (best_with * 1e6))
        print("  difference:       %+.2f us/request (%+.1f %%)"
              % ((best_with - best_without) * 1e6, (best_with / best_without - 1) * 100))
        print("recorder call alone: %.3f us (the no-op default: %.3f us)" % (alone * 1e6, empty * 1e6))
    finally:
        board.close()
        os.unlink(os.path.join(directory, "scoreboard"))
        os.rmdir(directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
