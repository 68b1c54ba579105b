"""chromadb's search on a TEXMEX-style dataset, for benches/compare.rs: loads base.fvecs into an
in-process (ephemeral) collection with inner-product HNSW and default HNSW settings, runs
queries.fvecs one at a time (one client), and prints {"version", "recall", "qps"} as JSON
(recall@10 against groundtruth.ivecs)."""

import argparse
import json
import sys
import time

import numpy as np


def read_vecs(path, dtype):
    raw = np.fromfile(path, dtype=np.int32)
    dim = raw[0]
    return raw.reshape(-1, dim + 1)[:, 1:].view(dtype)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--queries", type=int, default=1000)
    args = ap.parse_args()
    import chromadb

    base = read_vecs(f"{args.dataset}/base.fvecs", np.float32)
    queries = read_vecs(f"{args.dataset}/queries.fvecs", np.float32)[: args.queries]
    truth = read_vecs(f"{args.dataset}/groundtruth.ivecs", np.int32)

    client = chromadb.EphemeralClient()
    col = client.create_collection("bench", metadata={"hnsw:space": "ip"})
    t = time.time()
    step = 5000
    for i in range(0, len(base), step):
        col.add(ids=[str(j) for j in range(i, min(i + step, len(base)))], embeddings=base[i : i + step].tolist())
    print(f"chromadb: loaded {len(base)} in {time.time() - t:.1f} s", file=sys.stderr)

    hits = 0
    t = time.time()
    for i, q in enumerate(queries):
        r = col.query(query_embeddings=[q.tolist()], n_results=10)
        want = set(int(x) for x in truth[i][:10])
        hits += sum(1 for x in r["ids"][0] if int(x) in want)
    elapsed = time.time() - t
    print(json.dumps({"version": chromadb.__version__, "recall": hits / (10 * len(queries)), "qps": len(queries) / elapsed}))


if __name__ == "__main__":
    main()
