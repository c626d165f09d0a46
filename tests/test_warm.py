"""`tailor warm` compiles the kernels into numba's cache, so `tailor serve` starts without compiling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.recommend import kernels
from tests.test_gateway_live import REPO, Server


def test_warm_compiles_once_and_serve_then_loads_from_the_cache(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))  # a first start's empty cache

    def warm() -> str:
        done = subprocess.run(
            [sys.executable, "-m", "tailor", "warm", "--snapshots", str(root)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        return done.stdout

    first = warm()
    assert kernels.COMPILING in first  # said while it compiles, not only after
    assert "compiled " in first and "kernels in" in first
    assert warm().strip() == "kernels already compiled (numba's cache)"

    log = tmp_path / "gateway.log"
    server = Server(root, log)
    server.stop()
    text = log.read_text()
    assert "Application startup complete" in text
    assert "tailor.kernels" not in text  # nothing compiled, nothing said: every kernel came from the cache
