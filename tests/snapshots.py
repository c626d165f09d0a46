"""Helpers for tests that need published snapshots: build a small one, republish, corrupt."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from index_builder import snapshot
from tailor.cli import main


def build_small(shop: Path, root: Path) -> Path:
    """A synthetic shop and one published snapshot of it under `root`."""
    synth = ["synth", "--out", str(shop), "--users", "300", "--items", "400", "--events", "15000", "--seed", "3"]
    assert main(synth) == 0
    build = ["build", "--events", str(shop / "events.csv"), "--items", str(shop / "items.jsonl"), "--out", str(root)]
    assert main([*build, "--quiet", "--max-trials", "2"]) == 0
    return root


def current_dir(root: Path) -> Path:
    version = snapshot.current_version(root)
    assert version is not None
    return root / version


def republish(
    root: Path,
    *,
    age: timedelta = timedelta(0),
    make_current: bool = True,
    index: Callable[[Path, npt.NDArray[np.float32]], dict[str, Any]] | None = None,
    similar: Callable[[Path, npt.NDArray[np.float32]], dict[str, Any]] | None = None,
) -> str:
    """Publish a copy of the current snapshot as a new version (optionally back-dated; with `index`,
    which writes an index file into the staging directory for the item vectors and returns the
    manifest's `index` entry, with that index instead of the build's; with `similar`, the same for
    the manifest's `similar_index`, without the build's similar-item lists)."""
    source = current_dir(root)
    manifest = snapshot.load_manifest(source)
    created = datetime.now(UTC) - age
    version = snapshot.new_version(datetime.now(UTC))
    staging = snapshot.staging_dir(root, version)
    for path in source.iterdir():
        if path.name != snapshot.MANIFEST:
            shutil.copy(path, staging / path.name)
    fields = msgspec.to_builtins(manifest)
    for generated in ("format", "files"):
        fields.pop(generated)
    fields.update(version=version, created=created)
    if index is not None:
        fields["index"] = index(staging, np.load(staging / "item_vectors.npy"))
    if similar is not None:
        fields["similar_index"] = similar(staging, np.load(staging / "item_vectors.npy"))
        for name in ("neighbour_rows.npy", "neighbour_scores.npy"):
            (staging / name).unlink(missing_ok=True)
    snapshot.publish(root, staging, fields, make_current=make_current)
    return version


def corrupt(directory: Path, name: str = "item_vectors.npy") -> None:
    """Flip one byte near the end of a file, keeping its size."""
    path = directory / name
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
