"""
How long the operators' counts take on a large metadata database: the
status pages poll them (koboldfs.status, every 10 s or 20 times as long as
a poll took) and `koboldfs admin status` runs them once.

Builds a scratch SQLite database of --files live files with two good
copies each on three servers (one copy short of "all servers"), then times
store.health() and store.files_held(), and beside them a plain full scan,
`SELECT sum(size) FROM files WHERE state = 'live'`, through SQLAlchemy on
the same file, as the baseline.

    python benchmarks/health.py --files 100000

Output: one JSON line per figure (median of --repeat runs, seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, CHECKOUT)

from sqlalchemy import create_engine, insert, text  # noqa: E402
from twisted.internet import defer, task  # noqa: E402

from koboldfs.interfaces import ServerInfo  # noqa: E402
from koboldfs.metadata import store_from_url  # noqa: E402
from koboldfs.metadata.schema import files, namespaces, replicas  # noqa: E402


def fill(url: str, n: int) -> None:
    engine = create_engine(url)
    with engine.begin() as c:
        c.execute(insert(namespaces).values(id=1, name="bench", created=0.0))
        batch = 10000
        for start in range(0, n, batch):
            rows = [
                {
                    "id": i + 1,
                    "fid": f"{i:032x}",
                    "namespace_id": 1,
                    "key": f"k{i:09d}",
                    "size": 1000,
                    "sha256": "ab" * 32,
                    "created": float(i),
                    "path": f"files/{i:032x}",
                    "state": "live",
                }
                for i in range(start, min(n, start + batch))
            ]
            c.execute(insert(files), rows)
            c.execute(
                insert(replicas),
                [
                    {"file_id": r["id"], "server": s, "state": "ok", "created": 0.0}
                    for r in rows
                    for s in ("s1", "s2")
                ],
            )
    engine.dispose()


async def main(reactor, args) -> None:  # type: ignore[no-untyped-def]
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/metadata.sqlite"
        store = store_from_url(url, reactor)
        await store.start()
        for name in ("s1", "s2", "s3"):
            await store.register_server(ServerInfo(name, name, f"{name}:1", f"http://{name}/"))
        fill(url, args.files)
        engine = create_engine(url)

        def count() -> None:
            with engine.connect() as c:
                c.execute(text("select sum(size) from files where state = 'live'")).scalar()

        figures = {}
        for what, run in (
            ("full_scan", lambda: defer.succeed(count())),
            ("health", store.health),
            ("files_held", store.files_held),
        ):
            times = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                result = await run()
                times.append(time.perf_counter() - t)
            figures[what] = statistics.median(times)
            print(json.dumps({"figure": what, "files": args.files, "seconds": figures[what]}))
        print(json.dumps({"health_over_full_scan": figures["health"] / figures["full_scan"]}))
        health = await store.health()
        assert health.files == args.files and health.under_replicated == args.files, health
        assert result == {"s1": args.files, "s2": args.files}
        engine.dispose()
        await store.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100000)
    parser.add_argument("--repeat", type=int, default=3)
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, parser.parse_args())))
