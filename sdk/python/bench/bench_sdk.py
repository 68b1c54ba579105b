"""The Python side of the Rust-vs-Python SDK comparison (scripts/bench-sdk.sh): the same
workload as benches/sdk_compare.rs — `--ops` puts (server-assigned ids) then `--ops` top-10
searches from `--concurrency` threads sharing one sync client — printed as one JSON line."""

from __future__ import annotations

import argparse
import json
import threading
import time

import engram


def vector(seed: int, dim: int) -> list[float]:
    x = (seed * 0x9E3779B97F4A7C15 + 1) & 0xFFFFFFFFFFFFFFFF
    out = []
    for _ in range(dim):
        x ^= (x << 13) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 7
        x ^= (x << 17) & 0xFFFFFFFFFFFFFFFF
        out.append((x % 10_000) / 10_000 + 0.001)
    return out


def run(ops: int, concurrency: int, f) -> tuple[list[float], float]:
    lat: list[list[float]] = [[] for _ in range(concurrency)]

    def worker(w: int) -> None:
        for i in range(w, ops, concurrency):
            t = time.perf_counter()
            f(i)
            lat[w].append(time.perf_counter() - t)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [x for ws in lat for x in ws], time.perf_counter() - started


def summary(name: str, lat: list[float], wall: float) -> dict:
    lat.sort()
    p = lambda q: lat[round((len(lat) - 1) * q)] * 1000  # noqa: E731
    return {"op": name, "ops_per_sec": len(lat) / wall, "p50_ms": p(0.5), "p99_ms": p(0.99)}


def main() -> None:
    a = argparse.ArgumentParser()
    a.add_argument("--endpoints", required=True)
    a.add_argument("--namespace", required=True)
    a.add_argument("--ops", type=int, default=2000)
    a.add_argument("--concurrency", type=int, default=8)
    a.add_argument("--dim", type=int, default=384)
    args = a.parse_args()
    with engram.Client(args.endpoints) as c:
        c.create_namespace(args.namespace, args.dim)
        # Vectors are made before timing, as the Rust side's cost of making one is negligible.
        put_vecs = [vector(i, args.dim) for i in range(args.ops)]
        query_vecs = [vector(i + 7, args.dim) for i in range(args.ops)]
        put_lat, put_wall = run(args.ops, args.concurrency,
                                lambda i: c.put(args.namespace, f"memory number {i}", put_vecs[i]))
        search_lat, search_wall = run(args.ops, args.concurrency,
                                      lambda i: c.search(args.namespace, query_vecs[i], k=10, include_memory=False))
    print(json.dumps({"sdk": "python", "put": summary("put", put_lat, put_wall),
                      "search": summary("search", search_lat, search_wall)}))


if __name__ == "__main__":
    main()
