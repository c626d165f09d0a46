"""Input formats: raw rows with their line numbers, or a parse error naming the line.

Readers only split files into rows; validation against the declared schema happens in `clean`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import msgspec

Format = Literal["auto", "csv", "jsonl", "movielens"]
FORMATS: tuple[str, ...] = ("auto", "csv", "jsonl", "movielens")

Row = dict[str, Any]


class ParseError(msgspec.Struct, frozen=True):
    line: int
    reason: str


class InputError(Exception):
    """The input cannot be read at all (missing file, unknown format): the build cannot proceed."""


def _resolve(path: Path, fmt: Format) -> Format:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    raise InputError(f"{path}: cannot tell the format from the file name; pass --format csv|jsonl|movielens")


def _csv_rows(path: Path) -> Iterator[tuple[int, Row | ParseError]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            return
        except (csv.Error, UnicodeDecodeError) as exc:
            raise InputError(f"{path}:1: unreadable header: {exc}") from exc
        width = len(header)
        line = 1
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as exc:
                line = reader.line_num
                yield line, ParseError(line, f"malformed CSV: {exc}")
                continue
            line = reader.line_num
            if not fields:
                continue
            if len(fields) != width:
                yield line, ParseError(line, f"malformed CSV: expected {width} fields, got {len(fields)}")
                continue
            # An empty CSV cell means "absent", so optional fields fall back to their defaults.
            yield line, {key: value for key, value in zip(header, fields, strict=True) if value != ""}


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Row | ParseError]]:
    decoder = msgspec.json.Decoder()
    with path.open("rb") as handle:
        for line, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                value = decoder.decode(raw)
            except msgspec.DecodeError as exc:
                yield line, ParseError(line, f"malformed JSON: {exc}")
                continue
            if not isinstance(value, dict):
                yield line, ParseError(line, f"expected a JSON object, got {type(value).__name__}")
                continue
            yield line, value


def read_rows(path: Path, fmt: Format = "auto") -> Iterator[tuple[int, Row | ParseError]]:
    """Rows of a generic CSV or JSONL file of interactions or items."""
    resolved = _resolve(path, fmt)
    if resolved == "jsonl":
        return _jsonl_rows(path)
    return _csv_rows(path)


def movielens_ratings(path: Path) -> Iterator[tuple[int, Row | ParseError]]:
    """ratings.csv (userId, movieId, rating, timestamp) as interactions of type "rating"."""
    for line, row in _csv_rows(path):
        if isinstance(row, ParseError):
            yield line, row
            continue
        yield (
            line,
            {
                "user_id": row.get("userId"),
                "item_id": row.get("movieId"),
                "event": "rating",
                "value": row.get("rating"),
                "timestamp": row.get("timestamp"),
            },
        )


def movielens_movies(path: Path) -> Iterator[tuple[int, Row | ParseError]]:
    """movies.csv (movieId, title, genres) as items; tags.csv beside it, if present, adds tags."""
    tags: dict[str, list[str]] = {}
    tags_path = path.with_name("tags.csv")
    if tags_path.exists():
        for _, row in _csv_rows(tags_path):
            if isinstance(row, dict) and row.get("movieId") and row.get("tag"):
                movie_tags = tags.setdefault(row["movieId"], [])
                tag = str(row["tag"]).strip().lower()
                if tag not in movie_tags:
                    movie_tags.append(tag)
    for line, row in _csv_rows(path):
        if isinstance(row, ParseError):
            yield line, row
            continue
        genres = [g for g in str(row.get("genres", "")).split("|") if g and g != "(no genres listed)"]
        movie_id = row.get("movieId")
        yield (
            line,
            {
                "item_id": movie_id,
                "title": row.get("title", ""),
                "categories": genres,
                "tags": tags.get(str(movie_id), []),
            },
        )


def interaction_rows(path: Path, fmt: Format = "auto") -> Iterator[tuple[int, Row | ParseError]]:
    _resolve(path, fmt)
    if fmt == "movielens":
        return movielens_ratings(path)
    return read_rows(path, fmt)


def item_rows(path: Path, fmt: Format = "auto") -> Iterator[tuple[int, Row | ParseError]]:
    _resolve(path, fmt)
    if fmt == "movielens":
        return movielens_movies(path)
    return _items_with_lists(read_rows(path, fmt))


def _items_with_lists(rows: Iterator[tuple[int, Row | ParseError]]) -> Iterator[tuple[int, Row | ParseError]]:
    """CSV cells hold lists as "a|b|c" (or a JSON array); JSONL rows already hold real lists."""
    for line, row in rows:
        if isinstance(row, dict):
            for key in ("categories", "tags"):
                value = row.get(key)
                if isinstance(value, str):
                    row[key] = _split_list(value)
        yield line, row


def _split_list(cell: str) -> list[str] | str:
    if cell.startswith("["):
        try:
            parsed = json.loads(cell)
        except json.JSONDecodeError:
            return cell  # left as a string, so validation rejects it with the field's name
        return parsed if isinstance(parsed, list) else cell
    return [part.strip() for part in cell.split("|") if part.strip()]
