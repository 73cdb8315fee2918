"""Whether a worker may register an engine URL: the URL's shape and where it points.

A worker token sits on every GPU node and will leak one day; a leaked one must not let
its holder take over traffic or turn the gateway into a proxy to any address. So:

* the URL is normalised (``scheme://host[:port]/path``) and refused if it carries
  userinfo, a query or a fragment, or a path with ``.``/``..`` segments;
* its host must be the worker's own source address, or a name that resolves to it, or
  lie in the token's ``allow`` list (networks such as ``10.0.0.0/8`` or host names).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable

from yarl import URL

from mesh.errors import InvalidRequest, PermissionDenied

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalise_engine_url(raw: str) -> str:
    """``raw`` as ``scheme://host[:port]/path`` (lower-case host, no default port, no
    trailing slash). Raises :class:`InvalidRequest` (param ``engine_url``) otherwise."""
    if any(c.isspace() or ord(c) < 0x20 for c in raw):
        raise _bad("engine_url may not contain whitespace or control characters")
    try:
        url = URL(raw, encoded=True)
        explicit = url.explicit_port
    except (ValueError, TypeError):
        raise _bad("engine_url is not a valid URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise _bad("engine_url must be an absolute http(s) URL")
    if url.raw_user is not None or url.raw_password is not None:
        raise _bad("engine_url may not carry a user name or password")
    if url.raw_query_string or "?" in raw:
        raise _bad("engine_url may not carry a query")
    if url.raw_fragment or "#" in raw:
        raise _bad("engine_url may not carry a fragment")
    segments = url.raw_path.split("/")
    if any(s in (".", "..") or "%" in s for s in segments):
        raise _bad("engine_url's path may not hold '.', '..' or escaped characters")
    path = "/".join(s for s in segments if s)
    host = url.raw_host.lower() if url.raw_host else ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{explicit}" if explicit is not None and explicit != _DEFAULT_PORTS[url.scheme] else ""
    return f"{url.scheme}://{host}{port}" + (f"/{path}" if path else "")


def _bad(message: str) -> InvalidRequest:
    return InvalidRequest(f"{message}.", param="engine_url", code="invalid_engine_url")


def _ip(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def _matches(host: str, addresses: Iterable[Address], allow: Iterable[str]) -> bool:
    """The host is named in ``allow``, or every address it resolves to lies in an allowed
    network (one allowed address among others would let the engine client connect to the
    others: a name with two A records, one of them internal)."""
    entries = tuple(allow)
    if any(entry.lower() == host for entry in entries if "/" not in entry and _ip(entry) is None):
        return True
    networks = [ipaddress.ip_network(e, strict=False) for e in entries if "/" in e or _ip(e) is not None]
    found = list(addresses)
    return bool(networks) and bool(found) and all(any(_plain(a) in n for n in networks) for a in found)


async def resolve(host: str) -> list[Address]:
    """The addresses ``host`` names (an IP literal names itself); [] if it does not resolve."""
    literal = _ip(host)
    if literal is not None:
        return [literal]
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return []
    out: list[Address] = []
    for info in infos:
        ip = _ip(str(info[4][0]))
        if ip is not None and ip not in out:
            out.append(ip)
    return out


async def engine_hosts(url: str) -> list[str]:
    """What names the engine of ``url``, for quarantine: its host and every address it
    resolves to (IPv4-mapped IPv6 addresses as IPv4), so no other spelling escapes."""
    host = (URL(url).host or "").lower()
    names = [host]
    for a in await resolve(host):
        text = str(_plain(a))
        if text not in names:
            names.append(text)
    return names


async def check_engine_host(url: str, source: str | None, allow: tuple[str, ...]) -> None:
    """Refuse (:class:`PermissionDenied`, 403) an engine URL whose host is neither the worker's
    source address (nor a name resolving only to it) nor in the token's ``allow`` list."""
    host = URL(url).host or ""
    addresses = await resolve(host)
    if not addresses:
        raise PermissionDenied(f"The engine host '{host}' does not resolve.", param="engine_url")
    if _matches(host.lower(), addresses, allow):
        return
    own = _ip(source) if source else None
    if own is not None and all(_same(a, own) for a in addresses):
        return
    raise PermissionDenied(
        f"A worker may register only an engine on its own address ({source or 'unknown'}) or on hosts its token "
        f"allows; '{host}' is neither.",
        param="engine_url", code="engine_host_not_allowed",
    )


def _plain(x: Address) -> Address:
    return x.ipv4_mapped if isinstance(x, ipaddress.IPv6Address) and x.ipv4_mapped else x


def _same(a: Address, b: Address) -> bool:
    """Equal, treating an IPv4-mapped IPv6 address as its IPv4 address."""
    return _plain(a) == _plain(b)
