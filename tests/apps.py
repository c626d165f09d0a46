"""Settings for a gateway under test: one snapshot root, nothing written beside it, no watcher or
polling (a test says when something changes), and the opt-out consent model unless it asks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.settings import Settings


def quiet_settings(root: Path, secret: str, **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "snapshots": str(root),
        "watch_interval_s": 0,
        "event_log": "",
        "secret": secret,
        "consent_mode": "opt-out",
        "rules_dir": "",
        "catalog_file": "",
        "experiments_dir": "",
        "rules_poll_s": 0,
    }
    return Settings(**{**values, **changes})
