"""The demo shop page (`GET /demo`) and the browser snippet's files (`GET /client/...`).

The page is a small shop over the served snapshot's catalog that uses client_js exactly as a site
would: browsing and adding to cart change its "Recommended for you" panel live over the WebSocket,
each pick with its reasons, behind a consent banner. Files are read once, when the app is made.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from gateway.snapshot import Snapshot

PACKAGE = Path(__file__).resolve().parent.parent  # gateway/
PAGE = PACKAGE / "static" / "demo.html"
CLIENT_DIST = PACKAGE / "static" / "client"  # package data: client_js/build.mjs writes it
CLIENT_FILES = ("tailor.min.js", "tailor.esm.min.js")
PER_CATEGORY = 24


class DemoItem(msgspec.Struct, frozen=True):
    id: str
    title: str
    categories: list[str]


class DemoCatalog(msgspec.Struct, frozen=True):
    """What the demo page shows: top-level categories and their most popular items."""

    snapshot: str
    categories: list[str]
    items: list[DemoItem]


def catalog(snap: Snapshot) -> DemoCatalog:
    tops = sorted(name for name in snap.category_rows if "/" not in name and name in snap.popular)
    seen: set[int] = set()
    items: list[DemoItem] = []
    for name in tops:
        for row in snap.popular[name][:PER_CATEGORY].tolist():
            if row not in seen:
                seen.add(row)
                items.append(DemoItem(snap.item_ids[row], snap.titles[row], snap.categories[row]))
    return DemoCatalog(snap.version, tops, items)


def read_files() -> tuple[bytes, dict[str, bytes]]:
    """The page, and the snippet builds that exist (committed, and package data of a wheel; a tree
    without them serves the page with a note that the script is missing)."""
    scripts = {name: (CLIENT_DIST / name).read_bytes() for name in CLIENT_FILES if (CLIENT_DIST / name).is_file()}
    return PAGE.read_bytes(), scripts
