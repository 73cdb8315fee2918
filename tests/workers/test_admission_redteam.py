"""Where a worker may point the gateway, for names with several addresses (red team).

A host name is checked by what it resolves to. With an ``allow`` list of networks, one
allowed address among others used to be enough: a name with two A records, one allowed
and one internal, passed, and the engine client could connect to the internal one. (On
loopback no such name exists, hence a resolver stub here.)
"""

from __future__ import annotations

import ipaddress

import pytest

from mesh.errors import PermissionDenied
from mesh.workers import admission

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _stub(monkeypatch: pytest.MonkeyPatch, *addresses: str) -> None:
    async def resolve(host: str) -> list[Address]:
        return [ipaddress.ip_address(a) for a in addresses]

    monkeypatch.setattr(admission, "resolve", resolve)


async def test_every_address_of_a_name_must_be_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    _stub(monkeypatch, "10.0.0.5", "169.254.169.254")
    with pytest.raises(PermissionDenied):
        await admission.check_engine_host("http://engine.example:8000/v1", "10.0.0.5", ("10.0.0.0/8",))
    _stub(monkeypatch, "10.0.0.5", "10.0.0.6")
    await admission.check_engine_host("http://engine.example:8000/v1", "192.0.2.1", ("10.0.0.0/8",))


async def test_mapped_addresses_match_their_ipv4_network(monkeypatch: pytest.MonkeyPatch) -> None:
    _stub(monkeypatch, "::ffff:10.0.0.5")
    await admission.check_engine_host("http://engine.example:8000/v1", "192.0.2.1", ("10.0.0.0/8",))


async def test_a_name_in_the_allow_list_is_allowed_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    _stub(monkeypatch, "10.0.0.5", "169.254.169.254")
    await admission.check_engine_host("http://gpu.internal:8000/v1", "192.0.2.1", ("GPU.internal",))
