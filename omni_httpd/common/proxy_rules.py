"""What the proxy outcome may reach and how this daemon recognises its own forwarding.

Shared by the worker (worker/proxy.py forwards), the master (--proxy-allow/--proxy-deny
are parsed by the options) and the console (it refuses requests this daemon's own proxy
forwarded to it), so it lives here and not in the worker.
"""
from __future__ import annotations

import ipaddress
from typing import List

from omni_httpd.common.settings import Settings


def via_pseudonym(settings: Settings) -> str:
    """The name this daemon gives itself in ``Via`` (shared by master and workers)."""
    return "omni_httpd-" + settings.proxy_token


def proxied_by_us(headers, settings: Settings) -> bool:
    """Did this daemon itself forward a request with these ``(name, value)`` headers?"""
    own = via_pseudonym(settings).lower()
    for name, value in headers:
        if name.lower() != "via":
            continue
        for element in value.split(","):
            parts = element.split()
            # element: received-protocol received-by [comment]
            if len(parts) >= 2 and parts[1].lower() == own:
                return True
    return False


# -- which addresses a proxy outcome may connect to -----------------------------------

#: Address classes usable in --proxy-allow / --proxy-deny besides CIDR networks.
_CLASSES = {
    "any": lambda ip: True,
    # 0.0.0.0 and :: reach the local host too.
    "loopback": lambda ip: ip.is_loopback or ip.is_unspecified,
    "private": lambda ip: ip.is_private and not (ip.is_loopback or ip.is_link_local
                                                 or ip.is_unspecified),
    "link-local": lambda ip: ip.is_link_local,
}


def parse_address_rules(text: str) -> List[str]:
    """``"loopback, 10.0.0.0/8"`` -> normalised rules; ValueError explains a bad one."""
    rules = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        if item in _CLASSES:
            rules.append(item)
            continue
        try:
            rules.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ValueError("%r is neither an address, a network (CIDR) nor one of %s"
                             % (item, ", ".join(sorted(_CLASSES)))) from None
    return rules


def _plain_address(text: str):
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        # ::ffff:127.0.0.1 is 127.0.0.1: judge it as such.
        ip = ip.ipv4_mapped
    return ip


class AddressPolicy:
    """``--proxy-allow`` (default: any) minus ``--proxy-deny`` (default: nothing)."""

    def __init__(self, allow: str = "any", deny: str = ""):
        self.allow_text, self.deny_text = allow, deny
        self._allow = [self._matcher(r) for r in parse_address_rules(allow)]
        self._deny = [self._matcher(r) for r in parse_address_rules(deny)]

    @staticmethod
    def _matcher(rule: str):
        if rule in _CLASSES:
            return _CLASSES[rule]
        network = ipaddress.ip_network(rule)
        return lambda ip: ip.version == network.version and ip in network

    def allows(self, address: str) -> bool:
        try:
            ip = _plain_address(address)
        except ValueError:
            return False
        return (any(m(ip) for m in self._allow)
                and not any(m(ip) for m in self._deny))
