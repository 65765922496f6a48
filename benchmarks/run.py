"""
KoboldFS beside this machine's own limits: the instrument of issue 6.

Starts real C{twistd koboldfs} servers on loopback, moves files through
both clients, and measures, in the same run, the same work done by
minimal Python programs (the baselines), so that every figure is also a
ratio that does not drift with a noisy host.  See benchmarks/README.md.

    python benchmarks/run.py                      # everything, medians of 3
    python benchmarks/run.py --quick              # counts cut down, one round
    python benchmarks/run.py --smoke              # seconds: does it still measure? (CI)
    python benchmarks/run.py --only small --setups sqlite-1 --clients deferred
    python benchmarks/run.py --huge               # also the 4 GiB RSS check
    bash .ci/postgres.sh .venv/bin/python benchmarks/run.py   # PostgreSQL given

Output: a table, one JSON line per figure (with its baseline and ratio,
and the target it is held to, if any), and the same in C{--out}.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import itertools
import json
import os
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

from loadgen import (
    CHECKOUT,
    MB,
    MIB,
    Databases,
    Profiler,
    Server,
    Workload,
    create_namespace,
    cpu_now,
    machine,
    median,
    postgres_cpu,
    reexec_under_postgres,
    replica_counts,
    run_threads,
    summarise,
)

NAMESPACE = "bench"

WORKLOADS = {
    "small": Workload("small", 4096, 5000, 16),
    "medium": Workload("medium", MIB, 500, 8),
    "large": Workload("large", 256 * MIB, 4, 2),
}
#: --quick: the same shapes, a tenth of the files (large: smaller files).
QUICK = {
    "small": Workload("small", 4096, 500, 16),
    "medium": Workload("medium", MIB, 50, 8),
    "large": Workload("large", 32 * MIB, 4, 2),
}
#: --smoke: just enough to see that every figure is produced (CI runs it).
SMOKE = {
    "small": Workload("small", 4096, 40, 4),
    "medium": Workload("medium", MIB, 4, 2),
    "large": Workload("large", 8 * MIB, 2, 2),
}
#: name -> (database kind, number of servers)
SETUPS = {
    "sqlite-1": ("sqlite", 1),
    "sqlite-2": ("sqlite", 2),
    "pg-1": ("postgresql", 1),
    "pg-2": ("postgresql", 2),
}
CLIENTS = ("blocking", "deferred")
ONLY_DEFAULT = "small,medium,large"


# -- the servers (loadgen.Server) ------------------------------------------------


def wait_replicated(url: str, servers: list[Server], timeout: float) -> float | None:
    """
    Seconds until every server holds a good copy of every live file, or
    None if that did not happen within C{timeout}.
    """
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        live, per_server = replica_counts(url)
        if all(per_server.get(s.name, 0) >= live for s in servers):
            return time.monotonic() - start
        time.sleep(0.1)
    return None


# -- the workers (child processes) -------------------------------------------------


def _bodies(spec: dict[str, Any]) -> Callable[[int], Any]:
    """
    What put number C{i} sends: a path (large files, read from disk as
    users do), or bytes.
    """
    if spec["source"]:
        return lambda i: spec["source"]
    distinct = [os.urandom(spec["size"]) for _ in range(min(spec["count"], 64))]
    return lambda i: distinct[i % len(distinct)]


def _output(spec: dict[str, Any]) -> Callable[[], Any]:
    if spec["size"] <= 64 * 1024:
        return io.BytesIO
    return lambda: open(os.devnull, "wb")


def worker_blocking(spec: dict[str, Any]) -> dict[str, Any]:
    """
    C{koboldfs.Client} shared by C{concurrency} threads.
    """
    from koboldfs import Client

    client = Client(NAMESPACE, servers=spec["servers"], timeout=300)
    body, output = _bodies(spec), _output(spec)

    def one(_: None, i: int) -> None:
        key = f"{spec['prefix']}/{i}"
        if spec["op"] == "put":
            ok = client.put(key, body(i))
        else:
            with contextlib.closing(output()) as out:
                ok = client.get(key, out)
        if not ok:
            raise RuntimeError(f"{spec['op']} {key} returned False")

    try:
        return run_threads(spec["count"], spec["concurrency"], one)
    finally:
        client.close()


def worker_deferred(spec: dict[str, Any]) -> dict[str, Any]:
    """
    One C{DeferredClient} on one reactor, C{concurrency} requests in
    flight as parallel Deferreds.
    """
    from twisted.internet import defer, task

    from koboldfs.client import DeferredClient

    result: dict[str, Any] = {}

    async def main(reactor: Any) -> None:
        client = DeferredClient(NAMESPACE, spec["servers"], reactor, timeout=300)
        body, output = _bodies(spec), _output(spec)
        numbers = iter(range(spec["count"]))
        latencies: list[float] = []
        errors: list[str] = []

        async def work() -> None:
            for i in numbers:
                key = f"{spec['prefix']}/{i}"
                t = time.perf_counter()
                try:
                    if spec["op"] == "put":
                        ok = await client.put(key, body(i))
                    else:
                        with contextlib.closing(output()) as out:
                            ok = await client.get(key, out)
                    if not ok:
                        raise RuntimeError(f"{spec['op']} {key} returned False")
                except Exception as e:  # counted and reported
                    errors.append(repr(e))
                    continue
                latencies.append(time.perf_counter() - t)

        start, cpu = time.perf_counter(), cpu_now()
        await defer.gatherResults(
            [defer.ensureDeferred(work()) for _ in range(spec["concurrency"])], consumeErrors=True
        )
        elapsed, cpu = time.perf_counter() - start, cpu_now() - cpu
        await client.close()
        result.update(summarise(elapsed, cpu, latencies, errors))

    with contextlib.suppress(SystemExit):
        task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
    return result


# Baselines.  Frames: 8-byte big-endian length, then the body; the receiver
# answers one byte once the file is durable.


def _recv_exact(sock: socket.socket, n: int, buf: memoryview) -> None:
    got = 0
    while got < n:
        r = sock.recv_into(buf[got:n])
        if not r:
            raise ConnectionError("peer closed")
        got += r


def _serve(handle: Callable[[socket.socket, int], None]) -> None:
    """
    Listen on a free loopback port (printed), and for each request on
    each connection (an 8-byte size) call C{handle(conn, size)}, one
    thread per connection.  Serves until killed.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)

    def serve(conn: socket.socket) -> None:
        head = memoryview(bytearray(8))
        with conn:
            while True:
                try:
                    _recv_exact(conn, 8, head)
                except ConnectionError:
                    return
                handle(conn, struct.unpack(">Q", head)[0])

    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def worker_raw_receiver(spec: dict[str, Any]) -> dict[str, Any]:
    """
    The ceiling for a put: receive, write to a temporary file, SHA-256,
    fsync, rename; answer one byte.
    """
    directory = spec["directory"]
    names = itertools.count()
    buffers = threading.local()

    def receive(conn: socket.socket, size: int) -> None:
        buf = getattr(buffers, "buf", None) or memoryview(bytearray(MIB))
        buffers.buf = buf
        n = next(names)
        tmp = os.path.join(directory, f"tmp{n}")
        digest = hashlib.sha256()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        left = size
        while left:
            r = conn.recv_into(buf[: min(left, MIB)])
            if not r:
                raise ConnectionError("peer closed")
            chunk = buf[:r]
            digest.update(chunk)
            os.write(fd, chunk)
            left -= r
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, os.path.join(directory, f"file{n}"))
        digest.hexdigest()
        conn.sendall(b"\x01")

    _serve(receive)
    return {}


def _connect(spec: dict[str, Any]) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", spec["port"]))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def worker_raw_put(spec: dict[str, Any]) -> dict[str, Any]:
    """
    Send C{count} files to the raw receiver, C{concurrency} connections.
    """
    body = None if spec["source"] else os.urandom(spec["size"])
    ack = memoryview(bytearray(1))

    def one(sock: socket.socket, i: int) -> None:
        sock.sendall(struct.pack(">Q", spec["size"]))
        if body is not None:
            sock.sendall(body)
        else:
            with open(spec["source"], "rb") as f:
                while chunk := f.read(MIB):
                    sock.sendall(chunk)
        _recv_exact(sock, 1, ack)

    return run_threads(spec["count"], spec["concurrency"], one, lambda: _connect(spec))


def worker_raw_sender(spec: dict[str, Any]) -> dict[str, Any]:
    """
    The ceiling for a get: C{os.sendfile} of the C{size} first bytes of
    C{source}.
    """
    fd = os.open(spec["source"], os.O_RDONLY)

    def send(conn: socket.socket, size: int) -> None:
        sent = 0
        while sent < size:
            sent += os.sendfile(conn.fileno(), fd, sent, size - sent)

    _serve(send)
    return {}


def worker_raw_get(spec: dict[str, Any]) -> dict[str, Any]:
    buffers = threading.local()

    def one(sock: socket.socket, i: int) -> None:
        buf = getattr(buffers, "buf", None) or memoryview(bytearray(MIB))
        buffers.buf = buf
        sock.sendall(struct.pack(">Q", spec["size"]))
        left = spec["size"]
        while left:
            r = sock.recv_into(buf[: min(left, MIB)])
            if not r:
                raise ConnectionError("sender closed")
            left -= r

    return run_threads(spec["count"], spec["concurrency"], one, lambda: _connect(spec))


def worker_raw_small_put(spec: dict[str, Any]) -> dict[str, Any]:
    """
    The ceiling for a small put: per file, write to a temporary file,
    fsync, rename, and one metadata insert (its own transaction) into the
    same kind of database the servers use, at the same concurrency.
    """
    directory = spec["directory"]
    url = spec["db"]
    table = (
        "CREATE TABLE IF NOT EXISTS raw_files (id {pk}, key TEXT NOT NULL UNIQUE,"
        " size BIGINT NOT NULL, sha256 TEXT NOT NULL, path TEXT NOT NULL)"
    )
    insert = "INSERT INTO raw_files (key, size, sha256, path) VALUES ({p}, {p}, {p}, {p})"
    if url.startswith("sqlite"):
        path = url[len("sqlite:///") :]

        def connect() -> Any:
            # As the server's store: WAL, synchronous=FULL, a busy timeout.
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 30000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            return conn

        pk, param = "INTEGER PRIMARY KEY AUTOINCREMENT", "?"
    else:
        import psycopg2

        def connect() -> Any:
            conn = psycopg2.connect(url)
            conn.autocommit = True
            return conn

        pk, param = "BIGSERIAL PRIMARY KEY", "%s"
    first = connect()
    first.cursor().execute(table.format(pk=pk))
    first.close()
    body = os.urandom(spec["size"])
    sha = hashlib.sha256(body).hexdigest()
    sql = insert.format(p=param)

    def one(conn: Any, i: int) -> None:
        tmp, final = os.path.join(directory, f"t{i}"), os.path.join(directory, f"f{i}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, body)
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, final)
        conn.cursor().execute(sql, (f"{spec['prefix']}/{i}", len(body), sha, final))

    return run_threads(spec["count"], spec["concurrency"], one, connect)


WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "blocking": worker_blocking,
    "deferred": worker_deferred,
    "raw-receiver": worker_raw_receiver,
    "raw-put": worker_raw_put,
    "raw-sender": worker_raw_sender,
    "raw-get": worker_raw_get,
    "raw-small-put": worker_raw_small_put,
}


def run_worker(kind: str, spec: dict[str, Any], sync: bool = True) -> dict[str, Any]:
    """
    Run worker C{kind} in a child process and return what it measured.
    """
    # Start from no dirty pages: what the last phase wrote is not flushed
    # on this one's time (the disk of a shared host is the noisiest part).
    if sync:
        os.sync()
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", kind, json.dumps(spec)],
        env={**os.environ, "PYTHONPATH": CHECKOUT},
        stdout=subprocess.PIPE,
        check=False,
        timeout=3600,
    )
    lines = out.stdout.decode().strip().splitlines()
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"worker {kind} failed ({out.returncode}): {out.stdout[-2000:]!r}")
    result = json.loads(lines[-1])
    if result["errors"]:
        raise RuntimeError(
            f"worker {kind}: {result['errors']} errors, first {result['first_error']}"
        )
    return result


@contextlib.contextmanager
def background_worker(kind: str, spec: dict[str, Any]) -> Iterator[int]:
    """
    A serving worker (receiver, sender) for the time of a block: its port.
    """
    process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--worker", kind, json.dumps(spec)],
        env={**os.environ, "PYTHONPATH": CHECKOUT},
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        yield port
    finally:
        process.kill()
        process.wait()


# -- the run -------------------------------------------------------------------------


def drop_large_files(base: str, least: int = MIB) -> None:
    """
    Delete the files of C{least} bytes or more under C{base}, to free the
    disk between setups.  The many small ones wait for the end of the run:
    after a mass delete, ext4 creates files several times slower for
    minutes (shared/STACK.md), which would slow the next setup's puts.
    """
    for root, _dirs, names in os.walk(base):
        for name in names:
            path = os.path.join(root, name)
            with contextlib.suppress(OSError):
                if os.lstat(path).st_size >= least:
                    os.unlink(path)


@dataclass
class Figure:
    """
    One measured figure: what the JSON lines and the table show.
    """

    setup: str
    client: str
    workload: str
    figure: str
    value: float | None
    unit: str
    baseline: float | None = None
    baseline_name: str | None = None
    ratio: float | None = None
    target: str | None = None
    met: bool | None = None
    samples: list[float] = field(default_factory=list)
    note: str | None = None


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workloads = SMOKE if args.smoke else QUICK if args.quick else WORKLOADS
        self.base = tempfile.mkdtemp(prefix="koboldfs-bench-", dir=args.tmp)
        self.dbs = Databases(self.base, args.postgres_url)
        self.sources: dict[str, str] = {}
        # (setup, client, workload, measure) -> samples
        self.samples: dict[tuple[str, str, str, str], list[float]] = {}
        self.notes: list[str] = []
        self.extra: list[Figure] = []
        self.run_id = uuid.uuid4().hex[:8]

    def add(self, setup: str, client: str, workload: str, measure: str, value: float) -> None:
        self.samples.setdefault((setup, client, workload, measure), []).append(value)

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def fresh_dir(self, label: str) -> str:
        # A new directory for each run's files: ext4 here is slow to create
        # files for minutes after a mass delete (see shared/STACK.md).
        return tempfile.mkdtemp(prefix=f"{label}-", dir=self.base)

    def source(self, size: int) -> str:
        """
        A file of C{size} random bytes (a 64 MiB random block, repeated),
        for large puts and the get baseline.
        """
        if size not in self.sources:
            path = os.path.join(self.base, f"source-{size}.bin")
            block = os.urandom(min(size, 64 * MIB))
            with open(path, "wb") as f:
                left = size
                while left:
                    left -= f.write(block[: min(left, len(block))])
            self.sources[size] = path
        return self.sources[size]

    # -- baselines

    def baselines(self, setup: str, kind: str, url: str) -> None:
        for name in self.args.only:
            if name not in self.workloads:
                continue
            w = self.workloads[name]
            if name == "small":
                result = run_worker(
                    "raw-small-put",
                    {
                        "directory": self.fresh_dir("raw-small"),
                        "db": url,
                        "size": w.size,
                        "count": w.count,
                        "concurrency": w.concurrency,
                        "prefix": uuid.uuid4().hex,
                    },
                )
                self.add(setup, "raw", name, "put/s", result["ops"] / result["seconds"])
                self.add(setup, "raw", name, "put p99 ms", result["p99_ms"])
                continue
            source = self.source(w.size) if name == "large" else None
            directory = self.fresh_dir(f"raw-{name}")
            with background_worker("raw-receiver", {"directory": directory}) as port:
                result = run_worker(
                    "raw-put",
                    {
                        "port": port,
                        "source": source,
                        "size": w.size,
                        "count": w.count,
                        "concurrency": w.concurrency,
                    },
                )
            shutil.rmtree(directory, ignore_errors=True)
            self.add(
                setup, "raw", name, "put MB/s", result["ops"] * w.size / MB / result["seconds"]
            )
            self.add(setup, "raw", name, "put/s", result["ops"] / result["seconds"])
            if SETUPS[setup][1] > 1:
                self.add(setup, "raw", name, "put 2 copies MB/s", self.raw_two_copies(w, source))
            with background_worker("raw-sender", {"source": self.source(w.size)}) as port:
                result = run_worker(
                    "raw-get",
                    {"port": port, "size": w.size, "count": w.count, "concurrency": w.concurrency},
                )
            self.add(
                setup, "raw", name, "get MB/s", result["ops"] * w.size / MB / result["seconds"]
            )
            self.add(setup, "raw", name, "get/s", result["ops"] / result["seconds"])

    def raw_two_copies(self, w: Workload, source: str | None) -> float:
        """
        The raw put sent to two receivers at once, each file to both: what
        two durable copies on this machine's one disk and two cores allow
        at all.  MB/s of files on both.
        """
        directories = [self.fresh_dir("raw-two") for _ in range(2)]
        spec = {"source": source, "size": w.size, "count": w.count, "concurrency": w.concurrency}
        with contextlib.ExitStack() as stack:
            ports = [
                stack.enter_context(background_worker("raw-receiver", {"directory": d}))
                for d in directories
            ]
            os.sync()
            results: list[dict[str, Any]] = []
            start = time.perf_counter()
            threads = [
                threading.Thread(
                    target=lambda p: results.append(
                        run_worker("raw-put", {**spec, "port": p}, sync=False)
                    ),
                    args=(port,),
                )
                for port in ports
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - start
        for d in directories:
            shutil.rmtree(d, ignore_errors=True)
        if len(results) != 2:
            raise RuntimeError("raw put of two copies failed")
        return w.count * w.size / MB / elapsed

    # -- one setup

    def setup(self, setup: str) -> None:
        kind, n = SETUPS[setup]
        url = self.dbs.new(kind, setup)
        base = self.fresh_dir(setup)
        extra = ("--replicate-interval=1",) if n > 1 else ()
        servers: list[Server] = []
        self.log(f"{setup}: starting {n} server(s) on {kind}")
        try:
            for i in range(n):
                # Each on a --host of its own: a put is forwarded only to a
                # peer on another host (docs/replication.md).
                servers.append(Server(base, f"{setup}-s{i}", url, extra, host=f"{setup}-h{i}"))
            addresses = [s.address for s in servers]
            if n > 1:
                self.require_copies(setup, url, servers, n)
            for r in range(self.args.repeat):
                self.log(f"{setup}: baselines, round {r + 1}")
                raw_url = self.dbs.new(kind, f"raw{r}")
                try:
                    self.baselines(setup, kind, raw_url)
                finally:
                    self.dbs.drop(raw_url)
                for name in self.args.only:
                    if name not in self.workloads:
                        continue
                    w = self.workloads[name]
                    clients = list(self.args.clients)
                    # Alternate which client goes first.
                    for client in clients if r % 2 == 0 else clients[::-1]:
                        self.log(f"{setup}: {name} {client}, round {r + 1}")
                        prefix = f"{self.run_id}/{setup}/{name}/{client}/{r}"
                        for op in ("put", "get"):
                            self.phase(setup, client, w, op, prefix, servers, addresses, url)
            for s in servers:
                self.add(setup, "server", "all", f"peak RSS MiB {s.name}", s.peak_rss_mib())
        finally:
            for s in servers:
                s.stop_blocking()
            self.dbs.drop(url)
            drop_large_files(base)

    def require_copies(self, setup: str, url: str, servers: list[Server], copies: int) -> None:
        """
        Make the benchmark namespace strict about C{copies} durable copies
        before a put is acknowledged, then wait until a put through each
        server succeeds (each must see the others alive first).
        """
        create_namespace(url, NAMESPACE, copies)
        deadline = time.monotonic() + 60
        for server in servers:
            while True:
                spec = {
                    "servers": [server.address],
                    "op": "put",
                    "size": 4096,
                    "count": 1,
                    "concurrency": 1,
                    "prefix": f"{self.run_id}/{setup}/warmup/{server.name}",
                    "source": None,
                }
                try:
                    run_worker("blocking", spec)
                    break
                except RuntimeError as e:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{setup}: no put with {copies} copies: {e}") from e
                    time.sleep(0.5)
        live, per_server = replica_counts(url)
        if not all(per_server.get(s.name, 0) == live for s in servers):
            raise RuntimeError(f"{setup}: min_copies={copies} put left copies {per_server}")

    def phase(
        self,
        setup: str,
        client: str,
        w: Workload,
        op: str,
        prefix: str,
        servers: list[Server],
        addresses: list[str],
        url: str,
    ) -> None:
        spec = {
            "servers": addresses,
            "op": op,
            "size": w.size,
            "count": w.count,
            "concurrency": w.concurrency,
            "prefix": prefix,
            "source": self.source(w.size) if w.name == "large" and op == "put" else None,
        }
        db_cpu = postgres_cpu() if url.startswith("postgresql") else None
        cpu = sum(s.cpu() for s in servers)
        profiler = Profiler(
            self.args.profile,
            [(s.name, s.pid) for s in servers],
            f"{setup}.{w.name}.{client}.{op}",
        )
        try:
            result = run_worker(client, spec)
        finally:
            profiler.stop()
        lag = missing = None
        if op == "put" and len(servers) > 1:
            # With min_copies=2 every acknowledged put is on both servers:
            # count the copies missing right away, then (should any be)
            # wait for the replicator, so that gets find copies on both.
            live, per_server = replica_counts(url)
            missing = sum(max(0, live - per_server.get(s.name, 0)) for s in servers)
            if missing:
                self.notes.append(f"{setup} {w.name} {client}: {missing} copies missing at ack")
            lag = wait_replicated(url, servers, self.args.replication_timeout)
            if lag is None:
                self.notes.append(f"{setup} {w.name} {client}: replication not done in time")
        cpu = sum(s.cpu() for s in servers) - cpu
        seconds = result["seconds"]
        self.add(setup, client, w.name, f"{op}/s", result["ops"] / seconds)
        self.add(setup, client, w.name, f"{op} MB/s", result["ops"] * w.size / MB / seconds)
        self.add(setup, client, w.name, f"{op} p50 ms", result["p50_ms"])
        self.add(setup, client, w.name, f"{op} p99 ms", result["p99_ms"])
        self.add(
            setup, client, w.name, f"{op} client CPU %", 100 * result["client_cpu_s"] / seconds
        )
        self.add(setup, client, w.name, f"{op} server CPU %", 100 * cpu / seconds)
        if w.name == "small":
            self.add(
                setup, client, w.name, f"{op} server CPU s/1000 files", cpu / (result["ops"] / 1000)
            )
        else:
            self.add(
                setup, client, w.name, f"{op} server CPU s/GB", cpu / (result["ops"] * w.size / 1e9)
            )
        if db_cpu is not None:
            used = (postgres_cpu() or 0.0) - db_cpu
            unit = "1000 files" if w.name == "small" else "GB"
            amount = result["ops"] / 1000 if w.name == "small" else result["ops"] * w.size / 1e9
            self.add(setup, client, w.name, f"{op} PostgreSQL CPU s/{unit}", used / amount)
        if missing is not None:
            self.add(setup, client, w.name, "copies missing after last put", missing)
        if lag is not None:
            self.add(setup, client, w.name, "replicated s after last put", lag)

    # -- the 4 GiB check

    def huge(self) -> None:
        size = self.args.huge_gib * (1 << 30)
        self.log(f"huge: one {self.args.huge_gib} GiB file in and out, one server on SQLite")
        source = self.source(size)
        base = self.fresh_dir("huge")
        server = Server(base, "huge-s0", None)
        peak_sampled = 0.0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak_sampled
            while not stop.wait(0.2):
                with contextlib.suppress(OSError, RuntimeError):
                    peak_sampled = max(peak_sampled, server.rss_mib())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            start_rss = server.peak_rss_mib()
            for op in ("put", "get"):
                result = run_worker(
                    "blocking",
                    {
                        "servers": [server.address],
                        "op": op,
                        "size": size,
                        "count": 1,
                        "concurrency": 1,
                        "prefix": f"{self.run_id}/huge",
                        "source": source if op == "put" else None,
                    },
                )
                self.add("huge", "blocking", "huge", f"{op} MB/s", size / MB / result["seconds"])
            peak = server.peak_rss_mib()
        finally:
            stop.set()
            server.stop_blocking()
            shutil.rmtree(base, ignore_errors=True)
            os.unlink(source)
            del self.sources[size]
        self.add("huge", "server", "huge", "RSS MiB at start", start_rss)
        self.add("huge", "server", "huge", "peak RSS MiB", peak)
        self.add("huge", "server", "huge", "peak RSS MiB (sampled)", peak_sampled)

    def close(self) -> None:
        for name in list(self.dbs.made):
            with contextlib.suppress(Exception):
                self.dbs._admin(f"DROP DATABASE IF EXISTS {name}")
        shutil.rmtree(self.base, ignore_errors=True)


# -- figures, targets, output -----------------------------------------------------------


def figures(bench: Bench) -> list[Figure]:
    s = bench.samples
    out: list[Figure] = []
    setups = list(dict.fromkeys(k[0] for k in s))
    for setup in setups:
        kind_servers = SETUPS.get(setup)
        one_server = kind_servers is not None and kind_servers[1] == 1
        for (st, client, workload, measure), samples in s.items():
            if st != setup:
                continue
            fig = Figure(
                setup, client, workload, measure, median(samples), _unit(measure), samples=samples
            )
            if client in CLIENTS and workload != "huge":
                _compare(fig, s, one_server)
            if workload == "huge" and measure.startswith("peak RSS MiB"):
                fig.target = "< 150 MB"
                fig.met = fig.value is not None and fig.value * MIB < 150 * MB
            out.append(fig)
        # The DeferredClient against the blocking Client.
        for workload in ("small", "medium", "large"):
            for op in ("put", "get"):
                measure = f"{op}/s"
                b = median(s.get((setup, "blocking", workload, measure)))
                d = median(s.get((setup, "deferred", workload, measure)))
                if b and d:
                    fig = Figure(
                        setup, "deferred/blocking", workload, f"{op} rate ratio", d / b, "x"
                    )
                    if workload == "large":
                        fig.target, fig.met = ">= 0.90 (within 10%)", d / b >= 0.9
                    elif workload == "small":
                        fig.target, fig.met = "> 1.00 (ahead)", d / b > 1.0
                    out.append(fig)
    return out + bench.extra


def _unit(measure: str) -> str:
    for unit in ("MB/s", "ms", "%", "MiB", "s/GB", "s/1000 files", "copies"):
        if unit in measure:
            return unit
    if measure.endswith("/s"):
        return "files/s"
    return "s"


def _compare(
    fig: Figure, s: dict[tuple[str, str, str, str], list[float]], one_server: bool
) -> None:
    """
    Attach the baseline, the ratio, and the issue's target to C{fig}.
    """
    w, m = fig.workload, fig.figure
    if w == "small" and m == "put/s":
        fig.baseline_name = "raw small put (write+fsync+rename+insert)"
        fig.baseline = median(s.get((fig.setup, "raw", w, "put/s")))
        if one_server:
            fig.target = ">= 0.50 x raw"
    elif w == "small" and m == "get/s":
        if one_server:
            fig.target = ">= 3000/s"
            fig.met = fig.value is not None and fig.value >= 3000
    elif w == "small" and m == "get p99 ms":
        if one_server:
            fig.target = "< 20 ms"
            fig.met = fig.value is not None and fig.value < 20
    elif w in ("medium", "large") and m in ("put MB/s", "get MB/s", "put/s", "get/s"):
        op = m.split()[0].split("/")[0]
        fig.baseline_name = (
            f"raw {op} ({'receive+SHA-256+write+fsync+rename' if op == 'put' else 'sendfile'})"
        )
        fig.baseline = median(s.get((fig.setup, "raw", w, m)))
        if w == "large" and m == "put MB/s":
            fig.target = ">= 0.70 x raw" if one_server else ">= 0.50 x raw (min_copies=2)"
        elif w == "large" and m == "get MB/s" and one_server:
            fig.target = ">= 0.80 x raw"
    if m == "put MB/s" and not one_server:
        both = median(s.get((fig.setup, "raw", w, "put 2 copies MB/s")))
        if both and fig.value is not None:
            fig.note = f"{fig.value / both:.2f} x raw put of 2 copies at once ({both:,.0f} MB/s)"
    if fig.baseline and fig.value is not None:
        fig.ratio = fig.value / fig.baseline
        if fig.target and "x raw" in fig.target:
            fig.met = fig.ratio >= float(fig.target.split()[1])


def table(figs: list[Figure]) -> str:
    lines = [
        f"{'setup':<9} {'client':<18} {'load':<7} {'figure':<34} {'value':>10} "
        f"{'baseline':>10} {'ratio':>6}  target",
    ]
    for f in figs:
        value = (
            "-" if f.value is None else f"{f.value:.4g}" if abs(f.value) < 10 else f"{f.value:,.0f}"
        )
        base = "" if f.baseline is None else f"{f.baseline:,.0f}"
        ratio = "" if f.ratio is None else f"{f.ratio:.2f}"
        target = ""
        if f.target:
            target = f"{f.target} {'MET' if f.met else 'NOT MET' if f.met is not None else ''}"
        if f.note:
            target = f"{target}; {f.note}" if target else f.note
        name = f.figure if f.unit in f.figure else f"{f.figure} ({f.unit})"
        lines.append(
            f"{f.setup:<9} {f.client:<18} {f.workload:<7} {name:<34} "
            f"{value:>10} {base:>10} {ratio:>6}  {target}"
        )
    return "\n".join(lines)


def smoke_problems(figs: list[Figure], args: argparse.Namespace) -> list[str]:
    """
    What a smoke run failed to measure: a rate for each client, workload,
    setup and operation, and for each baseline, all above zero.
    """
    rates = {(f.setup, f.client, f.workload, f.figure): f.value for f in figs}
    wanted = []
    for setup in args.setups:
        for workload in args.only:
            for op in ("put", "get"):
                for client in args.clients:
                    wanted.append((setup, client, workload, f"{op}/s"))
                if op == "put" or workload != "small":
                    wanted.append((setup, "raw", workload, f"{op}/s"))
    return [
        f"no {' '.join(key)} figure (got {rates.get(key)!r})"
        for key in wanted
        if not (rates.get(key) or 0) > 0
    ]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a tenth of the files, one round")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a few files, one round, sqlite-1 only; exit 1 unless every figure was measured",
    )
    parser.add_argument(
        "--only", default=ONLY_DEFAULT, help=f"workloads: {ONLY_DEFAULT} (--smoke: small,large)"
    )
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"of {','.join(SETUPS)}")
    parser.add_argument("--clients", default=",".join(CLIENTS), help="blocking,deferred")
    parser.add_argument("--repeat", type=int, default=None, help="rounds (default 3; --quick 1)")
    parser.add_argument("--huge", action="store_true", help="also the 4 GiB in-and-out RSS check")
    parser.add_argument("--huge-gib", type=int, default=4)
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("KOBOLDFS_TEST_POSTGRES_URL"),
        help="a PostgreSQL to create scratch databases in"
        " [default: $KOBOLDFS_TEST_POSTGRES_URL, else a throwaway one]",
    )
    parser.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL setups")
    parser.add_argument("--out", default="koboldfs-bench.json", help="JSON results file")
    parser.add_argument("--tmp", default=None, help="scratch directory parent [default: $TMPDIR]")
    parser.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="py-spy the servers during each phase into DIR (slows them)",
    )
    parser.add_argument("--replication-timeout", type=float, default=300)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    if args.smoke:
        args.quick, args.no_postgres = True, True
        args.setups = "sqlite-1"
        if args.only == ONLY_DEFAULT:
            args.only = "small,large"
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.only = [w for w in args.only.split(",") if w]
    args.setups = [s for s in args.setups.split(",") if s]
    args.clients = [c for c in args.clients.split(",") if c]
    for name in args.only:
        if name not in WORKLOADS:
            parser.error(f"unknown workload {name!r}")
    for name in args.setups:
        if name not in SETUPS:
            parser.error(f"unknown setup {name!r}")
    for name in args.clients:
        if name not in CLIENTS:
            parser.error(f"unknown client {name!r}")
    if args.no_postgres:
        args.setups = [s for s in args.setups if SETUPS[s][0] != "postgresql"]
    return args


def report(bench: Bench, args: argparse.Namespace, started: float) -> None:
    """
    Print the table and the JSON lines, and write C{--out}.
    """
    figs = figures(bench)
    print(table(figs), flush=True)
    for fig in figs:
        line = {k: v for k, v in asdict(fig).items() if v is not None and k != "samples"}
        print(json.dumps(line))
    out = {
        "machine": machine(),
        "seconds": time.monotonic() - started,
        "args": {k: v for k, v in vars(args).items() if k != "worker"},
        "workloads": {k: asdict(v) for k, v in bench.workloads.items() if k in args.only},
        "notes": bench.notes,
        "figures": [asdict(f) for f in figs],
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(
        f"run.py: {len(figs)} figures in {out['seconds']:.0f} s, written to {args.out}",
        file=sys.stderr,
        flush=True,
    )


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.worker:
        kind, spec = args.worker
        print(json.dumps(WORKERS[kind](json.loads(spec))), flush=True)
        return 0
    if not args.postgres_url and any(SETUPS[s][0] == "postgresql" for s in args.setups):
        # PostgreSQL setups asked for and none given: a throwaway cluster.
        reexec_under_postgres(__file__)
    if args.postgres_url is None and any(SETUPS[s][0] == "postgresql" for s in args.setups):
        print("run.py: no PostgreSQL: skipping its setups", file=sys.stderr)
        args.setups = [s for s in args.setups if SETUPS[s][0] != "postgresql"]
    bench = Bench(args)
    started = time.monotonic()
    try:
        for setup in args.setups:
            bench.setup(setup)
        if args.huge:
            bench.huge()
        report(bench, args, started)
    finally:
        # Last: deleting tens of thousands of files takes minutes here.
        bench.close()
    figs = figures(bench)
    if args.smoke:
        problems = smoke_problems(figs, args)
        for problem in problems:
            print(f"run.py: smoke run: {problem}", file=sys.stderr)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
