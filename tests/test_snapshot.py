"""Snapshot publishing is atomic and verification catches every kind of damage."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from index_builder import snapshot


def fields(version: str) -> dict[str, Any]:
    return {
        "version": version,
        "created": datetime(2026, 1, 1, tzinfo=UTC),
        "inputs": [],
        "parameters": {},
        "metrics": {},
        "counts": {},
        "index": {},
        "quality_gate": {"passed": True},
    }


def publish(root: Path, version: str, make_current: bool = True) -> Path:
    staging = snapshot.staging_dir(root, version)
    (staging / "a.npy").write_bytes(b"vectors")
    (staging / "items.json").write_bytes(b"[]")
    snapshot.publish(root, staging, fields(version), make_current)
    return root / version


def test_published_snapshot_verifies_and_becomes_current(tmp_path: Path) -> None:
    directory = publish(tmp_path, "v1")
    assert snapshot.verify(directory) == []
    assert snapshot.current_version(tmp_path) == "v1"
    manifest = snapshot.load_manifest(directory)
    assert set(manifest.files) == {"a.npy", "items.json"}
    assert manifest.files["a.npy"].bytes == 7
    assert not list(tmp_path.glob(".staging-*"))


def test_a_new_version_moves_the_pointer_and_keeps_the_old(tmp_path: Path) -> None:
    publish(tmp_path, "v1")
    publish(tmp_path, "v2")
    assert snapshot.current_version(tmp_path) == "v2"
    assert [p.name for p in snapshot.list_versions(tmp_path)] == ["v1", "v2"]


def test_versions_are_immutable(tmp_path: Path) -> None:
    publish(tmp_path, "v1")
    with pytest.raises(snapshot.SnapshotError, match="immutable"):
        publish(tmp_path, "v1")


def test_verify_detects_a_changed_byte(tmp_path: Path) -> None:
    directory = publish(tmp_path, "v1")
    (directory / "a.npy").write_bytes(b"vectorz")
    assert snapshot.verify(directory) == [f"{directory / 'a.npy'}: sha256 mismatch"]


def test_verify_detects_a_truncated_file(tmp_path: Path) -> None:
    directory = publish(tmp_path, "v1")
    (directory / "a.npy").write_bytes(b"vec")
    assert snapshot.verify(directory) == [f"{directory / 'a.npy'}: 3 bytes, manifest says 7"]


def test_verify_detects_a_missing_file(tmp_path: Path) -> None:
    directory = publish(tmp_path, "v1")
    (directory / "items.json").unlink()
    assert snapshot.verify(directory) == [f"{directory / 'items.json'}: missing"]


def test_verify_detects_a_partial_snapshot_without_manifest(tmp_path: Path) -> None:
    directory = publish(tmp_path, "v1")
    (directory / "manifest.json").unlink()
    problems = snapshot.verify(directory)
    assert len(problems) == 1 and "missing (partial snapshot?)" in problems[0]


def test_verify_detects_a_garbled_manifest(tmp_path: Path) -> None:
    directory = publish(tmp_path, "v1")
    (directory / "manifest.json").write_text("{", encoding="utf-8")
    assert "unreadable manifest" in snapshot.verify(directory)[0]


def test_verify_detects_an_unlisted_file(tmp_path: Path) -> None:
    directory = publish(tmp_path, "v1")
    (directory / "stray.bin").write_bytes(b"x")
    assert snapshot.verify(directory) == [f"{directory / 'stray.bin'}: not in the manifest"]


def test_pointer_cannot_name_a_missing_version(tmp_path: Path) -> None:
    publish(tmp_path, "v1")
    with pytest.raises(snapshot.SnapshotError):
        snapshot.set_current(tmp_path, "v9")
    assert snapshot.current_version(tmp_path) == "v1"
