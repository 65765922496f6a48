"""
A bad network between every machine: each host's packets delayed 100 ms
and 5% of them lost (L{koboldfs.test.netns.Network.netem}, as C{tc netem
delay 100ms loss 5%} on every host would), so a round trip between any
two hosts takes 200 ms more and one packet in twenty is lost each way.
Puts and gets still succeed (with the clients' retries) and nothing is
lost; throughput and p99 are measured beside the clean network, in the
same run.  C{KOBOLDFS_LONG_FAULTS=1} runs each phase for 120 s, not 20.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from koboldfs.test.cluster import CHECKOUT
from koboldfs.test.support import sleep
from koboldfs.test.test_partitions import LONG, SIZE, FaultCluster, percentile

#: Seconds each phase (clean, bad) writes and reads for.
PHASE = 120.0 if LONG else 20.0
HOSTS = ("db", "s1", "s2", "s3", "c1")

#: Run in a client host: for SECONDS, put KEY-n (bytes from the key) and
#: read it back, one at a time; a JSON line per operation to LOG.
MIXED = r"""
import io, json, random, sys, time
from koboldfs import Client
from koboldfs.errors import KoboldError
servers, prefix, log = sys.argv[1].split(","), sys.argv[2], sys.argv[5]
seconds, size = float(sys.argv[3]), int(sys.argv[4])
end = time.monotonic() + seconds
options = {"timeout": 30, "retries": 5, "backoff": 0.5}
with open(log, "a", buffering=1) as out, Client("faults", servers=servers, **options) as client:
    n = 0
    while time.monotonic() < end:
        key = f"{prefix}{n}"
        n += 1
        body = random.Random(key).randbytes(size)
        for op in ("put", "get"):
            start = time.monotonic()
            line = {"key": key, "op": op}
            try:
                if op == "put":
                    line["ok"] = client.put(key, body)
                else:
                    sink = io.BytesIO()
                    line["ok"] = client.get(key, sink) and sink.getvalue() == body
            except KoboldError as e:
                line.update(ok=False, error=str(e), code=e.code.name)
            line["seconds"] = time.monotonic() - start
            out.write(json.dumps(line) + "\n")
"""


class BadNetworkTests(FaultCluster):
    """
    The fault tests' cluster, under delay and loss.
    """

    async def phase(self, prefix: str) -> dict[str, Any]:
        """
        One phase of the writer-reader in c1: its figures, and its lines.
        """
        log = os.path.join(self.dir, f"{prefix}.log")
        argv = [
            "env",
            f"PYTHONPATH={CHECKOUT}",
            sys.executable,
            "-c",
            MIXED,
            self.addresses(),
            prefix,
            str(PHASE),
            str(SIZE),
            log,
        ]
        started = time.monotonic()
        process = self.net["c1"].popen(argv)
        while process.poll() is None:
            await sleep(0.2)
        elapsed = time.monotonic() - started
        self.assertEqual(process.returncode, 0)
        with open(log) as f:
            lines = [json.loads(line) for line in f]
        self.assertEqual([line for line in lines if not line["ok"]], [], f"{prefix}: failed")
        puts = [line["seconds"] for line in lines if line["op"] == "put"]
        gets = [line["seconds"] for line in lines if line["op"] == "get"]
        return {
            "lines": lines,
            "puts_per_s": round(len(puts) / elapsed, 2),
            "put_p50_ms": round(percentile(puts, 50) * 1000),
            "put_p99_ms": round(percentile(puts, 99) * 1000),
            "get_p50_ms": round(percentile(gets, 50) * 1000),
            "get_p99_ms": round(percentile(gets, 99) * 1000),
        }

    async def test_delay_and_loss(self) -> None:
        """
        The same writer-reader on a clean network, then with every host's
        packets delayed 100 ms and 5% lost: every operation succeeds, and
        every acknowledged put reads back right through every server.
        """
        net, pg, servers = await self.cluster()
        clean = await self.phase("clean")
        for label in HOSTS:
            net.netem(label, delay_ms=100, loss_pct=5, seed=1)
        bad = await self.phase("bad")
        for label in HOSTS:
            net.clear_netem(label)
        puts = [line for line in clean.pop("lines") + bad.pop("lines") if line["op"] == "put"]
        figures = await self.verify(puts)
        ratios = {
            "throughput": round(bad["puts_per_s"] / max(clean["puts_per_s"], 1e-9), 3),
            "put_p99": round(bad["put_p99_ms"] / max(clean["put_p99_ms"], 1), 1),
            "get_p99": round(bad["get_p99_ms"] / max(clean["get_p99_ms"], 1), 1),
        }
        print(f"\nbad network: clean {json.dumps(clean)}, bad {json.dumps(bad)}, bad/clean "
              f"{json.dumps(ratios)}, {json.dumps(figures)}")
