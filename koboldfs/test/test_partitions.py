"""
Faults between machines, with real processes in network namespaces
(L{koboldfs.test.netns}): PostgreSQL, three servers and clients each on a
host of their own, links cut while writers put files.  After each fault
heals, every acknowledged put is read back through every server: the
figures are acknowledged puts lost and wrong bytes served (both must be
0), and the time to heal.  C{KOBOLDFS_LONG_FAULTS=1} makes each fault last
longer (60 s instead of 8).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from twisted.trial.unittest import TestCase

from koboldfs.deferredclient import REPLY_TIMEOUT
from koboldfs.test.cluster import CHECKOUT, ClusterMixin, ServerProcess
from koboldfs.test.netns import Host, Network, NetworkMixin
from koboldfs.test.pgcluster import SKIP as PG_SKIP
from koboldfs.test.pgcluster import PostgresCluster, PostgresMixin, run
from koboldfs.test.support import eventually, sleep

LONG = bool(os.environ.get("KOBOLDFS_LONG_FAULTS"))
#: Seconds a fault lasts, and seconds of writing before and after it.
FAULT = 60.0 if LONG else 8.0
CALM = 20.0 if LONG else 4.0
#: Bytes of each file the writers put.
SIZE = 64 * 1024

#: Run in a client host: put files KEY0, KEY1... (bytes from the key) to
#: the servers for SECONDS, one at a time, appending a JSON line per put to
#: LOG: acknowledged or not, how long it took, and the error.
WRITER = r"""
import json, random, sys, time
from koboldfs import Client
from koboldfs.errors import KoboldError
servers, prefix, log = sys.argv[1].split(","), sys.argv[2], sys.argv[5]
seconds, size, options = float(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[6])
end = time.monotonic() + seconds
with open(log, "a", buffering=1) as out, Client("faults", servers=servers, **options) as client:
    n = 0
    while time.monotonic() < end:
        key = f"{prefix}{n}"
        n += 1
        body = random.Random(key).randbytes(size)
        start = time.monotonic()
        try:
            client.put(key, body)
        except KoboldError as e:
            line = {"key": key, "ok": False, "error": str(e), "code": e.code.name}
        else:
            line = {"key": key, "ok": True}
        line["seconds"] = time.monotonic() - start
        line["at"] = time.time()
        out.write(json.dumps(line) + "\n")
"""

#: Run in a client host: read every key of KEYS (a JSON file) through each
#: server alone; print, per server, how many came back right, missing,
#: with other bytes, or failing (and the first errors).
VERIFIER = r"""
import io, json, random, sys
from koboldfs import Client
from koboldfs.errors import KoboldError
servers, keys, size = sys.argv[1].split(","), json.load(open(sys.argv[2])), int(sys.argv[3])
report = {}
for server in servers:
    counts = {"right": 0, "missing": 0, "wrong": 0, "failed": 0, "errors": []}
    with Client("faults", servers=[server], timeout=30, retries=3) as client:
        for key in keys:
            out = io.BytesIO()
            try:
                found = client.get(key, out)
            except KoboldError as e:
                counts["failed"] += 1
                counts["errors"] = (counts["errors"] + [f"{key}: {e}"])[:3]
                continue
            if not found:
                counts["missing"] += 1
            elif out.getvalue() != random.Random(key).randbytes(size):
                counts["wrong"] += 1
            else:
                counts["right"] += 1
    report[server] = counts
print(json.dumps(report))
"""

#: Run in a client host: one put (or get, with "get") of KEY to SERVER
#: alone, no retry; print what happened as JSON.
PROBE = r"""
import io, json, random, sys, time
from koboldfs import Client
from koboldfs.errors import KoboldError
op, server, ns, key, size = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
body = random.Random(key).randbytes(size)
start = time.monotonic()
result = {}
try:
    with Client(ns, servers=[server], timeout=30, retries=0) as client:
        if op == "put":
            result["ok"] = client.put(key, body)
        else:
            out = io.BytesIO()
            result["ok"] = client.get(key, out)
            result["same"] = out.getvalue() == body
except KoboldError as e:
    result = {"ok": False, "error": str(e), "code": e.code.name}
result["seconds"] = time.monotonic() - start
print(json.dumps(result))
"""


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


class _Writer:
    """
    A WRITER process in a client host, and what it logged.
    """

    def __init__(self, host: Host, log: str, popen: Any) -> None:
        self.host, self.log, self.popen = host, log, popen

    def lines(self) -> list[dict[str, Any]]:
        with open(self.log) as f:
            return [json.loads(line) for line in f if line.endswith("\n")]


class FaultCluster(NetworkMixin, PostgresMixin, ClusterMixin, TestCase):
    """
    The base of the fault tests (it has none itself): PostgreSQL in C{db}, servers C{s1}, C{s2},
    C{s3}, clients C{c1}, C{c2}; writers, and the check of every
    acknowledged put.
    """

    timeout = 900 if LONG else 300

    if PG_SKIP:
        skip = PG_SKIP

    async def cluster(self) -> tuple[Network, PostgresCluster, list[ServerProcess]]:
        net = self.net = self.makeNetwork(["db", "s1", "s2", "s3", "c1", "c2"])
        pg = self.pg = await self.throwawayCluster(netns=net["db"])
        await pg.query('CREATE DATABASE "koboldfs"')
        options = ("--auth=open", "--peer-timeout=5", "--replicate-interval=1", "--scrub-rate=0")
        self.servers = [
            await self.startServer(name, db=pg.url("koboldfs"), netns=net[name], extra=options)
            for name in ("s1", "s2", "s3")
        ]

        async def all_up() -> bool:
            rows = await pg.query("SELECT count(*) FROM servers", "koboldfs")
            return bool(rows[0][0] == 3)

        await eventually(all_up, timeout=30, what="three servers registered")
        # Each knows the others (a put lands on two hosts).
        await sleep(2.5)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        return net, pg, self.servers

    def addresses(self, *names: str) -> str:
        return ",".join(s.address for s in self.servers if not names or s.name in names)

    async def script(self, host: str, script: str, *args: str) -> Any:
        code, output = await run(
            [
                *self.net[host].prefix,
                "env",
                f"PYTHONPATH={CHECKOUT}",
                sys.executable,
                "-c",
                script,
                *args,
            ],
            check=False,
        )
        self.assertEqual(code, 0, output)
        return json.loads(output.strip().splitlines()[-1])

    def writer(self, host: str, prefix: str, seconds: float, **options: Any) -> _Writer:
        log = os.path.join(self.dir, f"{prefix}.log")
        options = {"timeout": 30, "retries": 3, "backoff": 0.5, **options}
        argv = [
            "env",
            f"PYTHONPATH={CHECKOUT}",
            sys.executable,
            "-c",
            WRITER,
            self.addresses(),
            prefix,
            str(seconds),
            str(SIZE),
            log,
            json.dumps(options),
        ]
        return _Writer(self.net[host], log, self.net[host].popen(argv))

    async def finished(self, *writers: _Writer) -> list[dict[str, Any]]:
        for w in writers:
            while w.popen.poll() is None:
                await sleep(0.2)
            self.assertEqual(w.popen.returncode, 0, f"writer in {w.host.label} failed")
        return [line for w in writers for line in w.lines()]

    async def verify(self, lines: list[dict[str, Any]]) -> dict[str, Any]:
        """
        Read every acknowledged put back through every server: the counts,
        with acknowledged-lost and wrong-bytes totals, which must be 0.
        """
        acked = [line["key"] for line in lines if line["ok"]]
        path = os.path.join(self.dir, f"keys-{len(lines)}.json")
        with open(path, "w") as f:
            json.dump(acked, f)
        report = await self.script("c1", VERIFIER, self.addresses(), path, str(SIZE))
        lost = max(r["missing"] for r in report.values())
        wrong = sum(r["wrong"] for r in report.values())
        for name, counts in report.items():
            self.assertEqual(counts["right"], len(acked), f"through {name}: {counts}")
        self.assertEqual((lost, wrong), (0, 0), report)
        return {"acked": len(acked), "lost": lost, "wrong": wrong}

    async def copies_everywhere(self, started: float, wanted: int = 2) -> float:
        """
        Seconds from C{started} until every live file has C{wanted} copies.
        """

        async def replicated() -> bool:
            rows = await self.pg.query(
                "SELECT count(*) FROM files WHERE state = 'live' AND (SELECT count(*) FROM "
                "replicas WHERE file_id = files.id AND state = 'ok') < " + str(wanted),
                "koboldfs",
            )
            return bool(rows[0][0] == 0)

        await eventually(replicated, timeout=120, what=f"every file on {wanted} servers")
        return time.monotonic() - started

    def summary(self, name: str, lines: list[dict[str, Any]], figures: dict[str, Any]) -> None:
        ok = [line["seconds"] for line in lines if line["ok"]]
        failed = [line for line in lines if not line["ok"]]
        figures = {
            "puts": len(lines),
            "refused": len(failed),
            "p99_ms": round(percentile(ok, 99) * 1000),
            "max_ms": round(max(ok, default=0) * 1000),
            **figures,
        }
        errors = sorted({line["code"] for line in failed})
        print(f"\n{name}: {json.dumps(figures)} errors: {errors}")
        self.figures = figures


class PartitionTests(FaultCluster):
    """
    Links cut while writers put files.
    """

    async def test_server_cut_from_postgresql(self) -> None:
        """
        s1 cut from PostgreSQL: it refuses puts with UNAVAILABLE naming the
        metadata database (clients go to s2 or s3), reads through it fail
        cleanly or come back right, and it takes puts again once healed.
        """
        net, pg, (s1, s2, s3) = await self.cluster()
        before = await self.script("c1", PROBE, "put", s1.address, "faults", "before", str(SIZE))
        self.assertTrue(before["ok"], before)
        w = self.writer("c1", "w", CALM + FAULT + CALM)
        await sleep(CALM)
        net.cut("s1", "db")
        cut_at = time.monotonic()
        # Until s1 notices (its connections' tcp_user_timeout, 10 s, or a
        # keepalive), a put to it waits, and the client gives up on its
        # reply deadline (5 s); then s1 refuses puts at once, saying why.
        refused: dict[str, Any] = {}

        async def refuses() -> bool:
            nonlocal refused
            refused = await self.script("c1", PROBE, "put", s1.address, "faults", "p", "10")
            self.assertFalse(refused["ok"], refused)
            return "metadata database" in refused["error"]

        await eventually(refuses, timeout=60, what="s1 to refuse puts, saying why")
        noticed = time.monotonic() - cut_at
        self.assertEqual(refused["code"], "UNAVAILABLE", refused)
        # While its pool reconnects, a refusal takes a few seconds (up to
        # ~4.7 s seen): still inside the client's reply deadline, so the
        # client is told why rather than timing out.
        self.assertLess(refused["seconds"], REPLY_TIMEOUT, refused)
        read = await self.script("c1", PROBE, "get", s1.address, "faults", "before", str(SIZE))
        self.assertTrue(read.get("same") or read.get("code") == "UNAVAILABLE", read)
        await sleep(max(0.0, FAULT - (time.monotonic() - cut_at)))
        net.heal("s1", "db")
        healed_at = time.monotonic()

        async def takes_puts() -> bool:
            back = await self.script("c1", PROBE, "put", s1.address, "faults", "after", str(SIZE))
            return bool(back["ok"])

        await eventually(takes_puts, timeout=60, what="s1 to take puts again")
        back_after = time.monotonic() - healed_at
        lines = await self.finished(w)
        copies = await self.copies_everywhere(healed_at)
        figures = await self.verify(lines)
        self.summary(
            "server cut from PostgreSQL",
            lines,
            {
                **figures,
                "noticed_s": round(noticed, 1),
                "puts_again_s": round(back_after, 1),
                "two_copies_s": round(copies, 1),
            },
        )

    async def test_server_cut_from_peers(self) -> None:
        """
        s1 cut from s2 and s3, not from PostgreSQL: a default put to s1 is
        acknowledged with its copy alone and copied once healed; a put
        needing two copies fails cleanly (no row, nothing served).
        """
        net, pg, (s1, s2, s3) = await self.cluster()
        await pg.query(
            "INSERT INTO namespaces (name, created, min_copies) VALUES ('strict', 0, 2)", "koboldfs"
        )
        w = self.writer("c1", "w", CALM + FAULT + CALM)
        await sleep(CALM)
        net.cut("s1", "s2")
        net.cut("s1", "s3")
        cut_at = time.monotonic()
        alone = await self.script("c1", PROBE, "put", s1.address, "faults", "alone", str(SIZE))
        self.assertTrue(alone["ok"], alone)
        strict = await self.script("c1", PROBE, "put", s1.address, "strict", "two", str(SIZE))
        self.assertFalse(strict["ok"], strict)
        self.assertEqual(strict["code"], "UNAVAILABLE", strict)
        # Refused before any copy (the peers already passed by) or once the
        # copy to a peer not yet tried passed its deadline: either way the
        # error says the put would not be on two hosts.
        self.assertTrue(
            "needs copies on 2 distinct hosts" in strict["error"]
            or "would not be durable on enough hosts" in strict["error"],
            strict,
        )
        rows = await pg.query("SELECT count(*) FROM files WHERE key = 'two'", "koboldfs")
        self.assertEqual(rows[0][0], 0)
        await sleep(max(0.0, FAULT - (time.monotonic() - cut_at)))
        net.heal_all()
        healed_at = time.monotonic()
        lines = await self.finished(w)
        copies = await self.copies_everywhere(healed_at)
        figures = await self.verify([*lines, {"key": "alone", "ok": True}])
        self.summary(
            "server cut from its peers",
            lines,
            {
                **figures,
                "strict_put_refused_s": round(strict["seconds"], 1),
                "two_copies_s": round(copies, 1),
            },
        )

    async def test_client_cut_from_server(self) -> None:
        """
        c1 cut from s1: its puts go to s2 and s3 (the connect to s1 times
        out), none fails.
        """
        net, pg, servers = await self.cluster()
        w = self.writer("c1", "w", CALM + FAULT + CALM, timeout=5)
        await sleep(CALM)
        net.cut("c1", "s1")
        await sleep(FAULT)
        net.heal("c1", "s1")
        lines = await self.finished(w)
        figures = await self.verify(lines)
        self.summary("client cut from one server", lines, figures)
        self.assertEqual([line for line in lines if not line["ok"]], [])

    async def test_split_in_halves(self) -> None:
        """
        The network split in two, writers on both sides: PostgreSQL, s1, s2
        and c1 on one, s3 and c2 on the other.  c2's puts cannot be
        acknowledged during the split (s3 has no database): they are
        refused or wait for the heal (c2 tries once per put); c1's go on.
        Healed, every acknowledged put reads back right everywhere.
        """
        net, pg, servers = await self.cluster()
        w1 = self.writer("c1", "one", CALM + FAULT + CALM, timeout=15)
        w2 = self.writer("c2", "two", CALM + FAULT + CALM, timeout=5, retries=0)
        await sleep(CALM)
        net.partition(["db", "s1", "s2", "c1"], ["s3", "c2"])
        split = time.time(), time.time() + FAULT
        await sleep(FAULT)
        net.heal_all()
        healed_at = time.monotonic()
        lines = await self.finished(w1, w2)
        copies = await self.copies_everywhere(healed_at)
        figures = await self.verify(lines)
        one = [line for line in lines if line["key"].startswith("one")]
        self.assertTrue(all(line["ok"] for line in one[-3:]), one[-3:])
        # No put of c2's begun and answered within the split was acknowledged.
        within = [
            line
            for line in lines
            if line["key"].startswith("two")
            and split[0] < line["at"] - line["seconds"]
            and line["at"] < split[1]
        ]
        self.assertEqual([line for line in within if line["ok"]], [])
        self.summary(
            "split in two halves",
            lines,
            {**figures, "minority_refused": len(within), "two_copies_s": round(copies, 1)},
        )

