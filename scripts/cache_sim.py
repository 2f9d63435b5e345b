#!/usr/bin/env python3
"""Hit rates of the metadata cache's eviction policies (engine/cache.rs) on a few access
patterns, in slices of 32 MiB of guest space (a 4 KiB slice of 64 KiB-cluster L2 tables).

    python3 scripts/cache_sim.py

Policies: one global LRU (the ideal the sharded cache approximates); 16 hashed shards, each
an LRU with a fixed share of the capacity (before 2026-12-07); 16 hashed shards under one
budget, evicting from the shards in turn (now). Patterns: the 1 TiB row of
scripts/bench_scaling.py (qemu-img bench's offsets: step 1.5 GiB + 192 KiB modulo the size),
uniform random offsets over 64 GiB, and a skewed (Pareto) pattern.
"""

from __future__ import annotations

import random
from collections import OrderedDict

MASK = (1 << 64) - 1
SHARDS = 16
UNIT = 32 << 20
N = 100_000


def shard(key: int) -> int:
    return (((key * 0x9E3779B97F4A7C15) & MASK) >> 59) % SHARDS


def global_lru(cap: int, keys: list[int]) -> float:
    lru: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for k in keys:
        if k in lru:
            hits += 1
            lru.move_to_end(k)
        else:
            lru[k] = None
            if len(lru) > cap:
                lru.popitem(last=False)
    return hits / len(keys)


def fixed_shares(cap: int, keys: list[int]) -> float:
    per = max(cap // SHARDS, 2)
    shards = [OrderedDict() for _ in range(SHARDS)]
    hits = 0
    for k in keys:
        s = shards[shard(k)]
        if k in s:
            hits += 1
            s.move_to_end(k)
        else:
            s[k] = None
            if len(s) > per:
                s.popitem(last=False)
    return hits / len(keys)


def round_robin(cap: int, keys: list[int]) -> float:
    shards = [OrderedDict() for _ in range(SHARDS)]
    n = victim = hits = 0
    for k in keys:
        s = shards[shard(k)]
        if k in s:
            hits += 1
            s.move_to_end(k)
            continue
        s[k] = None
        n += 1
        while n > cap:
            v = shards[victim % SHARDS]
            victim += 1
            if v:
                v.popitem(last=False)
                n -= 1
    return hits / len(keys)


def main() -> None:
    size = (1 << 40) - 4096
    step = 3 * (1 << 30) // 2 + 3 * 65536
    bench, off = [], 0
    for i in range(N):
        off = (off + step) % size if i else 0
        bench.append(off // UNIT)
    rnd = random.Random(1)
    patterns = {
        "bench_scaling 1 TiB row": bench,
        "uniform over 64 GiB": [rnd.randrange(0, 64 << 30) // UNIT for _ in range(N)],
        "Pareto (skewed)": [int((rnd.paretovariate(1.2) - 1) * (1 << 30)) % (1 << 40) // UNIT for _ in range(N)],
    }
    print("| pattern | cache (slices) | global LRU | fixed share per shard | shared budget, round robin |")
    print("|---|---:|---:|---:|---:|")
    for name, keys in patterns.items():
        for cap in (256, 8192, 65536):
            print(f"| {name} | {cap} | {global_lru(cap, keys):.3f} | {fixed_shares(cap, keys):.3f} | "
                  f"{round_robin(cap, keys):.3f} |")


if __name__ == "__main__":
    main()
