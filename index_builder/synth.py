"""Deterministic synthetic web shop: a catalog, its visitors and their sessions, for training and load tests.

The data is meant to be learnable in the ways real shop logs are: popularity is long-tailed, visitors stick
to a few categories, consecutive items of a session resemble each other, and tastes and item trends drift,
so recent behaviour predicts the next step better than old behaviour does. The "purchases" shape is
shaped instead like a shop's order export: purchases only, most customers ordering once, re-bought
consumables, a long tail and seasonal demand (see `_purchases`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import msgspec
import numpy as np
import numpy.typing as npt

Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]
Say = Callable[[str], None]

Shape = Literal["sessions", "purchases"]
SHAPES: tuple[Shape, ...] = ("sessions", "purchases")
EVENT_NAMES = ("view", "click", "add_to_cart", "remove_from_cart", "purchase", "search")
VIEW, CLICK, ADD, REMOVE, PURCHASE, SEARCH = range(6)

# Top categories and their subcategories; tags and brands only colour titles, tags and search queries.
_CATALOG = """
electronics:phones,laptops,audio,cameras,accessories home:furniture,lighting,decor,bedding
kitchen:cookware,appliances,cutlery,storage,coffee-makers fashion:shirts,dresses,jackets,trousers,knitwear
shoes:sneakers,boots,sandals,formal-shoes beauty:skincare,makeup,fragrance,haircare
sports:fitness,cycling,running,swimming,yoga toys:puzzles,dolls,building-sets,outdoor-toys
books:fiction,cooking,travel,science,children garden:plants,garden-tools,garden-furniture,irrigation
grocery:coffee,tea,snacks,pantry pets:dog-food,cat-food,pet-toys,grooming
baby:strollers,diapers,baby-clothing,feeding office:paper,pens,desks,chairs
automotive:tires,car-parts,car-care,car-electronics music:guitars,keyboards,drums,studio
gaming:consoles,pc-games,controllers,headsets health:vitamins,first-aid,health-monitors,supplements
jewelry:rings,necklaces,watches,earrings tools:power-tools,hand-tools,measuring,safety
crafts:yarn,painting,sewing,scrapbooking travel:luggage,backpacks,travel-accessories,maps
computers:monitors,drives,networking,components bags:handbags,wallets,totes,laptop-bags
outdoor:grills,tents,hammocks,lanterns bath:towels,shower,bath-mats,organizers
movies:blu-ray,box-sets,documentaries,animation stationery:notebooks,planners,cards,calendars
lighting:lamps,bulbs,smart-lights,outdoor-lights wine:red-wine,white-wine,sparkling,wine-accessories
"""
_WORDS = """
wireless organic vintage compact premium eco budget handmade waterproof portable smart classic lightweight
durable bestseller new limited bundle refurbished kids travel gift minimalist rugged ergonomic vegan cotton
leather steel bamboo | Acme Nordvik Lumo Vexa Orbis Kito Halden Brava Quill Sora Tessel Umbra Zenit Maru Calyx
"""
_TAG_TEXT, _BRAND_TEXT = _WORDS.split("|")
_TAGS, _BRANDS = tuple(_TAG_TEXT.split()), tuple(_BRAND_TEXT.split())
# Visits cluster in the evening and thin out at night, as shop traffic does.
_HOURLY = np.array([2, 1, 1, 1, 1, 1, 2, 3, 4, 5, 5, 6, 6, 6, 6, 6, 7, 8, 9, 10, 10, 9, 6, 4]) / 119
# Mean seconds since the previous action of the session, per event type (order of EVENT_NAMES).
_GAP_SECONDS = np.array([45.0, 8.0, 20.0, 30.0, 60.0, 15.0])

DIM = 16  # latent space of items and tastes
PERIODS = 8  # popularity trend buckets over `days`: what is hot in week one is not what is hot at the end
CANDIDATES = 6  # popularity-drawn candidates per step, of which taste and the previous item pick one
MAX_STEPS = 40  # items per session, a cap on the geometric tail
TAGS_PER_SUB = 4
DAY = 86_400
SESSION_GAP = 1_800  # a user's sessions never overlap; interleaving them would blur what follows what
PROGRESS_EVERY = 100_000


class SynthSummary(msgspec.Struct, frozen=True):
    items: int
    users: int
    events: int
    items_path: str
    events_path: str
    event_counts: dict[str, int]
    abandoned_carts: int  # sessions with an add_to_cart and no purchase


@dataclass(frozen=True)
class _Catalog:
    ids: list[str]
    records: list[dict[str, object]]  # the items.jsonl lines
    phrasings: list[tuple[str, str, str]]  # search queries that lead to each item
    sub: Ints
    vec: Floats  # unit latent vectors, clustered by subcategory and top category
    centers: Floats  # top-category centres, unit length
    share: Floats  # share of items per top category
    price: Floats
    stock: Ints
    order: Ints  # items sorted by subcategory, so every (sub)category is one contiguous range
    sub_lo: Ints
    sub_hi: Ints
    top_lo: Ints
    top_hi: Ints
    cum: Floats  # per period: cumulative popularity in `order`, scaled to (p, p + 1], then concatenated
    days: int  # the span the periods divide


@dataclass(frozen=True)
class _People:
    ids: list[str]
    activity: Floats  # probability that a session belongs to each user
    pref0: Floats  # category preference at the start and at the end; tastes move between the two
    pref1: Floats
    vec0: Floats
    vec1: Floats
    favourite: Ints


def _unit(x: Floats) -> Floats:
    unit: Floats = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return unit


def _pick_rows(rng: np.random.Generator, weights: Floats) -> Ints:
    """One column index per row, drawn with probability proportional to the row's weights."""
    cum = np.cumsum(weights, axis=1)
    u = rng.random(len(weights)) * cum[:, -1]
    picked: Ints = np.minimum((cum < u[:, None]).sum(axis=1), weights.shape[1] - 1).astype(np.int64)
    return picked


def _make_catalog(rng: np.random.Generator, n: int, days: int) -> _Catalog:
    ids = [f"i{i:0{max(5, len(str(n - 1)))}d}" for i in range(n)]
    entries = _CATALOG.split()[:n]
    n_top = len(entries)
    top_names = [entry.split(":")[0] for entry in entries]
    subs = [entry.split(":")[1].split(",") for entry in entries]
    sub_names = [f"{t}/{s}" for t, ss in zip(top_names, subs, strict=True) for s in ss]
    sub_count = np.array([len(ss) for ss in subs], dtype=np.int64)
    sub_start = np.r_[0, np.cumsum(sub_count)[:-1]].astype(np.int64)
    sub_top = np.repeat(np.arange(n_top), sub_count)
    share = rng.dirichlet(np.full(n_top, 3.0)) + 1e-9
    # Every top category gets at least one item so any focus a visitor draws can be served.
    top = rng.permutation(np.r_[np.arange(n_top), rng.choice(n_top, n - n_top, p=share / share.sum())])
    sub = sub_start[top] + (rng.random(n) * sub_count[top]).astype(np.int64)
    sibling = sub_start[top] + (sub - sub_start[top] + rng.integers(1, sub_count[top])) % sub_count[top]
    sub2 = np.where(rng.random(n) < 0.15, sibling, -1)

    centers = rng.normal(size=(n_top, DIM))
    sub_centers = centers[sub_top] + 0.6 * rng.normal(size=(len(sub_names), DIM))
    vec = _unit(sub_centers[sub] + 0.5 * rng.normal(size=(n, DIM)))

    mu = rng.uniform(math.log(8), math.log(400), n_top)[sub_top] + 0.3 * rng.normal(size=len(sub_names))
    sigma = rng.uniform(0.3, 0.7, n_top)
    price = np.maximum(np.round(np.exp(mu[sub] + sigma[top] * rng.normal(size=n)), 2), 0.99)
    stock = np.where(rng.random(n) < 0.08, 0, rng.geometric(1 / 25, n)).astype(np.int64)

    # Tags mostly come from a few per subcategory, so tag words in a query point at a neighbourhood.
    sub_tags = rng.integers(0, len(_TAGS), (len(sub_names), TAGS_PER_SUB))
    own = sub_tags[sub[:, None], rng.integers(0, TAGS_PER_SUB, (n, 3))]
    tags = np.where(rng.random((n, 3)) < 0.8, own, rng.integers(0, len(_TAGS), (n, 3))).tolist()
    ntags = rng.integers(1, 4, n).tolist()
    brand, letter, number = (rng.integers(lo, hi, n).tolist() for lo, hi in ((0, len(_BRANDS)), (0, 26), (10, 1000)))
    prices, stocks = price.tolist(), stock.tolist()
    records: list[dict[str, object]] = []
    phrasings: list[tuple[str, str, str]] = []
    for i, (t, s, s2) in enumerate(zip(top.tolist(), sub.tolist(), sub2.tolist(), strict=True)):
        words = list(dict.fromkeys(_TAGS[w] for w in tags[i][: ntags[i]]))
        noun = sub_names[s].split("/")[1].replace("-", " ")
        title = f"{_BRANDS[brand[i]]} {words[0].title()} {noun.title()} {chr(65 + letter[i])}{number[i]}"
        categories = [sub_names[s]] if s2 < 0 else [sub_names[s], sub_names[s2]]
        records.append(
            {"item_id": ids[i], "title": title, "categories": categories, "tags": words,
             "price": prices[i], "stock": stocks[i]}
        )  # fmt: skip
        phrasings.append((noun, f"{words[0]} {noun}", f"{top_names[t]} {words[0]}"))

    # Zipf base popularity times a per-period random walk: a long tail that also trends.
    base = (rng.permutation(n) + 1.0) ** -1.0
    trend = np.exp(np.cumsum(rng.normal(0, 0.4, (PERIODS, n)), axis=0))
    order = np.argsort(sub, kind="stable")
    pop = (base * trend)[:, order]
    cum = (np.cumsum(pop, axis=1) / pop.sum(axis=1, keepdims=True) + np.arange(PERIODS)[:, None]).ravel()
    sub_lo = np.searchsorted(sub[order], np.arange(len(sub_names)), "left").astype(np.int64)
    sub_hi = np.searchsorted(sub[order], np.arange(len(sub_names)), "right").astype(np.int64)
    top_lo, top_hi = sub_lo[sub_start], sub_hi[sub_start + sub_count - 1]
    return _Catalog(
        ids, records, phrasings, sub, vec, _unit(centers), share / share.sum(), price, stock, order,
        sub_lo, sub_hi, top_lo, top_hi, cum, days,
    )  # fmt: skip


def _make_people(rng: np.random.Generator, n: int, cat: _Catalog) -> _People:
    ids = [f"u{u:0{max(4, len(str(n - 1)))}d}" for u in range(n)]
    n_top = len(cat.share)
    k = min(3, n_top)
    activity = rng.lognormal(0.0, 1.2, n)  # a few heavy visitors, many light ones
    favs = np.argsort(-(np.log(cat.share) + rng.gumbel(size=(n, n_top))), axis=1)[:, :k]
    weights = rng.dirichlet(np.array([3.0, 1.5, 0.7])[:k], n)
    rows = np.arange(n)[:, None]
    pref0 = np.tile(0.1 * cat.share, (n, 1))
    pref0[rows, favs] += 0.9 * weights
    # Drift: over the whole span a visitor moves a quarter of their interest to a new category.
    new = _pick_rows(rng, np.tile(cat.share, (n, 1)))
    pref1 = 0.75 * pref0
    pref1[np.arange(n), new] += 0.25
    vec0 = _unit((weights[:, :, None] * cat.centers[favs]).sum(axis=1) + 0.35 * rng.normal(size=(n, DIM)))
    vec1 = _unit(vec0 + 0.5 * cat.centers[new] + 0.25 * rng.normal(size=(n, DIM)))
    return _People(ids, activity / activity.sum(), pref0, pref1, vec0, vec1, np.argmax(pref0, axis=1))


def _sample(rng: np.random.Generator, cat: _Catalog, period: Ints, lo: Ints, hi: Ints) -> Ints:
    """CANDIDATES items per row from positions [lo, hi) of `order`, by the period's popularity."""
    base = period * len(cat.order)
    # For lo == 0 the index wraps or falls into the previous period, whose last value is `period` anyway.
    left = np.where(lo > 0, cat.cum[base + lo - 1], period.astype(np.float64))
    right = cat.cum[base + hi - 1]
    u = left[:, None] + rng.random((len(lo), CANDIDATES)) * (right - left)[:, None]
    pos = np.searchsorted(cat.cum, u, side="right") - base[:, None]
    items: Ints = cat.order[np.clip(pos, lo[:, None], hi[:, None] - 1)]
    return items


@dataclass(frozen=True)
class _Batch:
    user: Ints  # per session
    start: Ints  # per session, seconds after `start`, before overlaps are resolved
    sess: Ints  # per row, sorted by session then order within it
    item: Ints
    event: Ints
    variant: Ints  # which phrasing a search query uses
    offset: Ints  # seconds since the session's first row


def _simulate(
    rng: np.random.Generator, n: int, cat: _Catalog, people: _People, report: Callable[[int], None]
) -> _Batch:
    """`n` sessions; `report` hears how many rows the batch has so far after every step."""
    user = rng.choice(len(people.activity), n, p=people.activity)
    t = rng.integers(0, cat.days, n) * DAY + rng.choice(24, n, p=_HOURLY) * 3600
    t = t + rng.integers(0, 3600, n)
    frac = t / (cat.days * DAY)
    period = np.minimum((frac * PERIODS).astype(np.int64), PERIODS - 1)
    f = frac[:, None]
    pref = (1 - f) * people.pref0[user] + f * people.pref1[user]
    taste = _unit((1 - f) * people.vec0[user] + f * people.vec1[user])
    focus1, focus2 = _pick_rows(rng, pref), _pick_rows(rng, pref)
    steps = np.minimum(rng.geometric(1 / 6, n), MAX_STEPS)
    # A quarter of sessions turn to a second category part-way; MAX_STEPS means never.
    switch = np.where(rng.random(n) < 0.25, rng.integers(1, MAX_STEPS, n), MAX_STEPS)

    prev = np.full(n, -1, dtype=np.int64)
    parts: list[tuple[Ints, Ints, Ints, Bools, Bools, Bools]] = []
    rows = 0
    for k in range(int(steps.max())):
        act = np.flatnonzero(steps > k)
        a = len(act)
        last = prev[act]
        has = last >= 0
        focus = np.where(switch[act] <= k, focus2[act], focus1[act])
        # One step in twenty wanders off to any category, as visitors do between intents.
        wander = rng.random(a) < 0.05
        focus = np.where(wander, rng.choice(len(cat.share), a, p=cat.share), focus)
        stay = has & ~wander & (switch[act] != k) & (rng.random(a) < 0.7)
        last_sub = cat.sub[np.maximum(last, 0)]
        lo = np.where(stay, cat.sub_lo[last_sub], cat.top_lo[focus])
        hi = np.where(stay, cat.sub_hi[last_sub], cat.top_hi[focus])
        cand = _sample(rng, cat, period[act], lo, hi)
        cvec = cat.vec[cand]
        score = 2.5 * np.einsum("akd,ad->ak", cvec, taste[act]) + rng.gumbel(size=cand.shape)
        # Similar to the previous item scores higher; the very same item again, lower.
        last_vec = cat.vec[np.maximum(last, 0)]
        near = 4.0 * np.einsum("akd,ad->ak", cvec, last_vec) - 3.0 * (cand == last[:, None])
        score += np.where(has[:, None], near, 0.0)
        item = cand[np.arange(a), np.argmax(score, axis=1)]
        prev[act] = item
        affinity = np.einsum("ad,ad->a", cat.vec[item], taste[act])
        search = rng.random(a) < (0.25 if k == 0 else 0.06)
        click = rng.random(a) < np.clip(0.35 + 0.25 * affinity, 0.05, 0.9)
        p_add = np.clip(0.25 + 0.2 * affinity, 0.02, 0.8) * np.where(cat.stock[item] == 0, 0.05, 1.0)
        add = click & (rng.random(a) < p_add)
        parts.append((act, np.full(a, k, dtype=np.int64), item, search, click, add))
        rows += a + int(search.sum() + click.sum() + add.sum())
        report(rows)

    sess, step, item, search, click, add = (np.concatenate(column) for column in zip(*parts, strict=True))
    remove = add & (rng.random(len(add)) < 0.1)
    checkout = rng.random(n) < 0.55  # otherwise the cart is abandoned
    purchase = add & ~remove & checkout[sess]
    # Sort keys inside a session: per step search, view, click, add; then removals, then the checkout.
    masks = (search, np.ones(len(sess), dtype=bool), click, add, remove, purchase)
    keys = (step * 4, step * 4 + 1, step * 4 + 2, step * 4 + 3, 4 * MAX_STEPS + step, 5 * MAX_STEPS + step)
    codes = (SEARCH, VIEW, CLICK, ADD, REMOVE, PURCHASE)
    r_sess = np.concatenate([sess[m] for m in masks])
    r_key = np.concatenate([key[m] for key, m in zip(keys, masks, strict=True)])
    r_item = np.concatenate([item[m] for m in masks])
    r_event = np.concatenate([np.full(int(m.sum()), c) for m, c in zip(masks, codes, strict=True)])
    order = np.lexsort((r_key, r_sess))
    r_sess, r_item, r_event = r_sess[order], r_item[order], r_event[order]
    variant = np.where(r_event == SEARCH, rng.integers(0, 3, len(order)), 0)

    gap = 1 + (rng.exponential(1.0, len(order)) * _GAP_SECONDS[r_event]).astype(np.int64)
    first = np.r_[True, r_sess[1:] != r_sess[:-1]]
    gap[first] = 0
    csum = np.cumsum(gap)
    offset = csum - csum[np.flatnonzero(first)][np.cumsum(first) - 1]
    return _Batch(user, t, r_sess, r_item, r_event, variant, offset)


def _resolve_overlaps(user: Ints, start: Ints, duration: Ints) -> Ints:
    """Session starts moved later where needed so a user's sessions follow each other with a gap."""
    order = np.lexsort((start, user))
    u, s, d = user[order], start[order], duration[order] + SESSION_GAP
    new_user = np.diff(u, prepend=-1) != 0
    before = np.cumsum(d) - d
    before = before - before[np.flatnonzero(new_user)][np.cumsum(new_user) - 1]
    # start'_i = max(start_i, start'_{i-1} + d_{i-1}) is a running max of start_i - before_i per user;
    # a large per-user offset keeps the running max from crossing user boundaries.
    lift = u * (1 << 40)
    moved = np.maximum.accumulate(s - before + lift) - lift + before
    result = np.empty_like(start)
    result[order] = moved
    return result


@dataclass(frozen=True)
class _Rows:
    user: Ints
    item: Ints
    event: Ints
    variant: Ints
    ts: Ints  # epoch seconds


def _join(batches: list[_Batch], events: int, days: int, epoch0: float) -> tuple[_Rows, Ints]:
    """The first `events` rows of all batches, in time order, and the session of each row."""
    shift = np.cumsum([0] + [len(b.user) for b in batches])
    sess = np.concatenate([b.sess + s for b, s in zip(batches, shift[:-1], strict=True)])[:events]
    offset = np.concatenate([b.offset for b in batches])[:events]
    n_sess = int(sess[-1]) + 1 if events else 0
    user = np.concatenate([b.user for b in batches])[:n_sess]
    duration = np.zeros(n_sess, dtype=np.int64)
    ends = np.flatnonzero(np.r_[sess[1:] != sess[:-1], events > 0])
    duration[sess[ends]] = offset[ends]
    start = _resolve_overlaps(user, np.concatenate([b.start for b in batches])[:n_sess], duration)
    first = math.ceil(epoch0)
    # Clipping to the end of the span is monotone, so the order within a user's sessions survives.
    ts = first + np.minimum(start[sess] + offset, math.floor(epoch0 + days * DAY) - first)
    order = np.argsort(ts, kind="stable")
    item = np.concatenate([b.item for b in batches])[:events][order]
    event = np.concatenate([b.event for b in batches])[:events][order]
    variant = np.concatenate([b.variant for b in batches])[:events][order]
    return _Rows(user[sess[order]], item, event, variant, ts[order]), sess[order]


# The purchase-only shape: what a shop's order export holds. Most customers order once, a few come
# back often; consumables are bought again; demand follows the seasons (each top category peaks at
# its own time of year) on top of the long-tailed, trending popularity of the catalog.
ONE_ORDER_SHARE = 0.6  # customers who never come back
REPEAT_SHARE = 0.25  # lines of a returning customer's order that re-buy something they bought before
SEASON_STRENGTH = 0.8  # a category sells up to (1 + s) / (1 - s) times as well in season as out of it
HISTORY = 16  # earlier purchases a re-buy may pick from (the latest ones)


def _purchases(
    rng: np.random.Generator, cat: _Catalog, people: _People, *, events: int, epoch0: float, margin: float
) -> tuple[_Rows, Ints]:
    """Purchase rows (user, item, time) in time order and each row's order number: at most
    `events`, about `events` * `margin` before the surplus is cut."""
    n_users = len(people.ids)
    n_top = len(cat.share)
    top_of = np.searchsorted(cat.top_lo, np.argsort(cat.order), side="right") - 1
    phase = rng.random(n_top)
    lines_per_order = 1.0 / 0.6
    # Returning customers' extra orders, lognormal: a long tail of regulars. Scaled to the target.
    returning = rng.random(n_users) >= ONE_ORDER_SHARE
    spread = rng.lognormal(0.0, 1.0, n_users) * people.activity * n_users
    wanted_orders = events / lines_per_order * margin
    extra_mean = np.where(returning, spread, 0.0)
    extra_mean *= max(wanted_orders - n_users, 0.0) / max(extra_mean.sum(), 1e-9)
    orders = 1 + rng.poisson(extra_mean)
    span = cat.days * DAY
    # Each customer's order times, uniform over the span and sorted: the k-th order of customer u
    # is at times[start[u] + k].
    owner = np.repeat(np.arange(n_users), orders)
    times = rng.random(len(owner)) * span
    times = times[np.lexsort((times, owner))]
    start = np.r_[0, np.cumsum(orders)[:-1]]
    history = np.full((n_users, HISTORY), -1, dtype=np.int64)
    bought = np.zeros(n_users, dtype=np.int64)
    users_out: list[Ints] = []
    items_out: list[Ints] = []
    times_out: list[Ints] = []
    orders_out: list[Ints] = []
    order_id = 0
    for k in range(int(orders.max())):
        act = np.flatnonzero(orders > k)
        lines = rng.geometric(0.6, len(act))
        user = np.repeat(act, lines)
        when = np.repeat(times[start[act] + k], lines)
        number = np.repeat(order_id + np.arange(len(act)), lines)
        order_id += len(act)
        frac = (when / span)[:, None]
        season = 1.0 + SEASON_STRENGTH * np.sin(2 * np.pi * (when[:, None] / (365.0 * DAY) + phase[None, :]))
        pref = ((1 - frac) * people.pref0[user] + frac * people.pref1[user]) * season
        focus = _pick_rows(rng, pref)
        period = np.minimum((frac[:, 0] * PERIODS).astype(np.int64), PERIODS - 1)
        cand = _sample(rng, cat, period, cat.top_lo[focus], cat.top_hi[focus])
        taste = _unit((1 - frac) * people.vec0[user] + frac * people.vec1[user])
        score = 2.5 * np.einsum("akd,ad->ak", cat.vec[cand], taste) + rng.gumbel(size=cand.shape)
        score += np.log(season[np.arange(len(user))[:, None], top_of[cand]])
        item = cand[np.arange(len(user)), np.argmax(score, axis=1)]
        known = np.minimum(bought[user], HISTORY)
        again = (known > 0) & (rng.random(len(user)) < REPEAT_SHARE)
        pick = (rng.random(len(user)) * np.maximum(known, 1)).astype(np.int64)
        item = np.where(again, history[user, pick], item)
        line = np.arange(len(user)) - np.repeat(np.cumsum(lines) - lines, lines)
        for j in range(int(lines.max())):  # one line per customer at a time: no lost updates
            these = user[line == j]
            history[these, bought[these] % HISTORY] = item[line == j]
            bought[these] += 1
        users_out.append(user)
        items_out.append(item)
        times_out.append(when.astype(np.int64))
        orders_out.append(number)
    user, item, ts, number = (np.concatenate(parts) for parts in (users_out, items_out, times_out, orders_out))
    if len(user) > events:  # cut the surplus: random lines, so no stretch of time thins out
        keep = np.sort(rng.choice(len(user), events, replace=False))
        user, item, ts, number = user[keep], item[keep], ts[keep], number[keep]
    order = np.lexsort((number, ts.astype(np.int64)))
    first_second = math.ceil(epoch0)
    rows = _Rows(
        user[order], item[order], np.full(len(order), PURCHASE, dtype=np.int64),
        np.zeros(len(order), dtype=np.int64), first_second + ts[order],
    )  # fmt: skip
    return rows, number[order]


def _write_events(path: Path, cat: _Catalog, people: _People, rows: _Rows, say: Say) -> None:
    """CSV lines built column-wise per chunk; a csv.writer or per-row validation would dominate the run."""
    user_col = np.array(people.ids, dtype=object)
    item_col = np.array([*cat.ids, ""], dtype=object)
    price_col = np.array([*(f"{p:.2f}" for p in cat.price), ""], dtype=object)
    name_col = np.array(EVENT_NAMES, dtype=object)
    n, none = len(rows.event), len(cat.ids)  # `none` indexes the trailing ""
    width = max(7, len(str(n)))
    report_every = max(PROGRESS_EVERY, -(-n // 10))  # about ten lines however large the file
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write("event_id,user_id,item_id,event,timestamp,value,query\n")
        for lo in range(0, n, PROGRESS_EVERY):
            hi = min(lo + PROGRESS_EVERY, n)
            ev, item = rows.event[lo:hi], rows.item[lo:hi]
            shown = np.where(ev == SEARCH, none, item)
            value = np.where((ev == ADD) | (ev == PURCHASE), item, none)
            when = np.datetime_as_string(rows.ts[lo:hi].astype("datetime64[s]"), unit="s").tolist()
            query = np.full(hi - lo, "", dtype=object)
            searched = np.flatnonzero(ev == SEARCH)
            pairs = zip(item[searched].tolist(), rows.variant[lo:hi][searched].tolist(), strict=True)
            query[searched] = [cat.phrasings[i][v] for i, v in pairs]
            event_ids = [f"e{i:0{width}d}" for i in range(lo + 1, hi + 1)]
            users, prices = user_col[rows.user[lo:hi]], price_col[value]
            columns = zip(event_ids, users, item_col[shown], name_col[ev], when, prices, query, strict=True)
            out.write("".join([f"{i},{u},{t},{e},{w}Z,{v},{q}\n" for i, u, t, e, w, v, q in columns]))
            if hi == n or hi // report_every > lo // report_every:
                say(f"events.csv: {hi:,}/{n:,} rows written")


def generate(
    out_dir: Path,
    *,
    users: int = 2000,
    items: int = 5000,
    events: int = 100_000,
    seed: int = 0,
    days: int = 90,
    start: datetime = datetime(2026, 1, 1, tzinfo=UTC),
    progress: Callable[[str], None] | None = None,
    shape: Shape = "sessions",
) -> SynthSummary:
    """Write items.jsonl, users.csv (favourite_category indexes the top categories) and events.csv.

    events.csv holds exactly `events` rows in time order; naive `start` is taken as UTC. The
    "sessions" shape is a shop's behaviour log (searches, views, clicks, carts, purchases); the
    "purchases" shape only its orders (see `_purchases`).
    """
    if users < 1 or items < 1 or events < 0 or days < 1:
        raise ValueError("users, items and days must be positive and events non-negative")
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}")

    def say(message: str) -> None:
        if progress is not None:
            progress(message)

    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    say(f"catalog: {items:,} items")
    cat = _make_catalog(rng, items, days)
    items_path = out_dir / "items.jsonl"
    items_path.write_bytes(msgspec.json.Encoder().encode_lines(cat.records))
    say(f"users: {users:,}")
    people = _make_people(rng, users, cat)
    lines = [f"{u},{f}\n" for u, f in zip(people.ids, people.favourite.tolist(), strict=True)]
    (out_dir / "users.csv").write_text("user_id,favourite_category\n" + "".join(lines), encoding="utf-8")

    epoch0 = (start if start.tzinfo else start.replace(tzinfo=UTC)).timestamp()
    if shape == "purchases":
        say(f"orders: {events:,} purchase lines")
        margin = 1.2
        rows, sess = _purchases(rng, cat, people, events=events, epoch0=epoch0, margin=margin)
        while len(rows.user) < events:  # the orders came short of the target: draw more
            margin *= 1.5
            rows, sess = _purchases(rng, cat, people, events=events, epoch0=epoch0, margin=margin)
        return _written(out_dir, items_path, cat, people, rows=rows, sess=sess, say=say)
    # Batches of sessions until there are enough rows; the surplus, at most part of a batch, is cut.
    batches: list[_Batch] = []
    done, per_session, shown = 0, 8.0, 0

    def simulated(rows: int) -> None:
        nonlocal shown
        if min(done + rows, events) // PROGRESS_EVERY > shown:
            shown = min(done + rows, events) // PROGRESS_EVERY
            say(f"sessions: {min(done + rows, events):,}/{events:,} events simulated")

    while not batches or done < events:
        n = int((events - done) / per_session * 1.1) + 32
        batches.append(_simulate(rng, n, cat, people, simulated))
        done += len(batches[-1].sess)
        per_session = max(1.0, len(batches[-1].sess) / n)
    say("timestamps: ordering sessions")
    rows, sess = _join(batches, events, days, epoch0)
    return _written(out_dir, items_path, cat, people, rows=rows, sess=sess, say=say)


def _written(
    out_dir: Path, items_path: Path, cat: _Catalog, people: _People, *, rows: _Rows, sess: Ints, say: Say
) -> SynthSummary:
    """events.csv written from `rows`, and the summary of what was generated."""
    events_path = out_dir / "events.csv"
    _write_events(events_path, cat, people, rows, say)

    counts = np.bincount(rows.event, minlength=len(EVENT_NAMES)).tolist()
    n_sess = int(sess.max(initial=-1)) + 1
    carted = np.bincount(sess[rows.event == ADD], minlength=n_sess) > 0
    bought = np.bincount(sess[rows.event == PURCHASE], minlength=n_sess) > 0
    event_counts = dict(zip(EVENT_NAMES, counts, strict=True))
    abandoned = int((carted & ~bought).sum())
    return SynthSummary(
        len(cat.ids), len(people.ids), len(rows.user), str(items_path), str(events_path), event_counts, abandoned
    )
