"""Gateway configuration: one declared struct, read from defaults < config file < environment < flags.

`tailor.toml` at the repository root lists every setting with its default and what it does; a test
keeps that file and these defaults in step. Environment variables are `TAILOR_` + the upper-case
name (`TAILOR_STORE=redis://127.0.0.1:6379/0`).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import msgspec.inspect

ENV_PREFIX = "TAILOR_"
# How a parent process hands resolved settings to uvicorn's worker processes.
SETTINGS_ENV = "TAILOR_SETTINGS_JSON"

Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Count = Annotated[int, msgspec.Meta(ge=1)]


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    snapshots: str = "var/snapshots"
    store: str = "memory://"
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8000
    workers: Count = 1
    header_timeout_s: Positive = 10.0
    log_level: str = "info"
    access_log: bool = False
    store_timeout_ms: Positive = 50.0
    store_retry_after_s: NonNegative = 1.0
    max_snapshot_age_s: NonNegative = 7 * 24 * 3600.0
    watch_interval_s: NonNegative = 2.0
    verify_snapshots: bool = True
    recent_limit: Count = 20
    recent_keep: Count = 100
    profile_ttl_s: Positive = 30 * 24 * 3600.0
    default_n: Count = 10
    max_n: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100
    candidate_pool: Annotated[int, msgspec.Meta(ge=10, le=5000)] = 200
    cache_entries: Annotated[int, msgspec.Meta(ge=0)] = 50_000
    compute_threads: Count = 2
    max_events_per_batch: Count = 500
    custom_events: list[Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_.:-]*$", max_length=64)]] = []
    event_ids_keep: Annotated[int, msgspec.Meta(ge=0)] = 1000
    counter_windows_s: Annotated[list[Positive], msgspec.Meta(min_length=1, max_length=8)] = msgspec.field(
        default_factory=lambda: [3600.0, 86400.0, 604800.0, 2592000.0]
    )
    max_counters: Count = 500
    event_log: str = "var/events"
    event_log_max: Annotated[int, msgspec.Meta(ge=0)] = 1_000_000
    event_log_ttl_s: NonNegative = 90 * 24 * 3600.0
    rules_dir: str = "var/rules"
    rules_poll_s: NonNegative = 5.0
    catalog_file: str = "var/catalog.jsonl"
    catalog_poll_s: NonNegative = 5.0
    serve_out_of_stock: bool = False
    max_items_per_call: Count = 10_000
    experiments_dir: str = "var/experiments"
    experiment_ttl_s: Positive = 90 * 24 * 3600.0
    secret: str = ""
    secret_file: str = "var/secret"
    pseudonym_key: str = ""
    token_ttl_s: Positive = 3600.0
    token_renew_s: NonNegative = 600.0
    cors_origins: list[str] = []
    demo: bool = True
    public_keys: list[str] = []
    admin_keys: list[str] = []
    consent_mode: Literal["opt-in", "opt-out"] = "opt-in"
    rate_limit_per_s: NonNegative = 0.0
    rate_limit_burst: Count = 50
    push_debounce_ms: NonNegative = 25.0
    stream_queue: Count = 16
    heartbeat_s: Positive = 20.0
    max_streams: Count = 20_000
    trigger_poll_s: Positive = 1.0
    trigger_inbox_keep: Count = 10
    trigger_inbox_ttl_s: Positive = 7 * 24 * 3600.0
    gc_thresholds: Annotated[list[Annotated[int, msgspec.Meta(ge=0)]], msgspec.Meta(min_length=3, max_length=3)] = (
        msgspec.field(default_factory=lambda: [20_000, 5, 100])
    )


class SettingsError(ValueError):
    """A configuration value is missing, unknown or out of range."""


FIELDS: tuple[str, ...] = Settings.__struct_fields__
# Settings that hold a list: from the environment they come as a JSON array or comma-separated.
LIST_FIELDS = frozenset(
    f.name
    for f in msgspec.inspect.type_info(Settings).fields  # type: ignore[attr-defined]
    if isinstance(f.type, msgspec.inspect.ListType | msgspec.inspect.VarTupleType | msgspec.inspect.TupleType)
)


def read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError as exc:
        raise SettingsError(f"config file {path} not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path}: {exc}") from exc
    section = raw.get("gateway", raw)
    if not isinstance(section, dict):
        raise SettingsError(f"config file {path}: [gateway] must be a table")
    return section


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The TAILOR_* variables that name a setting. A list setting is a JSON array
    (`TAILOR_PUBLIC_KEYS='["pk_1", "pk_2"]'`) or comma-separated (`TAILOR_PUBLIC_KEYS=pk_1,pk_2`)."""
    found: dict[str, Any] = {}
    for name in FIELDS:
        variable = ENV_PREFIX + name.upper()
        if variable not in environ:
            continue
        value = environ[variable]
        if name in LIST_FIELDS:
            text = value.strip()
            if text.startswith("["):
                try:
                    found[name] = msgspec.json.decode(text)
                except msgspec.DecodeError as exc:
                    raise SettingsError(f"{variable}: not a JSON array: {exc}") from None
            else:
                found[name] = [part.strip() for part in text.split(",") if part.strip()]
        else:
            found[name] = value
    return found


def resolve(
    *,
    config: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Defaults, then the config file, then TAILOR_* variables, then explicit overrides (flags)."""
    merged: dict[str, Any] = {}
    if config is not None:
        merged.update(read_file(config))
    env = os.environ if environ is None else environ
    if config is None and ENV_PREFIX + "CONFIG" in env:
        merged.update(read_file(Path(env[ENV_PREFIX + "CONFIG"])))
    # Environment values are strings; strict=False lets msgspec parse "8000" and "true".
    merged.update(from_env(env))
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return msgspec.convert(merged, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(str(exc)) from exc


def encode(settings: Settings) -> str:
    return msgspec.json.encode(settings).decode()


def decode(text: str) -> Settings:
    return msgspec.json.decode(text, type=Settings)
