"""Static file mounts as the master reads them and pushes them to the workers.

The rows of ``omni_httpd.static_files`` name a root; only roots given with
``--static-root NAME=DIR`` are served (SPEC section 9: the database chooses among the
directories the command line allows, never a path of its own). A row naming another
root is logged once per reload and left out of the configuration the workers get.
The workers resolve the name to the directory from their own settings.
"""
from __future__ import annotations

from typing import Dict, List

from twisted.internet import defer
from twisted.logger import Logger

from omni_httpd.master import queries

log = Logger()


def checked(rows, roots: Dict[str, str]) -> Dict[int, List[dict]]:
    """The rows as control-message entries by listener id, without those naming an
    unknown root."""
    mounts: Dict[int, List[dict]] = {}
    for listener_id, url_prefix, root, index_file, listing, cache_control in rows:
        if root not in roots:
            log.warn("static_files row (listener {listener_id}, {prefix!r}) names root {root!r}, "
                     "which no --static-root gives; not served", listener_id=listener_id,
                     prefix=url_prefix, root=root)
            continue
        mounts.setdefault(listener_id, []).append(dict(listener_id=listener_id, url_prefix=url_prefix, root=root,
                           index_file=index_file, listing=bool(listing),
                           cache_control=cache_control))
    return mounts


@defer.inlineCallbacks
def load(connection, roots: Dict[str, str]):
    """Read the mounts through a txpostgres connection; Deferred[{listener id: entries}]."""
    rows = yield connection.runQuery(queries.LOAD_STATIC_FILES)
    return checked(rows, roots)
