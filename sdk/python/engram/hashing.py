"""A dependency-free text embedding: words hashed into `dim` buckets (feature hashing),
L2-normalized. Lexical, not semantic: texts that share words land near each other. For the MCP
server's default and for tests; give a real model's embedding function in production."""

from __future__ import annotations

import hashlib
import math
import re

_WORD = re.compile(r"[\w']+")


def hashing_embedding(text: str, dim: int = 256) -> list[float]:
    v = [0.0] * dim
    for w in _WORD.findall(text.lower()):
        h = hashlib.blake2b(w.encode(), digest_size=8).digest()
        v[int.from_bytes(h[:4], "little") % dim] += 1.0 if h[4] & 1 else -1.0
    n = math.sqrt(sum(x * x for x in v))
    if n == 0:
        v[0], n = 1.0, 1.0
    return [x / n for x in v]
