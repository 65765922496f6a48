"""
What a transaction costs: small files put one at a time through the plain
blocking client, each in a transaction of its own (one-phase and
two-phase), and all in one transaction, against one real C{twistd
koboldfs} server on loopback (SQLite).  Each figure is the median of
C{--repeat} runs, each run in a namespace of its own.

    python benchmarks/transactions.py [--files 300] [--size 4096] [--repeat 3]

Output: a table, then one JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Callable

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, CHECKOUT)

import transaction  # noqa: E402

from benchmarks.client_choice import start_server  # noqa: E402
from koboldfs.blocking import ClientPool  # noqa: E402
from koboldfs.client import TransactionalClientPool  # noqa: E402


def plain(address: str, ns: str, bodies: list[bytes]) -> None:
    pool = ClientPool(ns, [address])
    for i, body in enumerate(bodies):
        pool.put(f"f{i}", body)
    pool.close()


def each(twophase: bool) -> Callable[[str, str, list[bytes]], None]:
    def run(address: str, ns: str, bodies: list[bytes]) -> None:
        pool = TransactionalClientPool(ns, [address], twophase=twophase)
        for i, body in enumerate(bodies):
            with transaction.manager:
                pool.put(f"f{i}", body)
        pool.close()

    return run


def batch(address: str, ns: str, bodies: list[bytes]) -> None:
    pool = TransactionalClientPool(ns, [address], twophase=True)
    with transaction.manager:
        for i, body in enumerate(bodies):
            pool.put(f"f{i}", body)
    assert len(pool.list(limit=len(bodies))) == len(bodies)
    pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="koboldfs-bench-txn-")
    server = start_server(base)
    bodies = [os.urandom(args.size) for _ in range(args.files)]
    workloads = {
        "plain put (baseline)": plain,
        "one transaction per file, one-phase": each(False),
        "one transaction per file, two-phase": each(True),
        f"{args.files} files in one two-phase transaction": batch,
    }
    results = {}
    try:
        for run in range(args.repeat):
            for n, (name, workload) in enumerate(workloads.items()):
                started = time.perf_counter()
                workload(server.address, f"r{run}w{n}", bodies)
                results.setdefault(name, []).append(args.files / (time.perf_counter() - started))
    finally:
        server.stop_blocking()
        shutil.rmtree(base, ignore_errors=True)
    baseline = statistics.median(results["plain put (baseline)"])
    print(f"{'workload':<48} {'files/s':>9} {'ratio':>6}")
    for name, rates in results.items():
        rate = statistics.median(rates)
        print(f"{name:<48} {rate:>9.0f} {rate / baseline:>6.2f}")
    for name, rates in results.items():
        print(json.dumps({"workload": name, "files_per_s": statistics.median(rates)}))


if __name__ == "__main__":
    main()
