"""Where a webhook or Slack notification may be sent: not into the site's own network.

A subscriber chooses the URL and the notifier's workers post to it, so an unchecked
URL would let any member make them send requests to the cloud's instance metadata
(169.254.169.254), the database, Redis or anything else behind the firewall (SSRF).
A target is refused when its host resolves to an address that is not public
unicast: loopback, private (RFC 1918, fc00::/7, 100.64.0.0/10), link-local
(169.254.0.0/16, fe80::/10), multicast, reserved or unspecified - unless the address
is inside a network of NOTIFY_ALLOWED_NETWORKS, the administrator's allow-list
(empty by default; e.g. "10.20.0.0/16" for an in-house receiver).

It is checked twice: when a subscription is created (a field error naming the
address), and by every delivery at connect time, because a name may resolve
elsewhere by then (DNS rebinding). The delivery connects to the very address it
checked (the guarded connection classes below), with the URL's host name kept for
the Host header and TLS (SNI and certificate checks), and never through an
environment proxy that would do its own resolving."""
from __future__ import annotations

import ipaddress
import socket
from functools import lru_cache
from urllib.parse import urlsplit

import requests
from django.conf import settings
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import NameResolutionError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class UnsafeTarget(Exception):
    """The target resolves to an address notifications may not be sent to (the sentence says which)."""


@lru_cache(maxsize=8)
def _networks(spec: tuple[str, ...]) -> tuple:
    return tuple(ipaddress.ip_network(n, strict=False) for n in spec)


def allowed_networks() -> tuple:
    return _networks(tuple(settings.NOTIFY_ALLOWED_NETWORKS))


def why_refused(address: Address) -> str | None:
    """None if notifications may go to `address`, else what kind of address it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if any(address in network for network in allowed_networks() if network.version == address.version):
        return None
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local (where cloud instance metadata is served)"
    if address.is_multicast:
        return "multicast"
    if address.is_unspecified:
        return "unspecified"
    if address.is_reserved:
        return "reserved"
    if address.is_private or (isinstance(address, ipaddress.IPv4Address) and address in _SHARED):
        return "private"
    if not address.is_global:
        return "reserved"
    return None


_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: not global, not "private" to Python


def checked_addresses(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, if notifications may go to all of them;
    otherwise UnsafeTarget (one bad address refuses the name: a resolver may answer
    in any order). socket.gaierror if it does not resolve."""
    host = host.strip("[]")
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for text in addresses:
        why = why_refused(ipaddress.ip_address(text.split("%", 1)[0]))
        if why is not None:
            shown = host if host == text else f"{host} resolves to {text}, which"
            raise UnsafeTarget(f"{shown} is a {why} address; notifications are not sent inside the site's "
                               "network unless an administrator allows it (NOTIFY_ALLOWED_NETWORKS)")
    return addresses


def target_error(url: str) -> str | None:
    """Subscription time: why notifications may not be sent to `url`, or None."""
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return "the port is not a number from 0 to 65535"
    try:
        checked_addresses(parts.hostname or "", port)
    except UnsafeTarget as exc:
        return str(exc)
    except (socket.gaierror, UnicodeError) as exc:
        return f"host {parts.hostname} does not resolve ({exc})"
    return None


# --- the guarded connection: checks what it connects to ------------------------------

class _Guarded:
    """Mixed into urllib3's connections: resolve, check, connect to the checked address."""

    def _new_conn(self):
        try:
            addresses = checked_addresses(self._dns_host, self.port)
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        name = self._dns_host
        self._dns_host = addresses[0]  # TLS still verifies against self.host (the URL's name)
        try:
            return super()._new_conn()
        finally:
            self._dns_host = name


class _GuardedHTTPConnection(_Guarded, HTTPConnection):
    pass


class _GuardedHTTPSConnection(_Guarded, HTTPSConnection):
    pass


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class GuardedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _GuardedHTTPPool, "https": _GuardedHTTPSPool}


def guarded_session(pool_size: int = 32) -> requests.Session:
    """A requests session that only connects to addresses `checked_addresses` allows.
    Connections are kept alive and reused across deliveries (one per receiver and
    worker thread at most)."""
    session = requests.Session()
    session.trust_env = False  # an environment proxy would resolve the name itself, unchecked
    adapter = GuardedAdapter(pool_connections=16, pool_maxsize=pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
