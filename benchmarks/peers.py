"""
KoboldFS beside SeaweedFS on this machine: the peer benchmark of issue 16.

Starts two C{twistd koboldfs} servers on distinct hosts sharing one
PostgreSQL database, in a namespace of 2 replicas and C{min_copies=2}, and
a SeaweedFS cluster (benchmarks/seaweed.py: master with replication 001,
two volume servers, a leveldb2 filer, fsync on under /sync/); then puts
and gets the same workloads through both, interleaved, from one load
generator of Python threads (a blocking C{koboldfs.Client} per thread; a
keep-alive C{http.client} connection per thread to the filer), checking
every byte that comes back.  See benchmarks/README.md.

    python benchmarks/peers.py                # 3 interleaved runs, medians
    python benchmarks/peers.py --runs 1
    python benchmarks/peers.py --smoke        # seconds: does it still measure? (CI)
    python benchmarks/peers.py --compare /work/wt/main --only small --no-seaweed
                                              # another checkout's servers beside these
    python benchmarks/peers.py --profile DIR  # py-spy each KoboldFS process, each phase
    bash .ci/postgres.sh .venv/bin/python benchmarks/peers.py   # PostgreSQL given

Output: the table of issue 16 (rates and ratios), 4 KiB latencies, CPU
per 1,000 requests or per GB for each process, one JSON line per figure,
and the same with samples in C{--out}.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable
from urllib.parse import quote

from loadgen import (
    CHECKOUT,
    GB,
    IN_MEMORY,
    MB,
    MIB,
    Bodies,
    CpuMeter,
    Databases,
    HashingWriter,
    Profiler,
    Server,
    Store,
    Workload,
    create_namespace,
    exit_on_signals,
    machine,
    median,
    output_for,
    postgres_cpu,
    reexec_under_postgres,
    replica_counts,
    result_of,
    run_ops,
)
from seaweed import MISSING, SYNC_PREFIX, Seaweed, SeaweedError, find_weed

from koboldfs import Client

NAMESPACE = "bench"
#: Copies of each file, on distinct hosts, made before a put is acknowledged.
COPIES = 2
KOBOLDFS = "KoboldFS"
#: The store of --compare: the servers of another checkout.
BASE = "KoboldFS@base"
SEAWEEDFS = "SeaweedFS"

#: Issue 16's workloads: small in requests per second, the others in MB/s.
WORKLOADS = (
    Workload("small", 4096, 2000, 16),
    Workload("medium", MIB, 200, 8),
    Workload("large", 64 * MIB, 8, 2),
)
#: --smoke: the same shapes, just enough to see every figure measured.
SMOKE = (
    Workload("small", 4096, 60, 4),
    Workload("medium", MIB, 6, 2),
    Workload("large", 8 * MIB, 2, 2),
)


def label(w: Workload) -> str:
    size = f"{w.size // MIB} MiB" if w.size >= MIB else f"{w.size // 1024} KiB"
    return f"{size} x {w.count:,}, {w.concurrency} threads"


def rate_unit(w: Workload) -> str:
    return "ops/s" if w.name == "small" else "MB/s"


def cpu_unit(w: Workload) -> str:
    return "CPU s/1000 requests" if w.name == "small" else "CPU s/GB"


# -- the stores ------------------------------------------------------------------


class KoboldStore:
    """
    KoboldFS through its blocking client: one C{Client} per thread, given
    both servers (it starts at a random one and alternates).
    """

    def __init__(self, servers: list[str], name: str = KOBOLDFS) -> None:
        self.servers = servers
        self.name = name

    def connect(self) -> Client:
        return Client(NAMESPACE, servers=self.servers, timeout=300)

    def put(self, client: Client, key: str, body: bytes) -> None:
        if not client.put(key, body):
            raise RuntimeError(f"put {key} returned False")

    def get(self, client: Client, key: str, size: int) -> tuple[bytes, int]:
        output = output_for(size)
        if not client.get(key, output):
            raise RuntimeError(f"get {key}: no such key")
        return result_of(output)


class FilerStore:
    """
    SeaweedFS through its filer's HTTP API: C{PUT} and C{GET} of
    C{PREFIX/KEY}, one keep-alive connection per thread.
    """

    name = SEAWEEDFS

    def __init__(self, port: int, prefix: str = SYNC_PREFIX) -> None:
        self.port = port
        self.prefix = prefix

    def path(self, key: str) -> str:
        return self.prefix + quote(key)

    def connect(self) -> http.client.HTTPConnection:
        # A larger blocksize than the default 8 KiB for streamed bodies.
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=300, blocksize=MIB)

    def put(self, conn: http.client.HTTPConnection, key: str, body: bytes) -> None:
        conn.request(
            "PUT", self.path(key), body=body, headers={"Content-Type": "application/octet-stream"}
        )
        response = conn.getresponse()
        answer = response.read()
        if response.status not in (200, 201):
            raise RuntimeError(f"PUT {key}: HTTP {response.status} {answer[:200]!r}")

    def get(self, conn: http.client.HTTPConnection, key: str, size: int) -> tuple[bytes, int]:
        conn.request("GET", self.path(key))
        response = conn.getresponse()
        if response.status != 200:
            answer = response.read()
            raise RuntimeError(f"GET {key}: HTTP {response.status} {answer[:200]!r}")
        if size <= IN_MEMORY:
            data = response.read()
            return hashlib.sha256(data).digest(), len(data)
        out = HashingWriter()
        buf = memoryview(bytearray(MIB))
        while n := response.readinto(buf):
            out.write(buf[:n])
        return out.result()


# -- setting up ---------------------------------------------------------------------


class KoboldPair:
    """
    Two KoboldFS servers on distinct hosts, one new PostgreSQL database,
    the benchmark namespace with 2 replicas and C{min_copies=2}; ready
    once a put through each server is on both.  The servers run
    C{checkout}'s code (C{--compare}), their processes named C{LABEL-sN}.
    """

    def __init__(
        self,
        base: str,
        pg_url: str,
        name: str = KOBOLDFS,
        checkout: str = CHECKOUT,
        label: str = "kfs",
        timeout: float = 60.0,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.dbs = Databases(base, pg_url)
        self.servers: list[Server] = []
        self.url = self.dbs.new("postgresql", label)
        try:
            for i in range(COPIES):
                # Each on a --host of its own: a put is forwarded only to a
                # peer on another host (docs/replication.md).
                self.servers.append(
                    Server(
                        base,
                        f"{label}-s{i}",
                        self.url,
                        extra=extra,
                        host=f"{label}-h{i}",
                        checkout=checkout,
                    )
                )
            create_namespace(self.url, NAMESPACE, COPIES, replicas=COPIES, checkout=checkout)
            self._ready(timeout)
        except BaseException:
            self.stop()
            raise
        self.store = KoboldStore([s.address for s in self.servers], name)

    def _ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for server in self.servers:
            while True:
                try:
                    with Client(NAMESPACE, servers=[server.address], timeout=10) as client:
                        if client.put(f"ready/{server.name}", b"ready"):
                            break
                except Exception as e:  # not yet: each must see the other alive
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"no put with {COPIES} copies through {server.name}"
                        ) from e
                time.sleep(0.5)
        if self.missing():
            raise RuntimeError(f"min_copies={COPIES} puts left copies missing")

    def missing(self) -> int:
        """
        Copies of live files missing on either server (0 with min_copies=2).
        """
        live, per_server = replica_counts(self.url)
        return sum(max(0, live - per_server.get(s.name, 0)) for s in self.servers)

    def pids(self) -> list[tuple[str, int]]:
        """
        The processes to profile: the client, and each server.
        """
        return [("client", os.getpid())] + [(s.name, s.pid) for s in self.servers]

    def meter(self) -> CpuMeter:
        meter = CpuMeter()
        for name, pid in self.pids():
            meter.add_pid(name, pid)
        meter.add("postgresql", postgres_cpu)
        return meter

    def stop(self) -> None:
        for server in self.servers:
            server.stop_blocking()
        self.dbs.drop(self.url)


def sampled_missing(weed: Seaweed, filer: FilerStore, w: Workload, prefix: str) -> int:
    """
    Second copies missing for the first, middle and last files put under
    C{prefix}: each chunk's volume, as the master locates it.
    """
    keys = sorted({0, w.count // 2, w.count - 1})
    return sum(max(0, COPIES - weed.copies(filer.path(f"{prefix}/{i}"))) for i in keys)


def seaweed_meter(weed: Seaweed) -> CpuMeter:
    meter = CpuMeter()
    meter.add_pid("client", os.getpid())
    for name, pid in weed.pids().items():
        meter.add_pid(name, pid)
    return meter


# -- the run -------------------------------------------------------------------------


@dataclass
class Figure:
    """
    One measured figure: a JSON line, and a cell of the tables.
    """

    store: str
    workload: str
    op: str
    figure: str
    value: float | None
    process: str | None = None
    label: str | None = None
    samples: list[float | None] | None = None


@dataclass
class Entry:
    """
    A store in the run: what drives it, what its processes spend, how
    many second copies are missing after the puts of a prefix, and what
    C{--profile} attaches py-spy to.
    """

    store: Store
    meter: CpuMeter
    missing: Callable[[Workload, str], int]
    profiled: list[tuple[str, int]]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workloads = tuple(
            w for w in (SMOKE if args.smoke else WORKLOADS) if w.name in args.only
        )
        self.run_id = uuid.uuid4().hex[:8]
        # (store, process, workload, op, figure) -> samples
        self.samples: dict[tuple[str, str | None, str, str, str], list[float | None]] = {}
        self.notes: list[str] = []

    def add(
        self,
        store: str,
        w: Workload,
        op: str,
        figure: str,
        value: float | None,
        process: str | None = None,
    ) -> None:
        self.samples.setdefault((store, process, w.name, op, figure), []).append(value)

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def phase(self, entry: Entry, w: Workload, op: str, prefix: str, bodies: Bodies) -> None:
        """
        One timed pass of C{w}'s puts or gets, with what each process of
        the store (and the client) spent meanwhile.
        """
        store, meter = entry.store, entry.meter
        # Start from no dirty pages: what the last phase wrote is not
        # flushed on this one's time.
        os.sync()
        tag = f"{store.name}.{w.name}.{op}.{prefix.rsplit('/', 2)[1]}"
        profiler = Profiler(self.args.profile, entry.profiled, tag, self.args.profile_gil)
        before = meter.read()
        try:
            result = run_ops(store, op, w, prefix, bodies)
        finally:
            used = CpuMeter.used(before, meter.read())
            profiler.stop()
        if self.args.profile:
            with open(os.path.join(self.args.profile, f"{tag}.json"), "w") as f:
                json.dump(
                    {"requests": result["ops"], "bytes": result["ops"] * w.size, "cpu": used}, f
                )
        seconds, ops = result["seconds"], result["ops"]
        rate = ops / seconds if w.name == "small" else ops * w.size / MB / seconds
        self.add(store.name, w, op, rate_unit(w), rate)
        self.add(store.name, w, op, "p50 ms", result["p50_ms"])
        self.add(store.name, w, op, "p99 ms", result["p99_ms"])
        amount = ops / 1000 if w.name == "small" else ops * w.size / GB
        for process, cpu in used.items():
            self.add(store.name, w, op, cpu_unit(w), None if cpu is None else cpu / amount, process)

    def run(self, koboldfs: list[KoboldPair], weed: Seaweed | None) -> None:
        entries = [
            Entry(k.store, k.meter(), lambda w, prefix, k=k: k.missing(), k.pids())  # type: ignore[misc]
            for k in koboldfs
        ]
        if weed is not None:
            filer = FilerStore(weed.filer[0])
            entries.append(
                Entry(
                    filer,
                    seaweed_meter(weed),
                    lambda w, p: sampled_missing(weed, filer, w, p),
                    [],
                )
            )
        bodies = {w.name: Bodies(w.size) for w in self.workloads}
        for r in range(self.args.runs):
            for w in self.workloads:
                # With --compare, the two KoboldFS go first by turns.
                order = (
                    entries
                    if r % 2 == 0 or len(koboldfs) < 2
                    else [entries[1], entries[0], *entries[2:]]
                )
                for entry in order:
                    store = entry.store
                    # A new prefix (a new directory for the filer) each
                    # run: see shared/STACK.md on ext4 here.
                    prefix = f"{self.run_id}/r{r}/{w.name}"
                    for op in ("put", "get"):
                        self.log(f"{w.name} {store.name} {op}, run {r + 1} of {self.args.runs}")
                        self.phase(entry, w, op, prefix, bodies[w.name])
                    lost = entry.missing(w, prefix)
                    self.add(store.name, w, "put", "copies missing", lost)
                    if lost:
                        self.notes.append(f"{store.name} {prefix}: {lost} copies missing after put")

    # -- figures

    def figures(self) -> list[Figure]:
        out = []
        labels = {w.name: label(w) for w in self.workloads}
        for (store, process, workload, op, figure), samples in self.samples.items():
            out.append(
                Figure(
                    store, workload, op, figure, median(samples), process, labels[workload], samples
                )
            )
        for w in self.workloads:
            for op in ("put", "get"):
                for other in (SEAWEEDFS, BASE):
                    k = self.value(KOBOLDFS, w.name, op, rate_unit(w))
                    s = self.value(other, w.name, op, rate_unit(w))
                    if k is not None and s:
                        ratio = Figure(
                            f"{KOBOLDFS}/{other}", w.name, op, f"{rate_unit(w)} ratio", k / s
                        )
                        ratio.label = labels[w.name]
                        out.append(ratio)
        return out

    def value(
        self, store: str, workload: str, op: str, figure: str, process: str | None = None
    ) -> float | None:
        return median(self.samples.get((store, process, workload, op, figure)))

    def processes(self, store: str) -> list[str]:
        names = dict.fromkeys(k[1] for k in self.samples if k[0] == store and k[1] is not None)
        return list(names)


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) >= 1 else f"{value:.2g}"


def rates(bench: Bench, other: str) -> list[str]:
    """
    The table of issue 16: KoboldFS's rates beside C{other}'s, and their
    ratios.
    """
    lines = [
        f"| workload | {KOBOLDFS} PUT / GET | {other} PUT / GET | ratio PUT / GET |",
        "| --- | --- | --- | --- |",
    ]
    for w in bench.workloads:
        cells = []
        for store in (KOBOLDFS, other):
            cells.append(
                " / ".join(
                    fmt(bench.value(store, w.name, op, rate_unit(w))) for op in ("put", "get")
                )
            )
        ratios = []
        for op in ("put", "get"):
            k = bench.value(KOBOLDFS, w.name, op, rate_unit(w))
            s = bench.value(other, w.name, op, rate_unit(w))
            ratios.append("-" if k is None or not s else f"{k / s:.2f}")
        lines.append(
            f"| {label(w)} ({rate_unit(w)}) | {cells[0]} | {cells[1]} | {' / '.join(ratios)} |"
        )
    return lines


def tables(bench: Bench) -> str:
    """
    Issue 16's table (and, with C{--compare}, this checkout's servers
    beside the other's), the 4 KiB latencies, and CPU per process, as
    Markdown.
    """
    lines = rates(bench, SEAWEEDFS)
    if bench.processes(BASE):
        lines += [""] + rates(bench, BASE)
    where = {
        KOBOLDFS: "every file, from its metadata",
        BASE: "every file, from its metadata",
        SEAWEEDFS: "3 files a run, from the master",
    }
    counts = []
    for store, how in where.items():
        if store == BASE and not bench.processes(BASE):
            continue
        samples = [
            v
            for w in bench.workloads
            for v in bench.samples.get((store, None, w.name, "put", "copies missing"), [])
        ]
        counts.append(
            f"{store} {sum(v or 0 for v in samples):g} ({how})" if samples else f"{store} -"
        )
    lines += ["", f"Second copies missing after the puts: {', '.join(counts)}."]
    small = bench.workloads[0]
    ran = [store for store in (KOBOLDFS, BASE, SEAWEEDFS) if bench.processes(store)]
    lines += [
        "",
        f"| {label(small)}, latency ms | {' | '.join(f'{s} p50 / p99' for s in ran)} |",
        "|---" * (len(ran) + 1) + "|",
    ]
    for op in ("put", "get"):
        cells = [
            " / ".join(fmt(bench.value(store, small.name, op, f"{p} ms")) for p in ("p50", "p99"))
            for store in ran
        ]
        lines.append(f"| {op.upper()} | {' | '.join(cells)} |")
    columns = [(w, op) for w in bench.workloads for op in ("put", "get")]
    head = [f"{label(w).split(' x ')[0]} {op.upper()} {cpu_unit(w)[4:]}" for w, op in columns]
    for store in ran:
        processes = bench.processes(store)
        lines += ["", f"| {store} CPU | {' | '.join(head)} |", "|---" * (len(head) + 1) + "|"]
        totals: list[float | None] = [0.0] * len(columns)
        for process in processes:
            row = []
            for j, (w, op) in enumerate(columns):
                v = bench.value(store, w.name, op, cpu_unit(w), process)
                row.append(fmt(v))
                totals[j] = None if v is None or totals[j] is None else totals[j] + v  # type: ignore[operator]
            lines.append(f"| {process} | {' | '.join(row)} |")
        lines.append(f"| all (sum of medians) | {' | '.join(fmt(t) for t in totals)} |")
    return "\n".join(lines)


def smoke_problems(bench: Bench, stores: list[str]) -> list[str]:
    """
    What a smoke run failed to measure: for each store, workload and
    operation a rate above zero, the latencies, CPU for every process,
    and no copy missing.
    """
    problems = []
    for store in stores:
        processes = bench.processes(store)
        if len(processes) < 2:
            problems.append(f"{store}: CPU of {processes} only")
        for w in bench.workloads:
            for op in ("put", "get"):
                wanted: list[tuple[str, str | None]] = [
                    (rate_unit(w), None),
                    ("p50 ms", None),
                    ("p99 ms", None),
                ]
                wanted += [(cpu_unit(w), p) for p in processes]
                for figure, process in wanted:
                    v = bench.value(store, w.name, op, figure, process)
                    if v is None or (figure == rate_unit(w) and not v > 0):
                        problems.append(
                            f"no {store} {w.name} {op} {figure} {process or ''} (got {v!r})"
                        )
            if bench.value(store, w.name, "put", "copies missing") != 0:
                problems.append(f"{store} {w.name}: copies missing after put")
    return problems


def report(bench: Bench, args: argparse.Namespace, started: float) -> list[Figure]:
    figs = bench.figures()
    print(tables(bench), flush=True)
    for note in bench.notes:
        print(f"peers.py: note: {note}", file=sys.stderr)
    for fig in figs:
        print(
            json.dumps({k: v for k, v in asdict(fig).items() if v is not None and k != "samples"})
        )
    with open(args.out, "w") as f:
        json.dump(
            {
                "machine": machine(),
                "seconds": time.monotonic() - started,
                "args": vars(args),
                "workloads": [asdict(w) for w in bench.workloads],
                "notes": bench.notes,
                "figures": [asdict(fig) for fig in figs],
            },
            f,
            indent=1,
        )
    print(
        f"peers.py: {len(figs)} figures in {time.monotonic() - started:.0f} s,"
        f" written to {args.out}",
        file=sys.stderr,
        flush=True,
    )
    return figs


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a few files, one run; exit 1 unless every figure was measured",
    )
    parser.add_argument(
        "--runs", type=int, default=None, help="interleaved runs (default 3; --smoke 1)"
    )
    parser.add_argument("--out", default="koboldfs-peers.json", help="JSON results file")
    parser.add_argument("--tmp", default=None, help="scratch directory parent [default: $TMPDIR]")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("KOBOLDFS_TEST_POSTGRES_URL"),
        help="a PostgreSQL to create the scratch database in (its CPU is read from"
        " $KOBOLDFS_TEST_PGDATA) [default: $KOBOLDFS_TEST_POSTGRES_URL, else a throwaway one]",
    )
    parser.add_argument("--weed", default=None, help="the weed binary [default: found, or skipped]")
    parser.add_argument("--no-seaweed", action="store_true", help="measure KoboldFS alone")
    parser.add_argument(
        "--only",
        default="small,medium,large",
        help="the workloads to run, comma-separated [default: all three]",
    )
    parser.add_argument(
        "--compare",
        metavar="CHECKOUT",
        default=None,
        help=f"also run a KoboldFS pair on CHECKOUT's server code ({BASE}), interleaved",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        default=None,
        help="py-spy the client and the KoboldFS servers in each phase into DIR"
        " (slows them; benchmarks/profile.py sums it up)",
    )
    parser.add_argument(
        "--profile-gil",
        action="store_true",
        help="with --profile: sample only the thread holding the GIL (the Python work)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    args.runs = args.runs or (1 if args.smoke else 3)
    args.only = args.only.split(",")
    unknown = set(args.only) - {w.name for w in WORKLOADS}
    if unknown:
        parser.error(f"no workload {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    exit_on_signals()
    if not args.postgres_url:
        reexec_under_postgres(__file__)
        print(
            "peers.py: no PostgreSQL (give --postgres-url, or install PostgreSQL 15)",
            file=sys.stderr,
        )
        return 2
    started = time.monotonic()
    bench = Bench(args)
    base = tempfile.mkdtemp(prefix="koboldfs-peers-", dir=args.tmp)
    weed_binary = None if args.no_seaweed else args.weed or find_weed()
    stores = [KOBOLDFS]
    try:
        with contextlib.ExitStack() as stack:
            weed = None
            if args.no_seaweed:
                bench.notes.append(f"{SEAWEEDFS} skipped: --no-seaweed")
            elif weed_binary is None:
                bench.notes.append(f"{SEAWEEDFS} skipped: {MISSING}")
                print(f"peers.py: {SEAWEEDFS} skipped: {MISSING}", file=sys.stderr, flush=True)
            else:
                bench.log(f"starting {SEAWEEDFS} ({weed_binary})")
                weed = Seaweed(base, weed=weed_binary, keep=args.keep)
                stack.callback(weed.stop)
                weed.start()
                stores.append(SEAWEEDFS)
            bench.log(f"starting {KOBOLDFS}: {COPIES} servers on PostgreSQL")
            pairs = [KoboldPair(base, args.postgres_url)]
            stack.callback(pairs[0].stop)
            if args.compare:
                bench.log(f"starting {BASE}: {COPIES} servers running {args.compare}")
                pairs.append(
                    KoboldPair(
                        base,
                        args.postgres_url,
                        BASE,
                        os.path.abspath(args.compare),
                        label="base",
                    )
                )
                stack.callback(pairs[1].stop)
                stores.append(BASE)
            bench.run(pairs, weed)
        report(bench, args, started)
    except SeaweedError as e:
        print(f"peers.py: {SEAWEEDFS} failed (--keep keeps its logs): {e}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            # Last: deleting thousands of files takes a while here.
            shutil.rmtree(base, ignore_errors=True)
    if args.smoke:
        problems = smoke_problems(bench, stores)
        for problem in problems:
            print(f"peers.py: smoke run: {problem}", file=sys.stderr)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
