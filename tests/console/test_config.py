"""The ``console`` section of the settings, and the console's secret."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from mesh.config import ConfigError, ConsoleConfig, Settings, load_settings
from mesh.console.routes import console_routes
from mesh.console.secrets import SecretError, derive, load_secret


def settings(**console: object) -> Settings:
    return Settings.model_validate({"console": console})


def test_defaults_are_safe() -> None:
    s = settings()
    assert s.console.enabled and s.console.payments.provider == "none"
    assert s.console.secret is None and s.console.secure_cookies is None
    assert [p.id for p in s.console.payments.packs] == ["starter", "builder", "scale"]


@pytest.mark.parametrize(
    "console",
    [
        {"payments": {"provider": "stripe"}},
        {"payments": {"provider": "stripe", "stripe_secret_key": "sk_test_x"}},
        {"payments": {"packs": [{"id": "a", "credits": 1, "price": 1}, {"id": "a", "credits": 2, "price": 2}]}},
        {"payments": {"packs": [{"id": "a", "credits": 1, "price": "1.005"}]}},
        {"payments": {"packs": [{"id": "a", "credits": 0, "price": 1}]}},
        {"secret": "too short"},
        {"secure_cookies": "sometimes"},
    ],
)
def test_bad_console_settings_fail_at_start(tmp_path: Path, console: dict[str, object]) -> None:
    import yaml

    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump({"console": console}))
    with pytest.raises(ConfigError, match="console"):
        load_settings(path, environ={})


def test_secret_from_the_environment_is_not_printed() -> None:
    s = load_settings(None, environ={"MESH_CONSOLE__SECRET": "x" * 40})
    assert s.console.secret is not None and s.console.secret.get_secret_value() == "x" * 40
    assert "xxxx" not in repr(s)


def test_disabled_console_has_no_routes() -> None:
    assert console_routes(settings(enabled=False)) == []
    assert console_routes(settings())


def test_generated_secret_is_a_private_file_never_the_database(tmp_path: Path) -> None:
    path = tmp_path / ".mesh" / "console-secret"
    config = ConsoleConfig(secret_file=str(path))
    first = load_secret(config)
    assert len(first) == 64 and load_secret(config) == first
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_text().strip().encode() == first
    assert load_secret(ConsoleConfig(secret=SecretStr("c" * 32), secret_file=str(path))) == b"c" * 32
    path.write_text("short\n")
    with pytest.raises(SecretError, match="at least 32"):
        load_secret(config)
    assert derive(first, "a", "x") != derive(first, "b", "x") != derive(first, "a", "y")


def test_content_logging_cannot_be_turned_on(tmp_path: Path) -> None:
    """Mesh never logs prompts or completions; the old switch is accepted only as false."""
    assert Settings.model_validate({"logging": {"log_content": False}}).logging.log_content is False
    path = tmp_path / "mesh.yaml"
    path.write_text("logging:\n  log_content: true\n")
    with pytest.raises(ConfigError, match=r"logging\.log_content"):
        load_settings(path, environ={})
