"""
Faults an operator meets, with real server processes: a data disk that
fills up (a small tmpfs the test mounts).  The faults between machines
(partitions, a bad network, failover) are in test_partitions.py.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import time
import urllib.request
from typing import Any

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from koboldfs.client import DeferredClient
from koboldfs.errors import ErrorCode, Unavailable
from koboldfs.test.cluster import ClusterMixin, ServerProcess
from koboldfs.test.test_end_to_end import files_on_disk
from koboldfs.test.support import eventually

MiB = 1024 * 1024


def mount_tmpfs(path: str, size: int) -> None:
    """
    Mount a tmpfs of C{size} bytes at C{path}; SkipTest where we may not.
    """
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0:
        raise SkipTest("mounting a small file system for the data needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", path],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SkipTest(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def umount(path: str) -> None:
    subprocess.run(["umount", "-l", path], check=True)


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class CountingFile(io.FileIO):
    """
    A file that counts the bytes read from it: how much of a body a client
    sent before the server refused it.
    """

    read_bytes = 0

    def readinto(self, buffer: Any) -> int | None:
        n = super().readinto(buffer)
        self.read_bytes += n or 0
        return n

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.read_bytes += len(data or b"")
        return data


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        body: bytes = response.read()
        return body


class FullDiskTests(ClusterMixin, TestCase):
    """
    Server A's data is a 40 MiB tmpfs with C{--reserve=8M}; B's is on the
    ordinary disk, on another host, sharing A's metadata.
    """

    timeout = 240

    def replicas(self, key: str) -> list[str]:
        with sqlite3.connect(self.dbpath) as conn:
            rows = conn.execute(
                "SELECT replicas.server FROM replicas JOIN files ON files.id = replicas.file_id"
                " WHERE files.key = ? AND files.state = 'live' AND replicas.state = 'ok'",
                (key,),
            ).fetchall()
        return sorted(r[0] for r in rows)

    async def test_full_disk(self) -> None:
        """
        Puts to a full server are refused with NO_SPACE before the body is
        sent, and clients go to another server; the disk never passes its
        reserve and keeps nothing half-written; the status page and
        /metrics say the disk is full; copies to it wait, and resume once
        deletes free space.
        """
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        self.dbpath = os.path.join(base, "shared.sqlite")
        db = f"sqlite:///{self.dbpath}"
        fast = ("--replicate-interval=1", "--scrub-rate=0")
        a = ServerProcess(base, "a", db=db, host="host-a", extra=("--reserve=8M", *fast))
        mount_tmpfs(a.data, 40 * MiB)
        self.addCleanup(umount, a.data)
        self.addCleanup(lambda: deferToThread(a.stop_blocking))
        await a.start()
        b = await self.startServer("b", db=db, host="host-b", extra=fast)
        to_a = DeferredClient("demo", [a.address], reactor, retries=0)
        both = DeferredClient("demo", [a.address, b.address], reactor, retries=2, backoff=0.2)
        for client in (to_a, both):
            self.addCleanup(client.close)

        async def both_known() -> bool:
            await to_a.put("probe", b"p")
            return self.replicas("probe") == ["a", "b"]

        await eventually(both_known, timeout=30, what="A to know B")

        # Fill A with 4 MiB files until it refuses one, then with 256 KiB
        # ones: it has less than 1 MiB above its reserve, which is full.
        bodies: dict[str, bytes] = {}
        for size in (4 * MiB, 256 * 1024):
            refused: Unavailable | None = None
            for _ in range(40):
                body = os.urandom(size)
                try:
                    await to_a.put(f"fill{len(bodies)}", body)
                except Unavailable as e:
                    refused = e
                    break
                bodies[f"fill{len(bodies)}"] = body
                self.assertGreaterEqual(free_bytes(a.data), 8 * MiB)
            assert refused is not None, "A never refused a put"
            self.assertIs(refused.code, ErrorCode.NO_SPACE)
            self.assertIn("disk full", str(refused))
            self.assertTrue(refused.retryable)
        self.assertGreaterEqual(len(bodies), 5)
        self.assertGreaterEqual(free_bytes(a.data), 8 * MiB)

        # A large put of known size is refused before its body is sent.
        big = os.path.join(base, "big")
        with open(big, "wb") as f:
            f.truncate(100 * MiB)
        with CountingFile(big, "rb") as source:
            started = time.monotonic()
            with self.assertRaises(Unavailable) as caught:
                await to_a.put("big", source)
            self.assertIs(caught.exception.code, ErrorCode.NO_SPACE)
            self.assertLess(source.read_bytes, 8 * MiB)
        refusal_seconds = time.monotonic() - started

        # A client that knows both servers puts on B.
        late = {f"late{n}": os.urandom(2 * MiB) for n in range(3)}
        for key, body in late.items():
            self.assertTrue(await both.put(key, body))
            self.assertEqual(self.replicas(key), ["b"])
        out = io.BytesIO()
        self.assertTrue(await both.get("late0", out))
        self.assertEqual(out.getvalue(), late["late0"])

        # Nothing half-written; what A holds, the metadata says it holds.
        self.assertEqual(files_on_disk(a, "tmp"), [])
        self.assertEqual(
            len(files_on_disk(a)), sum("a" in self.replicas(k) for k in [*bodies, "probe"])
        )

        # The status page and the metrics say so.
        status = json.loads(await deferToThread(fetch, f"{a.http}/status.json"))
        self.assertTrue(status["disk"]["full"])
        self.assertEqual(status["disk"]["reserve"], 8 * MiB)
        self.assertTrue(any("disk full" in p for p in status["problems"]), status["problems"])
        metrics = (await deferToThread(fetch, f"{a.http}/metrics")).decode()
        self.assertIn("koboldfs_disk_full 1.0", metrics)

        async def b_sees_a_full() -> bool:
            seen = json.loads(await deferToThread(fetch, f"{b.http}/status.json"))
            return "disk full on a" in seen["problems"]

        await eventually(b_sees_a_full, timeout=15, what="B to see A's disk full")
        # Copies to A wait: a few replication passes later, still on B alone.
        before = time.monotonic()
        while time.monotonic() - before < 3:
            await deferToThread(time.sleep, 0.5)
            for key in late:
                self.assertEqual(self.replicas(key), ["b"])
            self.assertGreaterEqual(free_bytes(a.data), 8 * MiB)

        # Deletes free space: A takes copies again.
        for key in list(bodies)[:4]:
            self.assertTrue(await to_a.delete(key))
        freed = time.monotonic()
        await eventually(
            lambda: all(self.replicas(k) == ["a", "b"] for k in late),
            timeout=60,
            what="copies to A to resume",
        )
        resumed_seconds = time.monotonic() - freed
        status = json.loads(await deferToThread(fetch, f"{a.http}/status.json"))
        self.assertFalse(status["disk"]["full"])
        self.assertGreaterEqual(free_bytes(a.data), 8 * MiB)
        self.assertEqual(files_on_disk(a, "tmp"), [])
        for key, body in late.items():
            out = io.BytesIO()
            self.assertTrue(await to_a.get(key, out))
            self.assertEqual(out.getvalue(), body)
        print(
            f"\nfull disk: {sum(len(b) == 4 * MiB for b in bodies.values())} x 4 MiB and "
            f"{sum(len(b) < 4 * MiB for b in bodies.values())} x 256 KiB puts fitted; "
            "a 100 MiB put refused in "
            f"{refusal_seconds * 1000:.0f} ms after {source.read_bytes} bytes read; copies "
            f"resumed {resumed_seconds:.1f} s after deletes"
        )
