"""Configuration: the commented file, environment overrides and validation."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from gateway.settings import FIELDS, Settings, SettingsError, decode, encode, resolve
from tailor.cli import main

CONFIG = Path(__file__).resolve().parent.parent / "tailor.toml"


def test_the_commented_config_file_lists_every_setting_with_its_default() -> None:
    listed = tomllib.loads(CONFIG.read_text())["gateway"]
    assert list(listed) == list(FIELDS)
    assert resolve(config=CONFIG, environ={}) == Settings()
    lines = CONFIG.read_text().splitlines()
    for name in FIELDS:
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{name} ="))
        assert any(line.startswith("#") for line in lines[max(0, at - 3) : at]), f"{name} has no comment above it"


def test_environment_overrides_the_file_and_flags_override_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[gateway]\nport = 9000\nstore = "redis://file:6379/0"\n')
    env = {"TAILOR_STORE": "redis://env:6379/1", "TAILOR_VERIFY_SNAPSHOTS": "false", "TAILOR_MAX_N": "50"}
    resolved = resolve(config=config, environ=env, overrides={"port": 9100, "host": None})
    assert resolved.store == "redis://env:6379/1"
    assert resolved.port == 9100
    assert resolved.host == Settings().host
    assert resolved.verify_snapshots is False
    assert resolved.max_n == 50


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"TAILOR_PUBLIC_KEYS": '["pk_one", "pk_two"]'}, {"public_keys": ["pk_one", "pk_two"]}),
        ({"TAILOR_ADMIN_KEYS": "ak_one, ak_two"}, {"admin_keys": ["ak_one", "ak_two"]}),
        ({"TAILOR_GC_THRESHOLDS": "[1000, 5, 10]"}, {"gc_thresholds": [1000, 5, 10]}),
        ({"TAILOR_COUNTER_WINDOWS_S": "60,3600"}, {"counter_windows_s": [60.0, 3600.0]}),
        ({"TAILOR_CORS_ORIGINS": ""}, {"cors_origins": []}),
    ],
)
def test_list_settings_come_from_the_environment_as_json_or_comma_separated(
    env: dict[str, str], expected: dict[str, list[object]]
) -> None:
    resolved = resolve(environ=env)
    for name, value in expected.items():
        assert list(getattr(resolved, name)) == value


def test_a_list_setting_that_is_broken_json_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="TAILOR_PUBLIC_KEYS"):
        resolve(environ={"TAILOR_PUBLIC_KEYS": '["pk_one"'})


def test_tailor_config_variable_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[gateway]\nworkers = 3\n")
    assert resolve(environ={"TAILOR_CONFIG": str(config)}).workers == 3


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[gateway]\nprot = 1\n", {}, "unknown field `prot`"),
        ("[gateway]\nport = 70000\n", {}, "port"),
        ("[gateway\n", {}, "gateway.toml"),
        ("", {"TAILOR_STORE_TIMEOUT_MS": "-1"}, "store_timeout_ms"),
        ("", {"TAILOR_WORKERS": "many"}, "workers"),
    ],
)
def test_bad_configuration_is_refused_with_a_message(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(text)
    with pytest.raises(SettingsError, match=message):
        resolve(config=config, environ=env)


def test_settings_survive_the_trip_to_worker_processes() -> None:
    changed = Settings(store="redis://h:1/2", max_n=7, verify_snapshots=False)
    assert decode(encode(changed)) == changed


def test_serve_help_documents_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in FIELDS:
        assert name in out
    assert "TAILOR_" in out


def test_serve_with_a_bad_store_url_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--store", "postgres://db"]) == 2
    assert "unknown scheme" in capsys.readouterr().err
