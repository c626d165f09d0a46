"""The snapshot format: one immutable directory per version, a manifest with checksums, and an
atomically replaced pointer naming the current version.

    <root>/CURRENT                  the current version's name (replaced with os.replace)
    <root>/<version>/manifest.json  Manifest: version, inputs, parameters, metrics, file checksums
    <root>/<version>/items.json     item table, in vector-row order
    <root>/<version>/...            vectors (.npy), Annoy index, popularity, users

The gateway reads this module's `load_manifest` and `verify` so both sides agree on the format.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

FORMAT_VERSION = 1
POINTER = "CURRENT"
MANIFEST = "manifest.json"
CHUNK = 1 << 20


class FileEntry(msgspec.Struct, frozen=True):
    sha256: str
    bytes: int


class InputFile(msgspec.Struct, frozen=True):
    path: str
    sha256: str
    bytes: int


class Manifest(msgspec.Struct, frozen=True):
    format: int
    version: str
    created: datetime
    inputs: list[InputFile]
    files: dict[str, FileEntry]
    # Free-form but declared by the builder: parameters, metrics, counts, index choice.
    parameters: dict[str, Any]
    metrics: dict[str, Any]
    counts: dict[str, int]
    index: dict[str, Any]
    quality_gate: dict[str, Any]
    # How similar items are found when the catalog has too many items for a list each (the
    # similar-items graph's IndexChoice); empty when the snapshot holds the lists.
    similar_index: dict[str, Any] = {}


class SnapshotError(Exception):
    """A snapshot is missing, partial or corrupt."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def new_version(now: datetime | None = None) -> str:
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return moment.strftime("%Y%m%dT%H%M%S%fZ")


def staging_dir(root: Path, version: str) -> Path:
    """A scratch directory on the same file system as `root`, so publishing is a rename."""
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=root))


def publish(root: Path, staging: Path, manifest_fields: dict[str, Any], make_current: bool = True) -> Manifest:
    """Checksum every staged file, write the manifest, move the directory into place, then point
    CURRENT at it. Each step is a rename, so a reader sees the old snapshot or the new one, never
    half of one; a crash leaves at most a `.staging-*` directory that no pointer names.
    """
    files = {
        path.name: FileEntry(sha256_file(path), path.stat().st_size)
        for path in sorted(staging.iterdir())
        if path.is_file() and path.name != MANIFEST
    }
    manifest = msgspec.convert({**manifest_fields, "format": FORMAT_VERSION, "files": files}, Manifest)
    _write_atomic(staging / MANIFEST, msgspec.json.format(msgspec.json.encode(manifest), indent=2))
    _fsync_dir(staging)
    target = root / manifest.version
    if target.exists():
        raise SnapshotError(f"{target} already exists; versions are immutable")
    os.rename(staging, target)
    if make_current:
        set_current(root, manifest.version)
    return manifest


def set_current(root: Path, version: str) -> None:
    if not (root / version / MANIFEST).is_file():
        raise SnapshotError(f"no snapshot {version!r} under {root}")
    _write_atomic(root / POINTER, (version + "\n").encode())
    _fsync_dir(root)


def current_version(root: Path) -> str | None:
    """The version CURRENT names; SnapshotError when it names anything but a directory directly
    under `root` (a path such as `../x` or `/x`, or a symlink leading out of the root)."""
    try:
        version = (root / POINTER).read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None
    if version is not None and not _inside(root, version):
        raise SnapshotError(f"{root / POINTER} names {version!r}, which is not a version directory under {root}")
    return version


def _inside(root: Path, name: str) -> bool:
    """Whether `name` is one directory name whose directory (symlinks followed) is in `root` itself."""
    if Path(name).name != name or name in (".", "..") or "\\" in name or "\0" in name:
        return False
    try:
        return (root / name).resolve().parent == root.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return False


def load_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST
    try:
        return msgspec.json.decode(path.read_bytes(), type=Manifest)
    except FileNotFoundError as exc:
        raise SnapshotError(f"{path}: missing (partial snapshot?)") from exc
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise SnapshotError(f"{path}: unreadable manifest: {exc}") from exc


def verify(directory: Path) -> list[str]:
    """Every problem with a snapshot directory; an empty list means it is complete and intact."""
    try:
        manifest = load_manifest(directory)
    except SnapshotError as exc:
        return [str(exc)]
    problems: list[str] = []
    if manifest.format != FORMAT_VERSION:
        problems.append(f"{directory}: format {manifest.format}, this build reads {FORMAT_VERSION}")
    if manifest.version != directory.name:
        problems.append(f"{directory}: manifest names version {manifest.version!r}")
    for name, entry in sorted(manifest.files.items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != entry.bytes:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {entry.bytes}")
        elif sha256_file(path) != entry.sha256:
            problems.append(f"{path}: sha256 mismatch")
    extra = {p.name for p in directory.iterdir()} - set(manifest.files) - {MANIFEST}
    problems.extend(f"{directory / name}: not in the manifest" for name in sorted(extra))
    return problems


def list_versions(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and _inside(root, p.name))


def remove_stale_staging(root: Path) -> None:
    for path in root.glob(".staging-*"):
        shutil.rmtree(path, ignore_errors=True)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
