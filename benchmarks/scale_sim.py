"""
The metadata database's load from replication and health, for a cluster
far larger than this machine holds: 100 servers and 10^9 files by default
(docs/scale.md).

A simulation, second by second, of what every server asks the database
(koboldfs.replicator, koboldfs.status, the heartbeat): each query's count,
and its cost taken from a benchmarks/scale.py run (--costs, its JSON; the
figures of the largest size in it) or from the defaults below (the 10^7
run on this machine, docs/scale.md).  The queries this issue made flat
cost the same at 10^9 as at 10^7 (that is what flat means, and what the
scale benchmark checks), so their measured cost stands; the model says
how many there are.

    python benchmarks/scale_sim.py
    python benchmarks/scale_sim.py --servers 100 --files 1e9 --puts 2000 --new-server
    python benchmarks/scale_sim.py --costs koboldfs-scale.json

What a server does each replicate interval (10 s): max_file_id, one page
of the replication queue (more while it has work), the walk of ids (a
window of 1,000 ids, up to 10 a pass while it has not reached the last
id; then only the ids added since), one page of deleted files, and for
each copy it makes add_replica.  The walk restarts from id 0 an hour
after it last reached the end; at 10^9 files a round takes longer than
that (10^4 ids a pass), so every server is always walking.  Each status poll (10 s): health and
files_held.  Each heartbeat (5 s): one update.  The scrub (10 MiB/s of
files of --size bytes): a held_files page per 100 files.  Puts and
deletes, if any, are request-path load, shown apart.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from dataclasses import dataclass, field

#: Median seconds per query, from `benchmarks/scale.py --files 10000000`
#: on this machine (docs/scale.md; a loaded 2-core VM).
DEFAULT_COSTS = {
    "max_file_id": 0.0003,
    "queued_files": 0.0010,
    "walk_window": 0.0050,
    "deleted_files": 0.0010,
    "add_replica": 0.0020,
    "health": 0.0050,
    "files_held": 0.0010,
    "heartbeat": 0.0005,
    "held_files": 0.0020,
    "add_file": 0.0030,
    "delete": 0.0010,
}
#: scale.py's figure names for each cost.
FIGURES = {
    "max_file_id": "max_file_id",
    "queued_files": "queued_files (replication queue page), from id 0",
    "walk_window": "missing_replicas, full server, one window (the walk)",
    "deleted_files": "deleted_files (reclaim), from id 0",
    "health": "health",
    "files_held": "files_held",
    "heartbeat": "heartbeat",
    "held_files": "held_files (scrub), mid",
    "add_replica": "add_replica (a copy recorded)",
    "add_file": "add_file (new key)",
    "delete": "delete",
}

WINDOW = 1000
WINDOWS_PER_PASS = 10
PAGE = 100


#: Seconds from a walk's end to the next walk from id 0.
RESCAN = 3600


@dataclass
class Server:
    cursor: float = 0.0
    #: Files this server is to copy (a new server's backfill).
    backfill: float = 0.0
    #: When its walk last reached the last id (None: still walking).
    walked: float | None = None


@dataclass
class Tally:
    queries: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, count: float) -> None:
        self.queries[name] = self.queries.get(name, 0.0) + count


def costs_from(path: str | None) -> dict[str, float]:
    costs = dict(DEFAULT_COSTS)
    if path is None:
        return costs
    with open(path) as f:
        results = json.load(f)
    largest = max(results, key=lambda r: r["files"])
    by_name = {fig["name"]: fig for fig in largest["figures"]}
    for key, name in FIGURES.items():
        if name in by_name and by_name[name]["now"] is not None:
            costs[key] = by_name[name]["now"]
    return costs


def simulate(args: argparse.Namespace) -> dict[str, object]:
    """
    Run the cluster for --seconds, one second at a time; the queries per
    second by kind and the database seconds they cost per second.
    """
    # Each server's walk somewhere in its round, at random (seeded): the
    # steady state, since a walk restarts an hour after it ends.
    chance = random.Random(17)
    servers = [Server(cursor=chance.uniform(0, args.files)) for _ in range(args.servers)]
    if args.new_server:
        # A new server: its walk starts at id 0 and every window is full of
        # files to copy, in namespaces that want a copy on every server.
        servers[-1] = Server(cursor=0.0, backfill=args.files * args.all_servers_share)
    high = float(args.files)
    tally = Tally()
    requests = Tally()
    copy_rate = args.copy_rate  # files/s a server copies at most
    for second in range(args.seconds):
        high += args.puts
        requests.add("add_file", args.puts)
        requests.add("delete", args.deletes)
        # Each put short of copies (one copy at the ack, `replicas` wanted)
        # is queued, and copied by (replicas - copies_at_put) servers.
        short_copies = args.puts * max(0, args.replicas - args.copies_at_put)
        for server in servers:
            if second % args.interval == 0:
                tally.add("max_file_id", 1)
                tally.add("deleted_files", 1)
                # The queue: a page each pass, and more while it is full.
                queue_share = short_copies * args.interval / args.servers
                tally.add("queued_files", max(1, math.ceil(queue_share / PAGE)))
                tally.add("add_replica", queue_share)
            if server.backfill > 0:
                # A full page at once after each: backfill at copy speed.
                copied = min(copy_rate, server.backfill)
                server.backfill -= copied
                server.cursor += copied / args.all_servers_share
                tally.add("walk_window", copied / PAGE)
                tally.add("add_replica", copied)
            elif second % args.interval == 0:
                if server.walked is not None and second - server.walked >= RESCAN:
                    server.cursor, server.walked = 0.0, None
                if server.cursor < high:
                    windows = min(WINDOWS_PER_PASS, math.ceil((high - server.cursor) / WINDOW))
                    server.cursor = min(high, server.cursor + windows * WINDOW)
                    tally.add("walk_window", windows)
                elif server.walked is None:
                    server.walked = second
            if second % args.poll == 0:
                tally.add("health", 1)
                tally.add("files_held", 1)
            if second % args.heartbeat == 0:
                tally.add("heartbeat", 1)
            tally.add("held_files", args.scrub_rate / max(args.size, 64 * 1024) / PAGE)
    costs = costs_from(args.costs)
    per_second = {name: n / args.seconds for name, n in tally.queries.items()}
    requests_per_second = {name: n / args.seconds for name, n in requests.queries.items()}
    db_seconds = {name: rate * costs[name] for name, rate in per_second.items()}
    request_db = {name: rate * costs[name] for name, rate in requests_per_second.items()}
    return {
        "servers": args.servers,
        "files": args.files,
        "seconds": args.seconds,
        "queries_per_second": per_second,
        "db_seconds_per_second": db_seconds,
        "background_queries_per_second": sum(per_second.values()),
        "background_db_cores": sum(db_seconds.values()),
        "request_queries_per_second": sum(requests_per_second.values()),
        "request_db_cores": sum(request_db.values()),
        "backfill_left": servers[-1].backfill if args.new_server else 0.0,
        "costs": costs,
    }


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--servers", type=int, default=100)
    parser.add_argument("--files", type=float, default=1e9)
    parser.add_argument("--seconds", type=int, default=600, help="simulated time")
    parser.add_argument("--interval", type=int, default=10, help="--replicate-interval")
    parser.add_argument("--poll", type=int, default=10, help="status poll, seconds")
    parser.add_argument("--heartbeat", type=int, default=5)
    parser.add_argument("--puts", type=float, default=0.0, help="new files per second")
    parser.add_argument("--deletes", type=float, default=0.0, help="deletes per second")
    parser.add_argument("--replicas", type=int, default=3, help="copies each file wants")
    parser.add_argument("--copies-at-put", type=int, default=2, help="copies at the ack")
    parser.add_argument("--size", type=float, default=1 << 20, help="mean file size, bytes")
    parser.add_argument("--scrub-rate", type=float, default=10 * 1024 * 1024)
    parser.add_argument(
        "--new-server", action="store_true", help="one of the servers is new: its backfill"
    )
    parser.add_argument(
        "--all-servers-share",
        type=float,
        default=0.0,
        help="share of files in namespaces wanting a copy on every server (the backfill)",
    )
    parser.add_argument("--copy-rate", type=float, default=200.0, help="files/s a server copies")
    parser.add_argument("--costs", default=None, help="a benchmarks/scale.py JSON")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.new_server and args.all_servers_share == 0.0:
        args.all_servers_share = 1.0
    result = simulate(args)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{args.servers} servers, {args.files:.0e} files, {args.seconds} s simulated")
    print(f"{'query':<16}{'per second':>12}{'DB ms/s':>10}")
    for name, rate in sorted(result["queries_per_second"].items()):  # type: ignore[attr-defined]
        cost = result["db_seconds_per_second"][name] * 1000  # type: ignore[index]
        print(f"{name:<16}{rate:>12.1f}{cost:>10.1f}")
    print(
        f"background: {result['background_queries_per_second']:.0f} queries/s, "
        f"{result['background_db_cores']:.2f} database cores"
    )
    if args.puts or args.deletes:
        print(
            f"request path: {result['request_queries_per_second']:.0f} queries/s, "
            f"{result['request_db_cores']:.2f} database cores"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
