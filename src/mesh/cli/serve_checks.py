"""What ``mesh serve`` refuses (or warns about) before it binds a port.

* ``--workers N`` (N > 1) without Redis: each process would keep its own key cache, and a
  revoked key would keep working on the others until their cache entries expire.
* ``console.payments.provider: test`` on an address other than loopback: with sign-up
  open, anyone could mint credits; allowed only with ``allow_test_provider: true``.
* The console secret must be readable (generated into ``.mesh/`` on first start when no
  secret is configured: fine on one host, see console/secrets.py).
"""

from __future__ import annotations

import ipaddress

from mesh.config import Settings


class Refused(Exception):
    """The server must not start; the message says why and what to change."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check(settings: Settings, host: str, workers: int) -> list[str]:
    """Raise :class:`Refused`, or return the warnings to print at start."""
    warnings: list[str] = []
    if workers > 1 and not settings.redis:
        raise Refused(
            f"--workers {workers} needs Redis (the `redis` setting): without it a revoked key keeps working on the "
            "other processes until their key caches expire. Configure redis or run one process."
        )
    console = settings.console
    if console.enabled and console.payments.provider == "test":
        if not is_loopback(host) and not console.payments.allow_test_provider:
            raise Refused(
                f"console.payments.provider is 'test' (anyone can buy credits for free) and the server binds {host}, "
                "which is not loopback. Use stripe or none, or set console.payments.allow_test_provider: true."
            )
        warnings.append("console.payments.provider is 'test': checkouts are paid at once, for free (development only)")
    if console.enabled:
        from mesh.console.secrets import SecretError, load_secret

        try:
            load_secret(console)
        except SecretError as exc:
            raise Refused(str(exc)) from None
    return warnings
