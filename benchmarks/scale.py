"""
What the metadata queries cost as the files grow (issue 17): bulk-loads N
files' metadata exactly as real puts write it, then times every query the
servers run periodically and on the request path, today's (before issue
17, benchmarks/scale_today.py) beside the current ones, on one database.

    python benchmarks/scale.py --files 1000000
    python benchmarks/scale.py --smoke          # 10^4 vs 10^5; exit 1 if a periodic query grows >3x
    bash .ci/postgres.sh .venv/bin/python benchmarks/scale.py --files 100000

The database: NAMESPACES namespaces (no replica count: a copy on every
alive server), servers "a" and "b" alive, each holding a good copy of
every file, as puts with one forwarded copy leave it; then, through the
store's own units, a handful of deletes and one quarantined copy (on "a",
of the file at id N/2).  Server "c" (not registered) holds a copy of the
first half of the files: a new server half way through its backfill.  The rows are made by
`INSERT ... SELECT` from generate_series in chunks, and whatever the store
keeps beside the rows (counters, work queues) by the same units the store
runs to upgrade an older database; koboldfs/test/test_scale.py checks that
the result equals, row for row, what real puts of the same files write.

Each figure is the median of --repeat runs of a unit (koboldfs.metadata
units, through the compiled statements the stores run) on a psycopg2
connection, in a transaction rolled back after it: writers leave the
database as it was, and their COMMIT (an fsync) is not in the figure.
With --explain, EXPLAIN (ANALYZE, BUFFERS) of each statement of every
current periodic query is written beside the JSON.

Without --postgres-url (or KOBOLDFS_TEST_POSTGRES_URL), the script runs
itself again under .ci/postgres.sh (a throwaway cluster).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [CHECKOUT, HERE]

import psycopg2  # noqa: E402
from sqlalchemy.dialects.postgresql.psycopg2 import PGDialect_psycopg2  # noqa: E402
from sqlalchemy.schema import CreateIndex  # noqa: E402

import scale_today  # noqa: E402
from koboldfs.interfaces import ServerInfo  # noqa: E402
from koboldfs.metadata import files, health, namespaces, schema, servers, sweeps  # noqa: E402
from koboldfs.metadata.compiled import shape_for  # noqa: E402
from koboldfs.metadata.units import Outcome, Query, Unit, drive  # noqa: E402
from koboldfs.replicator import WINDOW  # noqa: E402

NAMESPACES = 10
HOLDERS = ("a", "b")
#: A new server half way through its backfill: it holds the first half of
#: the files, copied in id order, and lacks the rest.
NEW_SERVER = "c"
#: Files deleted (then waiting to be reclaimed) after the load, spread out.
DELETES = 10
#: Files loaded per INSERT ... SELECT (and per commit).
CHUNK = 1_000_000
PAGE = 100
#: A periodic query fails --smoke when it takes more than GROWTH times as
#: long at SMOKE_SIZES[1] files as at SMOKE_SIZES[0]...
GROWTH = 3.0
SMOKE_SIZES = (10_000, 100_000)
#: ...counting any time below this as this: on this shared, loaded machine
#: a query's time jitters by milliseconds, while one that reads every row
#: takes tens of milliseconds at 10^5 files (today's grew to 0.2-6 s).
NOISE_FLOOR = 0.005
#: Interleaved runs at both sizes of a query that seemed to grow.
RECHECK = 9
#: Pages sampled, evenly over the ids, to cost a whole pass of a sweep.
SAMPLES = 20

_DIALECT = PGDialect_psycopg2()


def namespace_name(k: int) -> str:
    return f"ns{k}"


def namespace_of(i: int) -> int:
    """
    The namespace of file C{i}: ns<k> is the (k+1)th made, by file k+1's
    put, so its id is k + 1.
    """
    return (i - 1) % NAMESPACES


def server_info(name: str) -> ServerInfo:
    return ServerInfo(
        name=name,
        host=f"host-{name}",
        address=f"127.0.0.1:{7000 + ord(name[0])}",
        public_url=f"http://127.0.0.1:{8000 + ord(name[0])}/",
        state="alive",
        heartbeat=1e9,
        disk_free=1 << 40,
        disk_total=1 << 41,
    )


def file_spec(i: int) -> dict[str, Any]:
    """
    File number C{i} (its id, from 1) as a put would publish it: what
    L{FILES_SQL} makes in the database.
    """
    fid = hashlib.md5(str(i).encode()).hexdigest()
    return {
        "namespace": namespace_name(namespace_of(i)),
        "key": f"k/{i:010d}.bin",
        "fid": fid,
        "path": f"files/{fid[0:2]}/{fid[2:4]}/{fid}.bin",
        "size": 1000 + i % 4096,
        "sha256": fid + hashlib.md5(str(-i).encode()).hexdigest(),
        "created": 1e9 + i,
    }


FILES_SQL = """
INSERT INTO files (id, fid, namespace_id, key, size, sha256, created, path, state, deleted)
SELECT g, md5(g::text), 1 + (g - 1) %% {ns}, 'k/' || lpad(g::text, 10, '0') || '.bin',
       1000 + g %% 4096, md5(g::text) || md5((-g)::text), 1e9 + g,
       'files/' || substr(md5(g::text), 1, 2) || '/' || substr(md5(g::text), 3, 2) || '/'
           || md5(g::text) || '.bin',
       'live', NULL
FROM generate_series(%(lo)s, %(hi)s) AS g
""".format(ns=NAMESPACES)
REPLICAS_SQL = """
INSERT INTO replicas (file_id, server, state, created)
SELECT g, %(server)s, 'ok', 1e9 + g FROM generate_series(%(lo)s, %(hi)s) AS g
"""


class Sync:
    """
    Units run on one psycopg2 connection, as the stores run them: the
    statements compiled once, then executed on the driver's cursor.
    """

    def __init__(self, url: str) -> None:
        self.conn = psycopg2.connect(url)

    def execute(self, query: Query) -> Outcome:
        shape = shape_for(query.statement, _DIALECT)
        cursor = self.conn.cursor()
        cursor.execute(shape.sql, shape.params(query.params))
        return Outcome(shape.rows(cursor), cursor.rowcount)

    def run(self, unit: Unit[Any], commit: bool = True) -> Any:
        try:
            result = drive(unit, self.execute)
        except BaseException:
            self.conn.rollback()
            raise
        if commit:
            self.conn.commit()
        else:
            self.conn.rollback()
        return result

    def sql(self, sql: str, params: dict[str, Any] | None = None) -> list[tuple]:
        cursor = self.conn.cursor()
        cursor.execute(sql, params or {})
        rows = cursor.fetchall() if cursor.description else []
        self.conn.commit()
        return rows

    def close(self) -> None:
        self.conn.close()


def prepare(db: Sync) -> None:
    """
    The schema and servers of the benchmark's database, made by the
    store's own units, as the servers make them when they start.
    """
    db.run(schema.create_schema())
    for name in HOLDERS:
        db.run(servers.register_server(server_info(name)))


def load(url: str, n: int, progress: Callable[[str], None] = lambda _: None) -> None:
    """
    Fill an empty database with C{n} files (L{file_spec}) in bulk, as
    real puts, each held by every server of L{HOLDERS}, would fill it
    (koboldfs/test/test_scale.py checks that they do).
    """
    db = Sync(url)
    try:
        prepare(db)
        # As the first put into each made it.
        for k in range(min(n, NAMESPACES)):
            db.run(namespaces.ensure_namespace(namespace_name(k), file_spec(k + 1)["created"]))
        db.sql("SET synchronous_commit = off")
        # Counted once at the end instead, as an upgrade counts (derive).
        for table, trigger in COUNT_TRIGGERS:
            db.sql(f"ALTER TABLE {table} DISABLE TRIGGER {trigger}")
        # Indexes other than the keys are built after the rows, as CREATE
        # INDEX builds them (an index grown by puts is less compact).
        for sql in DROP_INDEXES:
            db.sql(sql)
        for lo in range(1, n + 1, CHUNK):
            hi = min(n, lo + CHUNK - 1)
            db.sql(FILES_SQL, {"lo": lo, "hi": hi})
            for server in HOLDERS:
                db.sql(REPLICAS_SQL, {"lo": lo, "hi": hi, "server": server})
            if lo <= n // 2:
                top = min(hi, n // 2)
                db.sql(REPLICAS_SQL, {"lo": lo, "hi": top, "server": NEW_SERVER})
            progress(f"loaded {hi:,} files")
        db.sql("SELECT setval(pg_get_serial_sequence('files', 'id'), %(n)s)", {"n": max(n, 1)})
        for sql in MAKE_INDEXES:
            db.sql(sql)
        # Statistics first, as a database that has been in use has them:
        # without them the queue's fill may pick a plan that reads every
        # replica row per file.
        db.sql("ANALYZE")
        progress("indexed")
        for table, trigger in COUNT_TRIGGERS:
            db.sql(f"ALTER TABLE {table} ENABLE TRIGGER {trigger}")
        derive(db)
        progress("counted")
    finally:
        db.close()


_SECONDARY = [
    index
    for table in (schema.files, schema.replicas)
    for index in sorted(table.indexes, key=lambda index: str(index.name))
]
DROP_INDEXES = [
    "ALTER TABLE files DROP CONSTRAINT files_fid_key",
    *(f"DROP INDEX {index.name}" for index in _SECONDARY),
]
MAKE_INDEXES = [
    "ALTER TABLE files ADD CONSTRAINT files_fid_key UNIQUE (fid)",
    *(str(CreateIndex(index).compile(dialect=_DIALECT)) for index in _SECONDARY),
]
#: The triggers that keep file_counts (koboldfs.metadata.schema).
COUNT_TRIGGERS = (("files", "kobold_count_files"), ("replicas", "kobold_count_replicas"))


def derive(db: Sync) -> None:
    """
    What the store keeps beside the file and replica rows (file_counts,
    copy_queue), made from them by the statements that upgrade a database
    of schema version 1.
    """

    def recount() -> Unit[None]:
        for query in schema.RECOUNT:
            yield query
        yield schema.QUEUE_SHORT

    db.run(recount())


def churn(n: int) -> tuple[list[tuple[str, str, float]], tuple[int, str]]:
    """
    What a live cluster has beside its files, for the store's own units to
    make: DELETES deletes of files spread over the ids (namespace, key,
    when), and the copy on server "a" of the file at id n/2 to quarantine
    (id, server).
    """
    quarantined = max(1, n // 2)
    deletes = []
    for j in range(DELETES):
        i = 1 + (j * n) // DELETES
        if i != quarantined and i <= n:
            spec = file_spec(i)
            deletes.append((spec["namespace"], spec["key"], 2e9 + j))
    return deletes, (quarantined, HOLDERS[0])


def do_churn(db: Sync, n: int) -> int:
    """
    L{churn}, by the units; return the id of the quarantined file.
    """
    deletes, (quarantined, server) = churn(n)
    for namespace, key, when in deletes:
        db.run(files.delete(namespace, key, when))
    db.run(files.quarantine_replica(quarantined, server))
    return quarantined


@dataclass
class Figure:
    name: str
    #: periodic | request | pass (a whole sweep, sampled) | unbounded (no
    #: longer asked)
    kind: str
    today: float | None
    now: float | None
    note: str = ""
    #: The fastest run of the current query: its cost with the least noise
    #: from a loaded machine (what --smoke compares).
    best: float | None = None


class Measure:
    """
    The timings on one loaded database of C{n} files.
    """

    def __init__(
        self, url: str, n: int, repeat: int, explain: bool, no_today: bool = False
    ) -> None:
        self.db = Sync(url)
        self.no_today = no_today
        self.url = url
        self.n = n
        self.repeat = repeat
        self.explain = explain
        self.plans: dict[str, list[str]] = {}
        self.figures: list[Figure] = []
        #: The current query of each figure, to time again.
        self.units: dict[str, Callable[[], Unit[Any]]] = {}

    def runs(self, make: Callable[[], Unit[Any]], repeat: int) -> list[float]:
        self.db.run(make(), commit=False)  # warm: caches, the statement's plan
        took = []
        for _ in range(repeat):
            started = time.perf_counter()
            self.db.run(make(), commit=False)
            took.append(time.perf_counter() - started)
        return took

    def time(self, make: Callable[[], Unit[Any]]) -> float:
        return statistics.median(self.runs(make, self.repeat))

    def plan(self, name: str, make: Callable[[], Unit[Any]]) -> None:
        """
        EXPLAIN (ANALYZE, BUFFERS) of every statement C{make}'s unit runs.
        """
        plans = self.plans.setdefault(name, [])

        def execute(query: Query) -> Outcome:
            shape = shape_for(query.statement, _DIALECT)
            cursor = self.db.conn.cursor()
            # EXPLAIN ANALYZE runs the statement: undone, so that the unit's
            # own run finds the rows as they were (a writer's insert).
            cursor.execute("SAVEPOINT explained")
            cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + shape.sql, shape.params(query.params))
            plans.append(shape.sql + "\n" + "\n".join(row[0] for row in cursor.fetchall()))
            cursor.execute("ROLLBACK TO SAVEPOINT explained")
            return self.db.execute(query)

        try:
            drive(make(), execute)
        finally:
            self.db.conn.rollback()

    def add(
        self,
        name: str,
        kind: str,
        now: Callable[[], Unit[Any]] | None,
        today: Callable[[], Unit[Any]] | None = None,
        note: str = "",
    ) -> None:
        if self.no_today:
            today = None
        took = None if now is None else self.runs(now, self.repeat)
        figure = Figure(
            name,
            kind,
            None if today is None else self.time(today),
            None if took is None else statistics.median(took),
            note,
            None if took is None else min(took),
        )
        if now is not None:
            self.units[name] = now
        # The current queries' plans (today's are in issue 17).
        if self.explain and kind == "periodic" and now is not None:
            self.plan(name, now)
        self.figures.append(figure)
        print(json.dumps({"files": self.n, **figure.__dict__}), flush=True)

    def sampled(
        self, name: str, pages: int, page: Callable[[int], Callable[[], Unit[Any]]], note: str
    ) -> float:
        """
        The time of C{pages} pages of a pass, from SAMPLES pages at cursors
        spread evenly over the ids (one run each).
        """
        took = []
        for k in range(SAMPLES):
            after = (k * self.n) // SAMPLES
            started = time.perf_counter()
            self.db.run(page(after)(), commit=False)
            took.append(time.perf_counter() - started)
        return statistics.mean(took) * pages

    def run(self, quarantined: int) -> list[Figure]:
        n, me, new = self.n, HOLDERS[0], NEW_SERVER
        mid = n // 2
        spec = file_spec(n // 3 + 1)
        self.add("health", "periodic", health.health, scale_today.health)
        self.add("files_held", "periodic", health.files_held, scale_today.files_held)
        # As the replicator asks now: a window of ids at a time.
        for label, server, after in (
            ("missing_replicas, new server half way, from id 0", new, 0),
            ("missing_replicas, new server half way, at its cursor mid-table (backlog)", new, mid),
        ):
            self.add(
                label,
                "periodic",
                lambda s=server, a=after: sweeps.missing_replicas(s, a, PAGE, a + WINDOW),
                lambda s=server, a=after: scale_today.missing_replicas(s, a, PAGE),
            )
        self.add(
            "missing_replicas, full server, from id 0, unbounded",
            "unbounded",
            lambda: sweeps.missing_replicas(me, 0, PAGE),
            lambda: scale_today.missing_replicas(me, 0, PAGE),
            note="today's walk from id 0, which reads to the last id when nothing is missing; "
            "no server asks it now (the walk asks a window at a time, the queue the rest)",
        )
        for label, after in (
            ("held_files (scrub), from id 0", 0),
            ("held_files (scrub), mid", mid),
        ):
            self.add(
                label,
                "periodic",
                lambda a=after: sweeps.held_files(me, a, PAGE),
                lambda a=after: scale_today.held_files(me, a, PAGE),
            )
        self.add(
            "deleted_files (reclaim), from id 0",
            "periodic",
            lambda: sweeps.deleted_files(me, 0, PAGE),
            lambda: scale_today.deleted_files(me, 0, PAGE),
        )
        self.add(
            "a retry's look at one quarantined file (id N/2)",
            "periodic",
            lambda: sweeps.missing_replicas(me, quarantined - 1, 1, quarantined),
            lambda: scale_today.missing_replicas(me, quarantined - 1, 1),
        )
        self.add(
            "queued_files (replication queue page), from id 0",
            "periodic",
            lambda: sweeps.queued_files(me, 0, PAGE),
        )
        self.add(
            "missing_replicas, full server, one window (the walk)",
            "periodic",
            lambda: sweeps.missing_replicas(me, mid, PAGE, mid + WINDOW),
        )
        self.add("settle (a file with its copies)", "periodic", lambda: files.settle(mid + 1))
        self.add(
            "add_replica (a copy recorded)",
            "periodic",
            lambda: files.add_replica(mid + 2, new, 2e9),
        )
        self.add("max_file_id", "periodic", sweeps.max_file_id)
        self.add("heartbeat", "periodic", lambda: servers.heartbeat(me, 2e9, 1 << 40, 1 << 41))
        self.add("lookup", "request", lambda: files.lookup(spec["namespace"], spec["key"]))
        self.add("lookup_fid", "request", lambda: files.lookup_fid(spec["fid"]))
        self.add(
            "list_keys, 1,000",
            "request",
            lambda: files.list_keys(spec["namespace"], "k/", None, 1000),
        )
        self.add(
            "add_file (new key)",
            "request",
            lambda: files.add_file(
                spec["namespace"],
                "new/key.bin",
                "f" * 32,
                "files/ff/ff/x",
                1,
                "0" * 64,
                2e9,
                me,
                ("b",),
            ),
        )
        self.add(
            "add_file (overwrite)",
            "request",
            lambda: files.add_file(
                spec["namespace"],
                spec["key"],
                "f" * 32,
                "files/ff/ff/x",
                1,
                "0" * 64,
                2e9,
                me,
                ("b",),
            ),
        )
        self.add("delete", "request", lambda: files.delete(spec["namespace"], spec["key"], 2e9))
        self.admin_status()
        # A new server's backfill, and a scrub round: whole passes.  The
        # backfill's pages from id 0 to N: each page at cursor x, when the
        # server holds the files below x; costed at the half-way page (the
        # mean page if its cost grows linearly with x, as a plan reading the
        # server's copies from the first one does), which is the database's
        # state here.
        pages = -(-n // PAGE)
        backlog = next(f for f in self.figures if f.name.endswith("mid-table (backlog)"))
        assert backlog.now is not None
        self.figures.append(
            Figure(
                "backfill of a new server: missing_replicas pages, whole pass",
                "pass",
                None if backlog.today is None else backlog.today * pages,
                backlog.now * pages,
                f"{pages:,} pages of {PAGE}, each costed as the half-way page",
            )
        )
        self.figures.append(
            Figure(
                "scrub round: held_files pages, whole pass",
                "pass",
                None
                if self.no_today
                else self.sampled(
                    "scrub", pages, lambda a: lambda: scale_today.held_files(me, a, PAGE), ""
                ),
                self.sampled("scrub", pages, lambda a: lambda: sweeps.held_files(me, a, PAGE), ""),
                f"{pages:,} pages of {PAGE}, {SAMPLES} sampled",
            )
        )
        for figure in self.figures[-2:]:
            print(json.dumps({"files": n, **figure.__dict__}), flush=True)
        return self.figures

    def admin_status(self) -> None:
        """
        `koboldfs admin status --db-only`'s wall time, start to exit.
        """
        took = []
        env = {**os.environ, "PYTHONPATH": CHECKOUT}
        for _ in range(self.repeat):
            started = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "koboldfs.cli",
                    "admin",
                    "status",
                    "--db",
                    self.url,
                    "--db-only",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
            took.append(time.perf_counter() - started)
        figure = Figure(
            "koboldfs admin status --db-only, wall", "periodic", None, statistics.median(took)
        )
        self.figures.append(figure)
        print(json.dumps({"files": self.n, **figure.__dict__}), flush=True)


class Scratch:
    """
    Scratch databases in the cluster of C{url}, dropped unless kept.
    """

    def __init__(self, url: str) -> None:
        self.url = url

    def _admin(self, sql: str) -> None:
        conn = psycopg2.connect(self.url)
        try:
            conn.autocommit = True
            conn.cursor().execute(sql)
        finally:
            conn.close()

    def make(self, name: str) -> str:
        self._admin(f"DROP DATABASE IF EXISTS {name}")
        self._admin(f"CREATE DATABASE {name}")
        return self.named(name)

    def named(self, name: str) -> str:
        return urlsplit(self.url)._replace(path="/" + name).geturl()

    def drop(self, name: str) -> None:
        self._admin(f"DROP DATABASE IF EXISTS {name}")


def serve(url: str, args: argparse.Namespace) -> dict[str, float]:
    """
    A real server (twistd koboldfs, as server "a") started on the loaded
    database: seconds until it serves, CPU seconds over --idle seconds of
    idling (its replicator, status poll, heartbeat and scrub running), and
    its RSS.
    """
    import tempfile

    from loadgen import Server

    base = tempfile.mkdtemp(prefix="koboldfs-scale-", dir=args.tmp)
    started = time.monotonic()
    server = Server(base, HOLDERS[0], url, extra=("--scrub-rate=0",))
    try:
        start = time.monotonic() - started
        before = server.cpu()
        time.sleep(args.idle)
        cpu = server.cpu() - before
        figures = {
            "start_seconds": start,
            "idle_seconds": args.idle,
            "idle_cpu_seconds": cpu,
            "idle_cpu_per_minute": cpu * 60 / args.idle,
            "rss_mib": server.rss_mib(),
        }
    finally:
        server.stop_blocking()
    print(json.dumps({"server": figures}), flush=True)
    return figures


def vacuum(url: str) -> None:
    """
    VACUUM ANALYZE, as autovacuum would have left a database of that age:
    statistics for the planner and a visibility map for index-only scans.
    """
    conn = psycopg2.connect(url)
    try:
        conn.autocommit = True
        conn.cursor().execute("VACUUM ANALYZE")
    finally:
        conn.close()


def measure_size(
    scratch: Scratch, n: int, args: argparse.Namespace
) -> tuple[dict[str, Any], Measure]:
    """
    Load (or reuse) a database of C{n} files and time every query on it;
    the results, and the L{Measure} (its connection still open under
    --smoke, for growth to be checked again; closed otherwise).
    """
    name = args.reuse_db or f"kobold_scale_{n}"
    say = lambda text: print(f"scale.py: {text}", file=sys.stderr, flush=True)  # noqa: E731
    started = time.monotonic()
    if args.reuse_db:
        url = scratch.named(name)
        db = Sync(url)
        # An older database is upgraded by the store's own start.
        db.run(schema.create_schema())
        quarantined = max(1, n // 2)
        db.close()
    else:
        url = scratch.make(name)
        load(url, n, say)
        db = Sync(url)
        quarantined = do_churn(db, n)
        db.close()
    loaded = time.monotonic() - started
    vacuum(url)
    say(f"{n:,} files ready in {loaded:.0f} s")
    sizes = Sync(url)
    size = sizes.sql("SELECT pg_database_size(current_database())")[0][0]
    relations = sizes.sql(
        "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c "
        "JOIN pg_namespace s ON s.oid = c.relnamespace "
        "WHERE s.nspname = 'public' AND c.relkind IN ('r', 'i') ORDER BY 2 DESC"
    )
    sizes.close()
    measure = Measure(url, n, args.repeat, args.explain, args.no_today)
    try:
        figures = measure.run(quarantined)
    finally:
        if not args.smoke:
            measure.db.close()
    server = serve(url, args) if args.server else None
    if not (args.keep_db or args.reuse_db or args.smoke):
        scratch.drop(name)
    return {
        "files": n,
        "load_seconds": loaded,
        "database_bytes": size,
        "bytes_per_file": size / max(n, 1),
        "relations": dict(relations),
        "figures": [f.__dict__ for f in figures],
        "plans": measure.plans,
        "server": server,
    }, measure


def table(results: list[dict[str, Any]]) -> str:
    """
    The figures as a markdown table: each query's time today and now, per size.
    """
    sizes = [r["files"] for r in results]
    head = (
        "| query | kind | "
        + " | ".join(f"{n:,} today | {n:,} now | {n:,} now, fastest" for n in sizes)
        + " |"
    )
    lines = [head, "| --- | --- |" + " ---: | ---: | ---: |" * len(sizes)]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        for f in r["figures"]:
            by_name.setdefault(f["name"], []).append(f)

    def ms(t: float | None) -> str:
        if t is None:
            return ""
        return f"{t:.0f} s" if t >= 10 else f"{t * 1000:.1f} ms" if t < 1 else f"{t:.2f} s"

    for name, figures in by_name.items():
        cells = " | ".join(
            f"{ms(f['today'])} | {ms(f['now'])} | {ms(f.get('best'))}" for f in figures
        )
        lines.append(f"| {name} | {figures[0]['kind']} | {cells} |")
    lines.append(
        "| database bytes per file | | "
        + " | ".join(f"{r['bytes_per_file']:.0f} | |" for r in results)
        + " |"
    )
    return "\n".join(lines)


def ratio(large: float, small: float) -> float:
    return max(large, NOISE_FLOOR) / max(small, NOISE_FLOOR)


def growth(small: Measure, large: Measure) -> list[str]:
    """
    The periodic queries (current ones) whose fastest run grew more than
    GROWTH times from C{small} to C{large}, each with its ratio; each one
    that seems to is timed again on both, RECHECK times interleaved, so
    that a moment of load on a shared machine does not pass for growth.
    """
    grown = []
    before = {f.name: f for f in small.figures}
    for f in large.figures:
        if f.kind != "periodic" or f.best is None or f.name not in small.units:
            continue
        if ratio(f.best, before[f.name].best or 0) <= GROWTH:
            continue
        fast_small, fast_large = [], []
        for _ in range(RECHECK):
            fast_small += small.runs(small.units[f.name], 1)
            fast_large += large.runs(large.units[f.name], 1)
        again = ratio(min(fast_large), min(fast_small))
        if again > GROWTH:
            grown.append(
                f"{f.name}: {again:.1f}x ({min(fast_small) * 1000:.1f} ms -> "
                f"{min(fast_large) * 1000:.1f} ms)"
            )
    return grown


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, nargs="+", default=[100_000], help="sizes to measure")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"sizes {SMOKE_SIZES}; exit 1 if a periodic query grows more than {GROWTH:g}x",
    )
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure (median)")
    parser.add_argument("--explain", action="store_true", help="EXPLAIN ANALYZE periodic queries")
    parser.add_argument(
        "--no-today",
        action="store_true",
        help="time the current queries only (today's take minutes each at 10^7)",
    )
    parser.add_argument("--out", default="koboldfs-scale.json", help="JSON results file")
    parser.add_argument("--tmp", default=None, help="scratch directory parent (--server)")
    parser.add_argument("--keep-db", action="store_true", help="keep the loaded database")
    parser.add_argument(
        "--server", action="store_true", help="also start a real server on each database"
    )
    parser.add_argument("--idle", type=float, default=60.0, help="seconds the server idles")
    parser.add_argument(
        "--reuse-db",
        default=None,
        metavar="NAME",
        help="measure a database loaded before (one size)",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("KOBOLDFS_TEST_POSTGRES_URL"),
        help="a PostgreSQL to make scratch databases in [default: $KOBOLDFS_TEST_POSTGRES_URL,"
        " else a throwaway one]",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.files = list(SMOKE_SIZES)
        args.explain = True
        args.repeat = min(args.repeat, 3)
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    if not args.postgres_url:
        from loadgen import reexec_under_postgres

        reexec_under_postgres(__file__)
        print("scale.py: no PostgreSQL (give --postgres-url)", file=sys.stderr)
        return 2
    scratch = Scratch(args.postgres_url)
    measured = [measure_size(scratch, n, args) for n in args.files]
    results = [result for result, _ in measured]
    with open(args.out, "w") as out:
        json.dump(results, out, indent=1)
    print(table(results))
    if args.explain:
        with open(args.out + ".plans.txt", "w") as out:
            for r in results:
                for name, plans in r["plans"].items():
                    out.write(f"### {r['files']:,} files: {name}\n\n" + "\n\n".join(plans) + "\n\n")
    if args.smoke:
        try:
            grown = growth(measured[0][1], measured[1][1])
        finally:
            for result, measure in measured:
                measure.db.close()
                scratch.drop(f"kobold_scale_{result['files']}")
        if grown:
            print(
                f"scale.py: periodic queries grew more than {GROWTH:g}x from "
                f"{SMOKE_SIZES[0]:,} to {SMOKE_SIZES[1]:,} files: " + "; ".join(grown)
            )
            return 1
        print(
            f"scale.py: every periodic query within {GROWTH:g}x from {SMOKE_SIZES[0]:,} "
            f"to {SMOKE_SIZES[1]:,} files"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
