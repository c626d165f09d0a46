"""The `tailor` command: one entry point, a subcommand per role."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import msgspec

from gateway import __version__
from gateway.privacy import keys as privacy
from gateway.privacy import tokens
from gateway.serve import serve
from gateway.settings import FIELDS, Settings, SettingsError, resolve
from index_builder import snapshot
from index_builder.build import BuildConfig, BuildResult, QualityGateError, Stopwatch, build
from index_builder.event_log import collect
from index_builder.readers import FORMATS, InputError
from index_builder.schema import DEFAULT_EVENT_WEIGHTS
from index_builder.synth import SHAPES, generate
from index_builder.train import Pins
from tailor import catalog_import

DEFAULT_SNAPSHOTS = Path("var/snapshots")


def _weight(text: str) -> tuple[str, float]:
    event, sep, value = text.partition("=")
    try:
        if not sep or not event:
            raise ValueError
        return event, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected EVENT=WEIGHT (e.g. purchase=8), got {text!r}") from None


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be zero or more, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _share(text: str) -> float:
    value = _non_negative(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _add_synth(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "synth",
        help="generate a synthetic shop (items, users, behaviour events)",
        description="Generate a deterministic synthetic shop: items.jsonl, events.csv and users.csv in --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("var/shop"), help="directory to write into")
    p.add_argument("--users", type=_positive, default=2000, help="number of visitors")
    p.add_argument("--items", type=_positive, default=5000, help="number of catalog items")
    p.add_argument("--events", type=_positive, default=100_000, help="number of events")
    p.add_argument("--days", type=_positive, default=90, help="time span of the events")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files")
    p.add_argument(
        "--shape",
        choices=SHAPES,
        default="sessions",
        help="sessions: a behaviour log (views, clicks, carts, purchases); purchases: orders only, most "
        "customers ordering once, repeat purchases, seasonal demand",
    )


def _add_build(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "build",
        help="build, evaluate and publish a snapshot from interaction logs",
        description=(
            "Read interactions (and items), clean them, tune and train the model, evaluate it on a "
            "temporal hold-out against popularity, build the nearest-neighbour index and publish a "
            "versioned snapshot. Exits 1 on unusable input, 2 when the quality gate refuses."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--events",
        type=Path,
        action="append",
        default=[],
        help="interactions file (CSV or JSONL: user_id,item_id,event,timestamp[,value,event_id]); "
        "repeat for several; with --format movielens, ratings.csv",
    )
    p.add_argument(
        "--event-log",
        action="append",
        default=[],
        metavar="SOURCE",
        help="the gateway's event log: its directory of events-*.jsonl (memory:// store, setting event_log) "
        "or its Redis, e.g. redis://127.0.0.1:6379/0 (add ?prefix=... for another key prefix); repeatable, "
        "and combines with --events",
    )
    p.add_argument(
        "--items",
        type=Path,
        help="items file (CSV or JSONL: item_id,title,categories,tags,price,...); "
        "with --format movielens, movies.csv (tags.csv beside it is used too)",
    )
    p.add_argument(
        "--catalog",
        action="append",
        default=[],
        metavar="SOURCE",
        help="the gateway's live catalog (items changed through /v1/items), laid over --items: its "
        "catalog_file (memory:// store, e.g. var/catalog.jsonl) or its Redis, e.g. redis://127.0.0.1:6379/0 "
        "(add ?prefix=... for another key prefix); retired items and their interactions are left out",
    )
    p.add_argument("--format", choices=FORMATS, default="auto", help="input format; auto goes by file extension")
    p.add_argument("--out", type=Path, default=DEFAULT_SNAPSHOTS, help="snapshot root directory")
    p.add_argument(
        "--weight",
        type=_weight,
        action="append",
        default=[],
        metavar="EVENT=W",
        help="weight of an event type (repeatable; adds custom types). Defaults: "
        + ", ".join(f"{k}={v:g}" for k, v in DEFAULT_EVENT_WEIGHTS.items()),
    )
    p.add_argument(
        "--max-trials",
        type=_positive,
        default=20,
        help="ALS fits the hyperparameter search may spend (two per setting: one per validation split)",
    )
    pin = p.add_argument_group(
        "expert pins", "fix a choice the tuner otherwise makes on its validation splits (it still chooses the rest)"
    )
    pin.add_argument("--factors", type=_positive, help="ALS latent factors")
    pin.add_argument("--regularization", type=_non_negative, help="ALS regularization")
    pin.add_argument("--alpha", type=_non_negative, help="ALS confidence scale")
    pin.add_argument("--half-life", type=_non_negative, help="recency half-life in events (0: no decay)")
    pin.add_argument(
        "--long-term-share", type=_share, help="share of an event's weight that never decays (0..1; the rest decays)"
    )
    pin.add_argument(
        "--item-model",
        choices=("als", "ease", "rp3"),
        help="rank known users with ALS, EASE or RP3beta (EASE only where it fits: see docs/builder.md)",
    )
    pin.add_argument(
        "--content-weight",
        type=_non_negative,
        help="weight of the category rows in ALS's input (0: interactions only; see docs/builder.md)",
    )
    pin.add_argument(
        "--ease-regularization",
        type=_positive_float,
        metavar="LAMBDA",
        help="EASE's λ wherever the tuner tries EASE (with --item-model ease: always)",
    )
    pin.add_argument(
        "--ease-content-weight",
        type=_non_negative,
        help="weight of the category rows in EASE's input (0: interactions only), wherever EASE is tried",
    )
    pin.add_argument(
        "--ease-visit-weight",
        type=_non_negative,
        help="weight of the visit rows in EASE's input (each visit's items as one more row; 0: none)",
    )
    p.add_argument("--iterations", type=_positive, default=15, help="ALS iterations")
    p.add_argument(
        "--target-recall",
        type=float,
        default=0.95,
        help="recall@10 against exact search the index tuner must reach",
    )
    p.add_argument(
        "--precompute-users",
        type=int,
        default=200_000,
        help="precompute the best items of this many known users (the most active), so the gateway serves "
        "them without searching; 0 to search for every user online",
    )
    p.add_argument("--pool-size", type=_positive, default=200, help="items precomputed per user")
    p.add_argument(
        "--neighbours",
        type=int,
        default=100,
        help="similar items precomputed per item (0: none; skipped above 300,000 items, where the "
        "gateway searches online)",
    )
    p.add_argument(
        "--segments",
        type=int,
        default=5,
        metavar="K",
        help="cluster users into K behavioural segments (recency, frequency, purchases, category affinity) "
        "that the gateway assigns visitors to as model:0..model:K-1; 0: none",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--force", action="store_true", help="publish even if the model does worse than popularity")
    p.add_argument("--report-json", type=Path, help="also write the full build report as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _add_snapshots(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("snapshots", help="list or verify published snapshots")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (("list", "list snapshot versions, newest last"), ("verify", "check files against the manifest")):
        q = actions.add_parser(name, help=text, description=text)
        q.add_argument("--root", type=Path, default=DEFAULT_SNAPSHOTS, help="snapshot root directory")
        if name == "verify":
            q.add_argument("version", nargs="?", help="version to verify (default: current); 'all' for every one")


SERVE_EPILOG = """\
configuration (lowest to highest precedence): built-in defaults, the config file (--config, or
TAILOR_CONFIG), environment variables TAILOR_<NAME> (e.g. TAILOR_STORE=redis://127.0.0.1:6379/0;
a list as a JSON array or comma-separated: TAILOR_PUBLIC_KEYS=pk_1,pk_2), then these flags.
tailor.toml in the repository lists every setting with its default:

{settings}

endpoints: GET /v1/recommend, /v1/items/{{id}}/similar, /v1/popular, POST /v1/events,
POST /v1/token, WS /v1/stream (live pushes), /healthz, /readyz, /metrics, POST /admin/reload,
/openapi.json, /docs (the API as a page).
"""


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    defaults = Settings()
    listing = "\n".join(f"  {name:22} {getattr(defaults, name)!r}" for name in FIELDS)
    p = sub.add_parser(
        "serve",
        help="serve recommendations over HTTP from the current snapshot",
        description=(
            "Start the gateway (uvicorn with uvloop and httptools). It serves the snapshot that "
            "SNAPSHOTS/CURRENT names, swaps in a new one when the pointer changes (or on POST "
            "/admin/reload), and keeps per-visitor state in the store."
        ),
        epilog=SERVE_EPILOG.format(settings=listing),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="TOML config file (see tailor.toml)")
    p.add_argument("--snapshots", help=f"snapshot root directory (default {defaults.snapshots})")
    p.add_argument("--store", help=f"memory:// (one process) or redis://host:port/db (default {defaults.store})")
    p.add_argument("--host", help=f"address to bind (default {defaults.host})")
    p.add_argument("--port", type=int, help=f"port to bind, 0 for any free one (default {defaults.port})")
    p.add_argument(
        "--workers", type=int, help=f"processes; more than 1 needs a redis:// store (default {defaults.workers})"
    )
    p.add_argument("--log-level", dest="log_level", help=f"debug, info, warning, error (default {defaults.log_level})")
    p.add_argument("--access-log", dest="access_log", action="store_true", default=None, help="log every request")


TOKEN_EPILOG = """\
The key is the gateway's own: TAILOR_SECRET (or the `secret` of --config), else the one derived
from its secret_file (var/secret); give a site's backend the secret, never a browser. Prints the
token alone on stdout, so:

  TOKEN=$(TAILOR_SECRET=... tailor token --visitor user-42)
  # browser: new WebSocket(`wss://shop.example/v1/stream?token=${TOKEN}`)
  # or GET /v1/recommend?token=..., PUT /v1/consent {"token": ..., "choices": {...}}

A site's backend holding an admin key can also ask the gateway: POST /v1/token {"visitor": "user-42"}.
"""


def _add_token(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "token",
        help="mint a visitor token (for a site's backend)",
        description="Mint a signed, expiring token that lets a browser act as one visitor: open WS /v1/stream, "
        "read their recommendations and consent, send their events.",
        epilog=TOKEN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--visitor", required=True, help="the user or visitor id the token is for")
    p.add_argument("--ttl", type=float, default=3600.0, help="seconds until it expires (default 3600)")
    p.add_argument("--config", type=Path, help="TOML config file to read `secret` (or `secret_file`) from")


def _run_token(args: argparse.Namespace) -> int:
    try:
        settings = resolve(config=args.config, overrides={})
        token_key, _ = privacy.keys(settings)  # `secret`, else the gateway's secret_file
        print(tokens.mint(token_key, args.visitor, args.ttl))
    except (SettingsError, ValueError, OSError) as exc:
        print(f"tailor token: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _add_catalog(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("catalog", help="change a running gateway's live catalog")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = actions.add_parser(
        "import",
        help="create or replace the items of a file through POST /v1/items",
        description="Send a catalog file (CSV or JSONL, the formats of `tailor build --items`) to a running "
        "gateway's POST /v1/items, a batch at a time, with a progress line; every node serves the items within "
        "about a second. Exits 1 when a row was refused (each is named) or a call failed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    q.add_argument("file", type=Path, help="items file (CSV or JSONL: item_id,title,categories,tags,price,stock,...)")
    q.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway")
    q.add_argument("--key", default=os.environ.get("TAILOR_ADMIN_KEY"), help="an admin key (env TAILOR_ADMIN_KEY)")
    q.add_argument("--format", choices=("auto", "csv", "jsonl"), default="auto", help="file format")
    q.add_argument("--batch", type=_positive, default=1000, help="items per call (at most max_items_per_call)")


def _add_warm(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "warm",
        help="compile the gateway's kernels into numba's cache (make serve runs it)",
        description="Load the current snapshot as the gateway does and compile the kernels for its arrays, so "
        "`tailor serve` loads them from numba's cache instead of compiling for about a minute before it answers.",
    )
    p.add_argument("--snapshots", type=Path, default=DEFAULT_SNAPSHOTS, help="snapshot root directory")


def _run_warm(args: argparse.Namespace) -> int:
    from gateway.recommend import kernels  # noqa: PLC0415 - numba only for the commands that need it
    from gateway.snapshot import SnapshotRefusedError, load_current  # noqa: PLC0415

    try:
        snap, _ = load_current(args.snapshots, verify=False)
    except SnapshotRefusedError as refused:
        print(f"tailor warm: error: {refused}", file=sys.stderr)
        return 2
    fresh = kernels.warm_up(snap.item_vectors, snap.gram_inverse, snap.neighbour_rows, say=print)
    if not fresh:
        print("kernels already compiled (numba's cache)")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tailor",
        description="Tailor: a self-hosted personalization gateway. Run `tailor COMMAND --help` for details.",
    )
    p.add_argument("--version", action="version", version=f"tailor {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_synth(sub)
    _add_build(sub)
    _add_snapshots(sub)
    _add_serve(sub)
    _add_token(sub)
    _add_warm(sub)
    _add_catalog(sub)
    return p


def print_report(result: BuildResult) -> None:
    m = result.manifest
    print(f"snapshot {m.version}")
    for report in result.reports:
        print(
            f"  {report.file}: read {report.read:,}, accepted {report.accepted:,}, "
            f"rejected {report.rejected:,}, duplicates {report.duplicates:,}"
            + (f", without an item (searches) {report.without_item:,}" if report.without_item else "")
        )
        for reason, count in sorted(report.reasons.items(), key=lambda kv: -kv[1]):
            print(f"    {count:>8,}  {reason}")
        for rejection in report.examples[:5]:
            print(f"    e.g. {rejection.file}:{rejection.line}: {rejection.reason}")
    print(f"  {m.counts['interactions']:,} interactions, {m.counts['users']:,} users, {m.counts['items']:,} items")
    print("  quality on the temporal hold-out (each user's last 20%, seen items removed):")
    print(f"    {'':12} {'nDCG@10':>8} {'Recall@10':>9} {'Prec@10':>8} {'MAP@10':>8} {'coverage':>8}")
    for name, metrics in (("tailor", result.model), ("popularity", result.popularity)):
        print(
            f"    {name:12} {metrics.ndcg_at_10:8.4f} {metrics.recall_at_10:9.4f} {metrics.precision_at_10:8.4f} "
            f"{metrics.map_at_10:8.4f} {metrics.coverage:8.4f}"
        )
    print(
        f"    nDCG@10 95% intervals over {result.model.users:,} sampled users: tailor ±{result.model.ndcg_ci95:.4f}, "
        f"popularity ±{result.popularity.ndcg_ci95:.4f}"
    )
    lift = result.model.ndcg_at_10 / result.popularity.ndcg_at_10 if result.popularity.ndcg_at_10 else float("inf")
    print(
        f"    nDCG@10 lift over popularity: {lift:.2f}x; "
        f"quality gate {'passed' if m.quality_gate['passed'] else 'FAILED'}"
    )
    print(f"  model: {msgspec.json.encode(result.tuning.best).decode()}")
    ratios = ", ".join(f"{split} {ratio:.3f}x" for split, ratio in result.tuning.ratios.items())
    print(f"  validation nDCG@10 over each split's tuned ALS: {ratios}")
    index = m.index
    print(
        f"  index: {index['method']}"
        + (f" (HNSW M {index['m']}, efSearch {index['ef_search']})" if index["method"] == "hnsw" else "")
        + f", recall@10 {index['recall_at_10']:.3f}, median query {index['median_query_us']:.0f}µs "
        f"(exact {index['exact_median_query_us']:.0f}µs)"
    )
    build_stats = m.parameters["build"]
    print(f"  built in {build_stats['seconds']}s, peak memory {build_stats['peak_rss_mb']} MB")


def _run_build(args: argparse.Namespace) -> int:
    if not args.events and not args.event_log:
        print("tailor build: error: give --events FILE or --event-log SOURCE (or both)", file=sys.stderr)
        return 2
    if args.event_log and args.format == "movielens":
        print("tailor build: error: --event-log does not combine with --format movielens", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="tailor-event-log-") as workdir:
        say = Stopwatch(args.quiet)
        try:
            logged = [path for source in args.event_log for path in collect(source, Path(workdir), say)]
        except InputError as exc:
            print(f"tailor build: error: {exc}", file=sys.stderr)
            return 1
        return _build(args, [*args.events, *logged], say)


def _build(args: argparse.Namespace, events: list[Path], say: Stopwatch) -> int:
    config = BuildConfig(
        events=events,
        items=args.items,
        format=args.format,
        out=args.out,
        weights={**DEFAULT_EVENT_WEIGHTS, **dict(args.weight)},
        max_trials=args.max_trials,
        pins=Pins(
            factors=args.factors,
            regularization=args.regularization,
            alpha=args.alpha,
            half_life_events=args.half_life,
            long_term_share=args.long_term_share,
            item_model=args.item_model,
            content_weight=args.content_weight,
            ease_regularization=args.ease_regularization,
            ease_content_weight=args.ease_content_weight,
            ease_visit_weight=args.ease_visit_weight,
        ),
        iterations=args.iterations,
        target_recall=args.target_recall,
        seed=args.seed,
        force=args.force,
        precompute_users=max(0, args.precompute_users),
        pool_size=args.pool_size,
        neighbours=max(0, args.neighbours),
        segments=max(0, args.segments),
        catalog=args.catalog,
    )
    try:
        result = build(config, say)
    except InputError as exc:
        print(f"tailor build: error: {exc}", file=sys.stderr)
        return 1
    except QualityGateError as exc:
        print(f"tailor build: quality gate: {exc}", file=sys.stderr)
        return 2
    print_report(result)
    if args.report_json:
        args.report_json.write_bytes(msgspec.json.format(msgspec.json.encode(result), indent=2))
    return 0


def _run_snapshots(args: argparse.Namespace) -> int:
    root: Path = args.root
    try:
        current = snapshot.current_version(root)
    except snapshot.SnapshotError as exc:  # the versions are still worth listing, or pointing at
        print(f"tailor snapshots: warning: {exc}", file=sys.stderr)
        current = None
    if args.action == "list":
        versions = snapshot.list_versions(root)
        if not versions:
            print(f"no snapshots under {root}")
        for directory in versions:
            try:
                m = snapshot.load_manifest(directory)
                summary = (
                    f"created {m.created:%Y-%m-%d %H:%M:%S}Z  {m.counts['items']:,} items  "
                    f"nDCG@10 {m.metrics['model']['ndcg_at_10']:.4f}"
                )
            except snapshot.SnapshotError as exc:
                summary = f"UNREADABLE: {exc}"
            print(f"{'*' if directory.name == current else ' '} {directory.name}  {summary}")
        return 0
    if args.version == "all":
        targets = snapshot.list_versions(root)
    else:
        version = args.version or current
        if version is None:
            print(f"tailor snapshots verify: no current snapshot under {root}", file=sys.stderr)
            return 1
        targets = [root / version]
    failed = 0
    for directory in targets:
        problems = snapshot.verify(directory)
        print(f"{directory.name}: {'OK' if not problems else 'CORRUPT'}")
        for problem in problems:
            print(f"  {problem}")
        failed += bool(problems)
    return 1 if failed or not targets else 0


def _run_synth(args: argparse.Namespace) -> int:
    say = Stopwatch()
    summary = generate(
        args.out,
        users=args.users,
        items=args.items,
        events=args.events,
        seed=args.seed,
        days=args.days,
        progress=say,
        shape=args.shape,
    )
    print(msgspec.json.format(msgspec.json.encode(summary), indent=2).decode())
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name, None) for name in FIELDS}
    try:
        settings = resolve(config=args.config, overrides=overrides)
        if settings.workers > 1 and settings.store.startswith("memory"):
            raise SettingsError(
                "memory:// keeps visitor state inside one process; with --workers > 1 use a redis:// store"
            )
        serve(settings)
    except (SettingsError, ValueError) as exc:
        print(f"tailor serve: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _run_catalog(args: argparse.Namespace) -> int:
    return catalog_import.run(args.file, args.url, args.key, fmt=args.format, batch=args.batch, say=Stopwatch())


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    commands = {
        "serve": _run_serve,
        "synth": _run_synth,
        "build": _run_build,
        "token": _run_token,
        "warm": _run_warm,
        "catalog": _run_catalog,
        "snapshots": _run_snapshots,
    }
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
