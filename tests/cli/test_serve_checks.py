"""mesh serve's refusals and warnings, as a function of the settings and the bind address."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.cli.serve_checks import Refused, check, is_loopback
from mesh.config import Settings


def settings(tmp_path: Path, console: dict[str, object] | None = None, **fields: object) -> Settings:
    return Settings.model_validate({"console": {"secret_file": str(tmp_path / "secret"), **(console or {})}, **fields})


@pytest.mark.parametrize(("host", "loop"), [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                           ("127.0.0.9", True), ("0.0.0.0", False), ("10.0.0.5", False)])
def test_loopback(host: str, loop: bool) -> None:
    assert is_loopback(host) is loop


def test_test_provider_needs_loopback_or_an_explicit_yes(tmp_path: Path) -> None:
    test = {"payments": {"provider": "test"}}
    with pytest.raises(Refused, match="allow_test_provider"):
        check(settings(tmp_path, console=test), "0.0.0.0", 1)
    warned = check(settings(tmp_path, console=test), "127.0.0.1", 1)
    assert any("for free" in w for w in warned)
    allowed = {"payments": {"provider": "test", "allow_test_provider": True}}
    assert any("for free" in w for w in check(settings(tmp_path, console=allowed), "0.0.0.0", 1))
    assert check(settings(tmp_path), "0.0.0.0", 1) == []


def test_several_workers_need_redis(tmp_path: Path) -> None:
    with pytest.raises(Refused, match="needs Redis"):
        check(settings(tmp_path), "127.0.0.1", 2)
    assert check(settings(tmp_path, redis="redis://127.0.0.1:6379/0"), "127.0.0.1", 2) == []


def test_unreadable_secret_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("too short")
    with pytest.raises(Refused, match="at least 32"):
        check(settings(tmp_path), "127.0.0.1", 1)
