"""Nearest-neighbour backends on one catalog: recall@10 against exact inner-product search, median
query latency, build time, resident memory and file size, at 100k and 1M items.

    nice -n 19 python -m loadtests.bench_index --items 100000 1000000
    nice -n 19 python -m loadtests.bench_index --snapshot var/snapshots   # a built snapshot's vectors

Without --snapshot the vectors are synthetic but shaped like ALS factors: clustered, 64-d, with
norms spread as popularity spreads them (a few items have long vectors), and queries that mix a
few clusters as a user's taste does. Each backend runs in its own child process, so its resident
memory is its own (`memory_mb`: resident set after loading the saved index and querying it, minus
the child's before; `private_mb`: the part of it that is not shared page cache, i.e. what each
further gateway worker would add). hnswlib is compared when installed (`pip install hnswlib`).
Results as JSON on stdout and in var/bench/index.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt
from annoy import AnnoyIndex

K = 10
QUERIES = 500
DIM = 64
Vectors = npt.NDArray[np.float32]

EF_CONSTRUCTION = 64  # --ef-construction
# (backend, build parameter: trees, M or nlist (0: 4 sqrt(n)), search parameters swept)
CONFIGS: list[tuple[str, int, tuple[int, ...]]] = [
    ("exact", 0, (0,)),
    ("annoy", 50, (10_000, 50_000)),
    ("hnswlib", 16, (20, 40, 80, 160, 320)),
    ("faiss-hnsw", 16, (32, 64, 128, 256, 512)),
    ("faiss-hnsw", 32, (32, 64, 128, 256, 512)),
    ("faiss-ivf", 0, (8, 16, 32, 64)),
]


def synthetic(n_items: int, n_queries: int, seed: int) -> tuple[Vectors, Vectors]:
    rng = np.random.default_rng(seed)
    n_clusters = max(16, n_items // 2000)
    centres = rng.normal(size=(n_clusters, DIM)).astype(np.float32)
    cluster = rng.zipf(1.3, size=n_items) % n_clusters
    items = centres[cluster] + 0.6 * rng.normal(size=(n_items, DIM)).astype(np.float32)
    items *= rng.lognormal(0.0, 0.5, size=(n_items, 1)).astype(np.float32)  # popularity spreads norms
    mix = rng.integers(0, n_clusters, size=(n_queries, 3))
    queries = centres[mix].sum(axis=1) + 0.5 * rng.normal(size=(n_queries, DIM)).astype(np.float32)
    return np.ascontiguousarray(items, dtype=np.float32), np.ascontiguousarray(queries, dtype=np.float32)


def from_snapshot(root: Path, n_queries: int, seed: int) -> tuple[Vectors, Vectors]:
    version = (root / "CURRENT").read_text().strip()
    items = np.load(root / version / "item_vectors.npy")
    users = np.load(root / version / "user_vectors.npy", mmap_mode="r")
    rows = np.random.default_rng(seed).choice(len(users), size=min(n_queries, len(users)), replace=False)
    return np.ascontiguousarray(items, dtype=np.float32), np.ascontiguousarray(users[np.sort(rows)], dtype=np.float32)


def exact(items: Vectors, queries: Vectors) -> npt.NDArray[np.int64]:
    out = np.empty((len(queries), K), dtype=np.int64)
    for start in range(0, len(queries), 64):
        block = queries[start : start + 64] @ items.T
        top = np.argpartition(-block, K - 1, axis=1)[:, :K]
        out[start : start + 64] = top
    return out


def _median_us(run: Any, queries: Vectors) -> float:
    times = []
    for query in queries:
        started = time.perf_counter_ns()
        run(query)
        times.append(time.perf_counter_ns() - started)
    return float(np.median(times)) / 1000


def run_backend(
    backend: str, build_param: int, searches: tuple[int, ...], data: Path, ef_construction: int = EF_CONSTRUCTION
) -> dict[str, Any]:
    """In the child: build, save, reload, then sweep the search parameter."""
    items = np.load(data / "items.npy")
    queries = np.load(data / "queries.npy")
    truth = np.load(data / "truth.npy")
    n = len(items)
    path = str(data / f"{backend}-{build_param}.index")
    started = time.perf_counter()
    started_cpu = time.process_time()  # all threads: comparable across runs on a busy machine
    built: Any
    index: Any = items
    if backend == "exact":
        pass
    elif backend == "annoy":
        built = AnnoyIndex(DIM, "dot")
        for row, vector in enumerate(items):
            built.add_item(row, vector.tolist())
        built.build(build_param, n_jobs=1)
        built.save(path)
    elif backend == "hnswlib":
        import hnswlib  # noqa: PLC0415  (a comparison only: `pip install hnswlib` to include it)

        built = hnswlib.Index(space="ip", dim=DIM)
        built.init_index(max_elements=n, M=build_param, ef_construction=ef_construction, random_seed=0)
        built.add_items(items, np.arange(n), num_threads=2)
        built.save_index(path)
    elif backend == "faiss-hnsw":
        built = faiss.IndexHNSWFlat(DIM, build_param, faiss.METRIC_INNER_PRODUCT)
        built.hnsw.efConstruction = ef_construction
        built.add(items)
        faiss.write_index(built, path)
    elif backend == "faiss-ivf":
        nlist = int(4 * np.sqrt(n))
        quantizer = faiss.IndexFlatIP(DIM)
        built = faiss.IndexIVFFlat(quantizer, DIM, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = items[np.random.default_rng(0).choice(n, size=min(n, 50 * nlist), replace=False)]
        built.train(sample)
        built.add(items)
        faiss.write_index(built, path)
        build_param = nlist
    else:
        raise ValueError(backend)
    build_seconds = time.perf_counter() - started
    build_cpu_seconds = time.process_time() - started_cpu
    if backend != "exact":
        del built
    baseline = _status_kb("VmRSS") * 1024
    baseline_anon_mb = _status_kb("RssAnon") / 1024
    if backend == "annoy":
        index = AnnoyIndex(DIM, "dot")
        index.load(path)
    elif backend == "hnswlib":
        index = hnswlib.Index(space="ip", dim=DIM)
        index.load_index(path, max_elements=n)
    elif backend.startswith("faiss"):
        faiss.omp_set_num_threads(1)
        flags = faiss.IO_FLAG_MMAP_IFC if backend == "faiss-hnsw" else faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
        index = faiss.read_index(path, flags)
    trials = []
    for search in searches:
        if backend == "exact":

            def query(q: Vectors) -> Any:
                scores = index @ q
                return np.argpartition(-scores, K - 1)[:K]

        elif backend == "annoy":

            def query(q: Vectors) -> Any:
                return index.get_nns_by_vector(q.tolist(), K, search_k=search)  # noqa: B023

        elif backend == "hnswlib":
            index.set_ef(search)
            index.set_num_threads(1)

            def query(q: Vectors) -> Any:
                return index.knn_query(q, k=K)[0][0]

        elif backend == "faiss-hnsw":
            index.hnsw.efSearch = search

            def query(q: Vectors) -> Any:
                return index.search(q[None, :], K)[1][0]

        else:
            index.nprobe = search

            def query(q: Vectors) -> Any:
                return index.search(q[None, :], K)[1][0]

        found = [set(np.asarray(query(q)).tolist()) for q in queries]
        recall = float(np.mean([len(f & set(t.tolist())) / K for f, t in zip(found, truth, strict=True)]))
        latency = round(_median_us(query, queries), 1)
        trials.append({"search": search, "recall_at_10": round(recall, 4), "median_us": latency})
    rss = _status_kb("VmRSS") * 1024  # after the sweeps: the pages queries touch are resident
    anon_mb = _status_kb("RssAnon") / 1024
    return {
        "backend": backend,
        "build_param": build_param,
        "build_seconds": round(build_seconds, 1),
        "build_cpu_seconds": round(build_cpu_seconds, 1),
        "file_mb": round(os.path.getsize(path) / 2**20, 1) if backend != "exact" else round(items.nbytes / 2**20, 1),
        "memory_mb": round((rss - baseline) / 2**20, 1) if backend != "exact" else round(items.nbytes / 2**20, 1),
        "private_mb": round(anon_mb - baseline_anon_mb, 1),
        "trials": trials,
    }


def _status_kb(field: str) -> int:
    """A /proc/self/status figure: RssAnon is private to this process, RssFile shared page cache."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--snapshot", type=Path, help="use this snapshot root's vectors instead of synthetic ones")
    parser.add_argument("--backends", nargs="*", help="only these (exact annoy hnswlib faiss-hnsw faiss-ivf)")
    parser.add_argument("--queries", type=int, default=QUERIES)
    parser.add_argument("--ef-construction", type=int, default=EF_CONSTRUCTION, help="graphs' build breadth")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("var/bench/index.json"))
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        backend, build_param, searches, data = args.child
        searched = tuple(int(s) for s in searches.split(","))
        result = run_backend(backend, int(build_param), searched, Path(data), args.ef_construction)
        print(json.dumps(result))
        return 0
    runs = []
    sizes: list[int | None] = [None] if args.snapshot else args.items
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="bench-index-", dir="var") as scratch:
            data = Path(scratch)
            if args.snapshot:
                items, queries = from_snapshot(args.snapshot, args.queries, args.seed)
            else:
                assert size is not None
                items, queries = synthetic(size, args.queries, args.seed)
            np.save(data / "items.npy", items)
            np.save(data / "queries.npy", queries)
            np.save(data / "truth.npy", exact(items, queries))
            print(f"{len(items):,} items, {len(queries)} queries", file=sys.stderr, flush=True)
            del items, queries
            for backend, build_param, searches in CONFIGS:
                if args.backends and backend not in args.backends:
                    continue
                if backend == "annoy" and size is not None and size > 200_000:
                    continue  # 10 min to build 50 trees on 1M and still under the target (PERF_NOTES)
                command = [
                    sys.executable,
                    "-m",
                    "loadtests.bench_index",
                    "--ef-construction",
                    str(args.ef_construction),
                    "--child",
                    backend,
                    str(build_param),
                    ",".join(map(str, searches)),
                    str(data),
                ]
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    print(done.stderr, file=sys.stderr)
                    continue
                result = json.loads(done.stdout)
                result["items"] = int(np.load(data / "items.npy", mmap_mode="r").shape[0])
                runs.append(result)
                print(json.dumps(result), file=sys.stderr, flush=True)
    report = {
        "k": K,
        "queries": args.queries,
        "ef_construction": args.ef_construction,
        "source": str(args.snapshot or "synthetic"),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
