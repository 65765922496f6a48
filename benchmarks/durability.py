"""
What write durability costs a put: the figures behind docs/replication.md.

Starts real C{twistd koboldfs} servers on loopback sharing one SQLite file
(replication passes made rare, so only the put copies) and puts, one at a
time through the blocking client:

  - C{alone}: one server, one host: nothing is forwarded;
  - C{one copy}: two servers on distinct hosts, the namespace's
    C{min_copies} set to 1: nothing is forwarded either;
  - C{two copies}: the same two servers, default C{min_copies}: every put
    is streamed to the second host while it is written.

Workloads: many 4 KiB files (latency p50/p99, puts per second) and a few
large files (MB/s).  Both hosts share this machine's disk and cores, so
the forwarded figures include the second copy's own disk writes.

    python benchmarks/durability.py [--small 300] [--large 4] [--large-mib 64]

Output: a table, then one JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, CHECKOUT)

from koboldfs import Client  # noqa: E402
from koboldfs.test.cluster import ServerProcess  # noqa: E402


def server(base: str, name: str, db: str) -> ServerProcess:
    """
    A started C{twistd -n koboldfs} on a host of its own, with the default
    heartbeat and no replication pass or scrub to disturb the figures.
    """
    process = ServerProcess(
        base,
        name,
        db=db,
        host=f"host-{name}",
        extra=(
            "--heartbeat=5",
            "--down-after=30",
            "--replicate-interval=3600",
            "--scrub-rate=0",
        ),
    )
    process.start_blocking()
    return process


def measure(client: Client, prefix: str, small: int, large: int, large_mib: int) -> dict:
    body = os.urandom(4096)
    latencies = []
    started = time.perf_counter()
    for i in range(small):
        t = time.perf_counter()
        client.put(f"{prefix}/small/{i}", body)
        latencies.append(time.perf_counter() - t)
    small_time = time.perf_counter() - started
    big = os.urandom(large_mib * 1024 * 1024)
    started = time.perf_counter()
    for i in range(large):
        client.put(f"{prefix}/large/{i}", big)
    large_time = time.perf_counter() - started
    latencies.sort()
    return {
        "small_p50_ms": statistics.median(latencies) * 1000,
        "small_p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "small_puts_per_s": small / small_time,
        "large_MB_per_s": large * large_mib * 1024 * 1024 / large_time / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--small", type=int, default=300)
    parser.add_argument("--large", type=int, default=4)
    parser.add_argument("--large-mib", type=int, default=64)
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="koboldfs-durability-")
    results = {}
    try:
        db = f"sqlite:///{base}/alone.sqlite"
        alone = server(base, "alone", db)
        try:
            with Client("bench", servers=[alone.address]) as client:
                results["alone"] = measure(client, "w", args.small, args.large, args.large_mib)
        finally:
            alone.stop_blocking()
        db_path = f"{base}/pair.sqlite"
        b = server(base, "b", f"sqlite:///{db_path}")
        a = server(base, "a", f"sqlite:///{db_path}")
        try:
            with Client("bench", servers=[a.address]) as client:
                client.put("warm", b"up")
                with sqlite3.connect(db_path) as conn:
                    conn.execute("UPDATE namespaces SET min_copies = 1 WHERE name = 'bench'")
                results["one copy"] = measure(client, "x", args.small, args.large, args.large_mib)
                with sqlite3.connect(db_path) as conn:
                    conn.execute("UPDATE namespaces SET min_copies = NULL WHERE name = 'bench'")
                results["two copies"] = measure(client, "y", args.small, args.large, args.large_mib)
                with sqlite3.connect(db_path) as conn:
                    [(held,)] = conn.execute(
                        "SELECT count(*) FROM replicas r JOIN files f ON f.id = r.file_id "
                        "WHERE r.server = 'b' AND f.key LIKE 'y/%'"
                    ).fetchall()
                expected = args.small + args.large
                if held != expected:
                    raise RuntimeError(f"B holds {held} of the {expected} forwarded files")
        finally:
            a.stop_blocking()
            b.stop_blocking()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"{'':12} {'4 KiB p50 ms':>13} {'p99 ms':>8} {'puts/s':>8} {'large MB/s':>11}")
    for name, r in results.items():
        print(
            f"{name:12} {r['small_p50_ms']:13.2f} {r['small_p99_ms']:8.2f} "
            f"{r['small_puts_per_s']:8.0f} {r['large_MB_per_s']:11.1f}"
        )
    for name, r in results.items():
        print(json.dumps({"case": name, **r}))


if __name__ == "__main__":
    main()
