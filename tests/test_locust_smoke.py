"""Smoke test of loadtests/locustfile.py: a few seconds of the realistic mix against a live gateway.

Locust runs on gevent, which must not be imported into the pytest process, so both the gateway and
Locust run as subprocesses; the test only reads Locust's JSON stats.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tailor.cli import main

REPO = Path(__file__).resolve().parent.parent
LOCUSTFILE = REPO / "loadtests" / "locustfile.py"

# Every route the mix must exercise in a few seconds; the locustfile names its requests this way.
EXPECTED = (
    "/v1/recommend [known]",
    "/v1/recommend [new visitor]",
    "/v1/items/[id]/similar",
    "/v1/popular",
    "/v1/events",
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def shop_and_snapshots(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    shop, root = tmp_path_factory.mktemp("shop"), tmp_path_factory.mktemp("snapshots")
    synth = ["synth", "--out", str(shop), "--users", "300", "--items", "400", "--events", "15000", "--seed", "5"]
    assert main(synth) == 0
    build = ["build", "--events", str(shop / "events.csv"), "--items", str(shop / "items.jsonl"), "--out", str(root)]
    assert main([*build, "--quiet", "--max-trials", "2", "--force"]) == 0
    return shop, root


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def gateway(shop_and_snapshots: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    _, root = shop_and_snapshots
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    command = [sys.executable, "-m", "tailor", "serve", "--snapshots", str(root), "--store", "memory://"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with log.open("wb") as out:
        # not the repository's var/events and var/secret
        env = {
            **os.environ,
            "TAILOR_EVENT_LOG": str(log.parent / "events"),
            "TAILOR_SECRET_FILE": str(log.parent / "secret"),
        }
        process = subprocess.Popen(
            command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env
        )
    try:
        deadline = time.monotonic() + 30
        while not _ready(url):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"gateway did not become ready:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)
        yield url
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_locust_mix_runs_without_failures(gateway: str, shop_and_snapshots: tuple[Path, Path], tmp_path: Path) -> None:
    shop, root = shop_and_snapshots
    stats_file = tmp_path / "stats"
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "10", "-r", "10"]
    command += ["-t", "5s", "--stop-timeout", "5", "--host", gateway, "--only-summary", "--json-file", str(stats_file)]
    env = {
        **os.environ,
        "TAILOR_SHOP": str(shop),
        "TAILOR_SNAPSHOTS": str(root),
        "TAILOR_WAIT": "0.05,0.2",  # short think time: enough requests of every kind in 5 s
    }
    completed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False)
    output = f"stdout:\n{completed.stdout[-3000:]}\nstderr:\n{completed.stderr[-3000:]}"
    assert completed.returncode == 0, output

    stats: list[dict[str, Any]] = json.loads(stats_file.with_suffix(".json").read_text())
    requests = {entry["name"]: entry["num_requests"] for entry in stats}
    failures = {entry["name"]: entry["num_failures"] for entry in stats if entry["num_failures"]}
    assert failures == {}, output
    for name in EXPECTED:
        assert requests.get(name, 0) >= 1, f"no {name!r} requests: {requests}"
