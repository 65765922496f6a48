"""
What the benchmark scripts share (benchmarks/run.py, benchmarks/peers.py,
and benchmarks/s3.py to come): the load generator (threads, timing,
percentiles), CPU accounting from /proc, bodies that a store cannot serve
wrongly unnoticed, and the KoboldFS servers and metadata databases they
start.  See benchmarks/README.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, CHECKOUT)

from koboldfs.test.cluster import ServerProcess  # noqa: E402 - needs the path above

MB = 1_000_000
GB = 1_000_000_000
MIB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Guards the re-exec under .ci/postgres.sh against a loop.
REEXEC_ENV = "KOBOLDFS_BENCH_UNDER_POSTGRES_SH"


@dataclass(frozen=True)
class Workload:
    """
    C{count} files of C{size} bytes, C{concurrency} requests in flight.
    """

    name: str
    size: int
    count: int
    concurrency: int


# -- reading processes ---------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        # Fields after the command name, which may hold spaces: state is [0].
        return f.read().rpartition(")")[2].split()


def cpu_seconds(pid: int, children: bool = False) -> float:
    """
    User + system CPU of process C{pid} (all its threads); with
    C{children}, also of its reaped children (PostgreSQL's backends).
    """
    fields = _stat_fields(pid)
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def status_kib(pid: int, field_name: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field_name} in /proc/{pid}/status")


def postgres_cpu(pgdata: str | None = None) -> float | None:
    """
    CPU used so far by the PostgreSQL cluster in C{pgdata} (by default
    that of .ci/postgres.sh): the postmaster, its reaped children, and the
    live ones (backends, WAL writer, checkpointer...); None when unknown.
    """
    pgdata = pgdata or os.environ.get("KOBOLDFS_TEST_PGDATA")
    if not pgdata:
        return None
    try:
        with open(os.path.join(pgdata, "postmaster.pid")) as f:
            master = int(f.readline())
        total = cpu_seconds(master, children=True)
    except (OSError, ValueError):
        return None
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = _stat_fields(int(entry))
                if int(fields[1]) == master:
                    total += cpu_seconds(int(entry), children=True)
            except (OSError, IndexError, ValueError):
                continue
    return total


class CpuMeter:
    """
    CPU seconds of named processes (or groups of them), read from /proc
    before and after a phase: C{used(before, read())} is what each spent
    in between.  A reader that cannot tell (a process gone, no
    PostgreSQL data directory) gives None.
    """

    def __init__(self) -> None:
        self.readers: dict[str, Callable[[], float | None]] = {}

    def add(self, name: str, reader: Callable[[], float | None]) -> None:
        self.readers[name] = reader

    def add_pid(self, name: str, pid: int) -> None:
        self.add(name, lambda: cpu_seconds(pid))

    def read(self) -> dict[str, float | None]:
        values: dict[str, float | None] = {}
        for name, reader in self.readers.items():
            try:
                values[name] = reader()
            except (OSError, ValueError, IndexError):
                values[name] = None
        return values

    @staticmethod
    def used(
        before: dict[str, float | None], after: dict[str, float | None]
    ) -> dict[str, float | None]:
        return {
            name: None if b is None or after.get(name) is None else after[name] - b  # type: ignore[operator]
            for name, b in before.items()
        }


class Profiler:
    """
    py-spy attached to processes for one phase: collapsed stacks (all
    threads, idle ones left out, L{RATE} samples a second of each thread
    on a CPU; with C{gil}, only the thread holding the GIL) in
    C{DIR/LABEL.NAME.txt}, for C{benchmarks/profile.py} to sum up.  Given
    no directory, does nothing.
    """

    RATE = 250

    def __init__(
        self,
        directory: str | None,
        processes: list[tuple[str, int]],
        label: str,
        gil: bool = False,
    ) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []
        if directory is None:
            return
        spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        os.makedirs(directory, exist_ok=True)
        for name, pid in processes:
            out = os.path.join(directory, f"{label}.{name}.txt")
            # Not --native, which stops the process for every sample: time
            # in C (hashing, a syscall) is its Python caller's line's.
            argv = [spy, "record", "--pid", str(pid), "--format", "raw", "--threads"]
            argv += ["--rate", str(self.RATE), "--nonblocking", "-o", out]
            if gil:
                # Only the thread holding the GIL: the Python work.
                argv.append("--gil")
            self.processes.append(
                subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        time.sleep(0.5)

    def stop(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGINT)
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


# -- the load generator ------------------------------------------------------------


def cpu_now() -> float:
    """
    This process's user + system CPU so far.
    """
    user, system = os.times()[:2]
    return user + system


def summarise(
    elapsed: float, cpu: float, latencies: list[float], errors: list[str]
) -> dict[str, Any]:
    """
    What a worker measured, for the parent: C{cpu} is the CPU the timed
    part used.
    """
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    return {
        "seconds": elapsed,
        "ops": len(latencies),
        "p50_ms": pct(0.50) if latencies else None,
        "p99_ms": pct(0.99) if latencies else None,
        "client_cpu_s": cpu,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def run_threads(
    count: int,
    concurrency: int,
    one: Callable[[Any, int], None],
    setup: Callable[[], Any] = lambda: None,
) -> dict[str, Any]:
    """
    Do C{one(state, i)} for i in range(count) on C{concurrency} threads,
    each with its own C{state} from C{setup()} (closed after, if it can
    be), timing each call.  An error ends its thread and is reported.
    """
    numbers = iter(range(count))
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []

    def work() -> None:
        try:
            state = setup()
            with contextlib.closing(state) if hasattr(state, "close") else contextlib.nullcontext():
                while True:
                    with lock:
                        i = next(numbers, None)
                    if i is None:
                        return
                    t = time.perf_counter()
                    one(state, i)
                    latencies.append(time.perf_counter() - t)
        except Exception as e:  # counted and reported
            errors.append(repr(e))

    threads = [threading.Thread(target=work) for _ in range(concurrency)]
    start, cpu = time.perf_counter(), cpu_now()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarise(time.perf_counter() - start, cpu_now() - cpu, latencies, errors)


def median(samples: Sequence[float | None] | None) -> float | None:
    values = [s for s in samples or [] if s is not None]
    return statistics.median(values) if values else None


def machine() -> dict[str, Any]:
    """
    Where and when figures were measured, for the JSON results.
    """
    load = os.getloadavg()
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_at_end": load,
        "kernel": platform.release(),
    }


# -- stores, and bodies they cannot get wrong unnoticed ------------------------------


class Store(Protocol):
    """
    What the load generator drives: one connection (client) per thread,
    puts of bytes, and gets that return what came back as (SHA-256,
    length), so that the generator checks every byte of every store the
    same way.
    """

    name: str

    def connect(self) -> Any: ...

    def put(self, connection: Any, key: str, body: bytes) -> None: ...

    def get(self, connection: Any, key: str, size: int) -> tuple[bytes, int]: ...


class HashingWriter:
    """
    An output file that keeps only the SHA-256 and length of what is
    written to it: large gets are checked without holding the file.
    """

    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()
        self.length = 0

    def write(self, chunk: bytes | memoryview) -> int:
        self.sha256.update(chunk)
        self.length += len(chunk)
        return len(chunk)

    def result(self) -> tuple[bytes, int]:
        return self.sha256.digest(), self.length


#: Gets of at most this many bytes are read into memory, then hashed (as
#: applications read small files); larger ones are hashed as they arrive.
IN_MEMORY = MIB


class Bodies:
    """
    A distinct body of C{size} bytes for every key: one random block
    shared by all, ending in the SHA-256 of the key.  A store that served
    another key's bytes, a truncated or a stale copy fails L{check}, and
    each key's digest is known without keeping anything per key (the
    block's hash state, copied and fed the key's tail).
    """

    TAIL = 32

    def __init__(self, size: int) -> None:
        if size < self.TAIL:
            raise ValueError(f"bodies of at least {self.TAIL} bytes")
        self.size = size
        self._block = os.urandom(size - self.TAIL)
        self._head = hashlib.sha256(self._block)

    @staticmethod
    def _tail(key: str) -> bytes:
        return hashlib.sha256(key.encode()).digest()

    def body(self, key: str) -> bytes:
        return self._block + self._tail(key)

    def digest(self, key: str) -> bytes:
        h = self._head.copy()
        h.update(self._tail(key))
        return h.digest()

    def check(self, key: str, got: tuple[bytes, int]) -> None:
        digest, length = got
        if length != self.size:
            raise ValueError(f"{key}: {length} bytes came back, {self.size} were put")
        if digest != self.digest(key):
            raise ValueError(f"{key}: the bytes that came back are not those put")


def output_for(size: int) -> io.BytesIO | HashingWriter:
    return io.BytesIO() if size <= IN_MEMORY else HashingWriter()


def result_of(output: io.BytesIO | HashingWriter) -> tuple[bytes, int]:
    if isinstance(output, io.BytesIO):
        data = output.getbuffer()
        return hashlib.sha256(data).digest(), len(data)
    return output.result()


def run_ops(store: Store, op: str, w: Workload, prefix: str, bodies: Bodies) -> dict[str, Any]:
    """
    C{w.count} puts (or gets, each checked against L{Bodies}) of keys
    C{PREFIX/0}, C{PREFIX/1}... through C{store}, C{w.concurrency}
    threads each with its own connection; what L{summarise} says.
    Raises if any request failed.
    """

    def one(connection: Any, i: int) -> None:
        key = f"{prefix}/{i}"
        if op == "put":
            store.put(connection, key, bodies.body(key))
        else:
            bodies.check(key, store.get(connection, key, w.size))

    result = run_threads(w.count, w.concurrency, one, store.connect)
    if result["errors"]:
        raise RuntimeError(
            f"{store.name} {op} {w.name}: {result['errors']} errors, first {result['first_error']}"
        )
    return result


# -- KoboldFS servers and their metadata ---------------------------------------------


class Server(ServerProcess):
    """
    One C{twistd -n koboldfs} process, this checkout's code, started and
    stopped without a reactor; with what it costs, from /proc.
    """

    def __init__(
        self,
        base: str,
        name: str,
        db: str | None,
        extra: tuple[str, ...] = (),
        host: str | None = None,
        checkout: str = CHECKOUT,
    ) -> None:
        # A longer --down-after than the tests': a busy 2-core host may
        # delay a heartbeat, and a peer thought down would skew the figures.
        super().__init__(
            base, name, db, host=host, extra=("--down-after=10", *extra), checkout=checkout
        )
        self.start_blocking()

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def peak_rss_mib(self) -> float:
        return status_kib(self.pid, "VmHWM") / 1024

    def rss_mib(self) -> float:
        return status_kib(self.pid, "VmRSS") / 1024


class Databases:
    """
    Fresh metadata databases: SQLite files in the scratch directory, or
    PostgreSQL databases created in (and dropped from) the cluster at
    C{pg_url}.
    """

    def __init__(self, base: str, pg_url: str | None) -> None:
        self.base = base
        self.pg_url = pg_url
        self.made: list[str] = []
        self.numbers = itertools.count()

    def new(self, kind: str, label: str) -> str:
        if kind == "sqlite":
            directory = tempfile.mkdtemp(prefix=f"db-{label}-", dir=self.base)
            return f"sqlite:///{os.path.join(directory, 'metadata.sqlite')}"
        if self.pg_url is None:
            raise RuntimeError("no PostgreSQL")
        name = f"kobold_bench_{os.getpid()}_{next(self.numbers)}_{label.replace('-', '_')}"
        self._admin(f"CREATE DATABASE {name}")
        self.made.append(name)
        from urllib.parse import urlsplit

        return urlsplit(self.pg_url)._replace(path="/" + name).geturl()

    def drop(self, url: str) -> None:
        name = url.rsplit("/", 1)[1].split("?")[0]
        if url.startswith("postgresql") and name in self.made:
            self._admin(f"DROP DATABASE IF EXISTS {name}")
            self.made.remove(name)

    def _admin(self, sql: str) -> None:
        import psycopg2

        conn = psycopg2.connect(self.pg_url)
        try:
            conn.autocommit = True
            conn.cursor().execute(sql)
        finally:
            conn.close()


def create_namespace(
    url: str,
    name: str,
    min_copies: int,
    replicas: int | None = None,
    checkout: str = CHECKOUT,
) -> None:
    """
    C{koboldfs admin namespace create}, as an operator makes one, with
    C{checkout}'s code.
    """
    argv = [sys.executable, "-m", "koboldfs.cli", "admin", "namespace", "create", name]
    argv += ["--min-copies", str(min_copies), "--db", url]
    if replicas is not None:
        argv += ["--replicas", str(replicas)]
    subprocess.run(
        argv,
        env={**os.environ, "PYTHONPATH": checkout},
        stdout=subprocess.DEVNULL,
        check=True,
        timeout=60,
    )


def replica_counts(url: str) -> tuple[int, dict[str, int]]:
    """
    Live files, and good copies of them per server, from the metadata.
    """
    from sqlalchemy import create_engine, text

    if url.startswith("postgresql://"):
        url = "postgresql+psycopg2://" + url[len("postgresql://") :]
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            live = conn.execute(text("SELECT count(*) FROM files WHERE state = 'live'")).scalar()
            rows = conn.execute(
                text(
                    "SELECT r.server, count(*) FROM replicas r JOIN files f ON f.id = r.file_id"
                    " WHERE f.state = 'live' AND r.state = 'ok' GROUP BY r.server"
                )
            ).all()
    finally:
        engine.dispose()
    return int(live or 0), {server: int(n) for server, n in rows}


def exit_on_signals() -> None:
    """
    SIGTERM (a CI time limit, C{kill}) and SIGINT raise, as Ctrl-C does,
    so that the script's C{finally} blocks stop the servers it started;
    SIGINT also when the shell that started the script ignores it.
    """
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    signal.signal(signal.SIGINT, signal.default_int_handler)


def reexec_under_postgres(script: str) -> None:
    """
    Run C{script} again, with this process's arguments, inside
    .ci/postgres.sh, which starts a throwaway PostgreSQL cluster (exported
    as C{KOBOLDFS_TEST_POSTGRES_URL} and C{KOBOLDFS_TEST_PGDATA}) and
    deletes it after.  Returns, doing nothing, when already re-run or when
    the script or bash is missing.
    """
    wrapper = os.path.join(CHECKOUT, ".ci", "postgres.sh")
    bash = shutil.which("bash")
    if os.environ.get(REEXEC_ENV) or not os.path.exists(wrapper) or bash is None:
        return
    env = {**os.environ, REEXEC_ENV: "1"}
    os.execve(bash, [bash, wrapper, sys.executable, os.path.abspath(script), *sys.argv[1:]], env)
