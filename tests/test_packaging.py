"""The distribution: `pip install .` gives a working `tailor serve` that serves the snippet and the
demo from package data, and the version has one source (gateway.__version__)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import httpx2 as httpx
import pytest

from gateway import __version__
from gateway.api import openapi
from tailor.cli import main
from tests.conftest import free_port
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "tailor", "gateway", "index_builder", "loadtests")


def _build_wheel(out: Path) -> Path:
    """A wheel of a copy of the sources, so no stale build/ directory of the tree can leak into it;
    offline, with the setuptools installed here (no build isolation)."""
    source = out / "source"
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            source.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out), "."],
        cwd=source,
        check=True,
    )
    [wheel] = out.glob("tailor-*.whl")
    return wheel


def _venv_with(wheel: Path, where: Path) -> Path:
    """A fresh virtualenv with the wheel installed; its dependencies come from this environment
    (a .pth file names its site-packages), so nothing is downloaded."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    Path(site, "tailor-test-deps.pth").write_text("\n".join(ours) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--no-index", wheel],
        check=True,
    )
    return where / "bin"


def test_an_installed_wheel_serves_the_snippet_and_the_demo(small_snapshots: Path, tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path / "wheel")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"tailor-{__version__}.dist-info/METADATA").decode()
    assert {"gateway/static/demo.html", "gateway/static/client/tailor.min.js"} <= names
    assert f"tailor-{__version__}.dist-info/licenses/LICENSE" in names
    assert "License-Expression: Apache-2.0" in metadata

    bin_dir = _venv_with(wheel, tmp_path / "venv")
    elsewhere = tmp_path / "elsewhere"  # not the repository: nothing may be read from a checkout
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"TAILOR_SECRET_FILE": str(tmp_path / "secret"), "TAILOR_EVENT_LOG": str(tmp_path / "events")}

    def run(*args: str) -> str:
        done = subprocess.run(args, cwd=elsewhere, env=env, check=True, capture_output=True, text=True)
        return done.stdout.strip()

    where = run(str(bin_dir / "python"), "-c", "import gateway; print(gateway.__file__)")
    assert Path(where).is_relative_to(tmp_path / "venv"), where
    assert run(str(bin_dir / "tailor"), "--version") == f"tailor {__version__}"

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [bin_dir / "tailor", "serve", "--snapshots", str(small_snapshots), "--port", str(port)],
            cwd=elsewhere,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def ready() -> bool:
            assert process.poll() is None, f"tailor serve exited:\n{log.read_text()[-3000:]}"
            try:
                return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, timeout=60, interval=0.1, what="the installed gateway to become ready")
        script = httpx.get(f"{url}/client/tailor.min.js")
        module = httpx.get(f"{url}/client/tailor.esm.min.js")
        demo = httpx.get(f"{url}/demo")
        info = httpx.get(f"{url}/openapi.json").json()["info"]
    finally:
        process.terminate()
        process.wait(timeout=15)
    client = REPO / "gateway" / "static" / "client"
    assert script.status_code == 200 and script.content == (client / "tailor.min.js").read_bytes()
    assert module.status_code == 200 and module.content == (client / "tailor.esm.min.js").read_bytes()
    assert demo.status_code == 200 and '"/client/tailor.esm.min.js"' in demo.text  # the page loads the module
    assert info["version"] == __version__


def test_the_version_has_one_source() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "gateway.__version__"}
    assert openapi.document()["info"]["version"] == __version__


def test_tailor_version_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"tailor {__version__}"


def test_the_browser_snippet_carries_the_same_version() -> None:
    """client_js is an npm package with its own version field, kept equal to the gateway's here."""
    package = json.loads((REPO / "client_js" / "package.json").read_text())
    source = (REPO / "client_js" / "src" / "tailor.js").read_text()
    built = (REPO / "gateway" / "static" / "client" / "tailor.min.js").read_text()
    assert package["version"] == __version__
    assert re.search(r'export const VERSION = "([^"]+)";', source)[1] == __version__  # type: ignore[index]
    assert built.startswith(f"/* tailor {__version__} */")
