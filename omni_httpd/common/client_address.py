"""The client's address as handlers see it: request header ``omnigres-connecting-ip``.

The worker adds it to every request (route or handler query) with the connection's peer
address, after dropping any header of that name the client sent, so a handler can rely
on it. When the peer is a proxy the operator trusts (``--trusted-proxies``, or every
peer with ``--trust-forwarded``), the address is the one that proxy reports: walking
``X-Forwarded-For`` (else ``Forwarded: for=``) from the nearest hop back, the first
address that is not itself a trusted proxy. The same trust decides whether a proxy
outcome keeps the client's forwarding headers (worker/proxy.py): one rule for both.
"""
from __future__ import annotations

import functools
import re
from typing import List, Optional, Sequence, Tuple

from omni_httpd.common.proxy_rules import AddressPolicy, _plain_address

HEADER = "omnigres-connecting-ip"

_FORWARDED_FOR = re.compile(r'(?:^|[;,\s])for\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*)', re.IGNORECASE)


@functools.lru_cache(maxsize=4096)
def peer_address(peer: str) -> Optional[str]:
    """``ip:port`` / ``[ipv6]:port`` (request.peer) -> the bare IP address, or None."""
    if not peer:
        return None
    if peer.startswith("["):
        host = peer[1:].split("]", 1)[0]
    elif peer.count(":") == 1:
        host = peer.split(":", 1)[0]
    else:
        host = peer
    try:
        return str(_plain_address(host))
    except ValueError:
        return None


class ForwardingTrust:
    """Which peers may tell us who the client is."""

    def __init__(self, trust_all: bool, trusted_proxies: str):
        self.trust_all = trust_all
        self._policy = AddressPolicy(allow=trusted_proxies, deny="") if trusted_proxies else None

    def trusts(self, address: Optional[str]) -> bool:
        if self.trust_all:
            return True
        return address is not None and self._policy is not None and self._policy.allows(address)


@functools.lru_cache(maxsize=8)
def _trust(trust_all: bool, trusted_proxies: str) -> ForwardingTrust:
    return ForwardingTrust(trust_all, trusted_proxies)


def forwarding_trust(settings) -> ForwardingTrust:
    return _trust(bool(settings.trust_forwarded), settings.trusted_proxies or "")


def _claimed(headers: Sequence[Tuple[str, str]]) -> List[str]:
    """Addresses the forwarding headers name, farthest first (as proxies append)."""
    xff = [item.strip() for name, value in headers if name == "x-forwarded-for"
           for item in value.split(",") if item.strip()]
    if xff:
        return xff
    found = []
    for name, value in headers:
        if name == "forwarded":
            for match in _FORWARDED_FOR.finditer(value):
                node = match.group(1).strip('"')
                if node.startswith("["):
                    node = node[1:].split("]", 1)[0]
                elif node.count(":") == 1:
                    node = node.split(":", 1)[0]
                found.append(node)
    return found


def connecting_ip(headers: Sequence[Tuple[str, str]], peer: str, trust: ForwardingTrust) -> str:
    address = peer_address(peer)
    if not trust.trusts(address):
        return address or ""
    for claimed in reversed(_claimed(headers)):
        try:
            candidate = str(_plain_address(claimed))
        except ValueError:
            break       # garbage in the chain: nothing before it can be believed
        address = candidate
        if not trust.trusts(candidate):
            break
    return address or ""


def with_connecting_ip(headers: List[Tuple[str, str]], peer: str,
                       trust: ForwardingTrust) -> List[Tuple[str, str]]:
    """``headers`` (lower-case names) without the client's ``omnigres-connecting-ip``
    and with ours appended."""
    value = connecting_ip(headers, peer, trust)
    if any(name == HEADER for name, _ in headers):
        headers = [(name, v) for name, v in headers if name != HEADER]
    else:
        headers = list(headers)
    headers.append((HEADER, value))
    return headers
