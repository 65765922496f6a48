"""
End-to-end tests of bounded failover: real C{twistd koboldfs} servers on
distinct C{--host}s sharing one SQLite metadata database, one of them hung
with SIGSTOP (its kernel still completes TCP handshakes and takes bytes,
nothing answers).  A hung server costs a client its connect or reply
deadline (5 s by default), then the next server answers; a server whose
peer hangs likewise gives up on it after its own, shorter, deadlines (3 s)
and goes on serving.  Each test prints the times it measured.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from koboldfs.client import DeferredClient
from koboldfs.test.cluster import CHECKOUT, ClusterMixin, ServerProcess
from koboldfs.test.test_end_to_end import files_on_disk

#: Servers that take a hung peer for down only long after these tests
#: are over, and make no copies but the puts' own.
PATIENT = ("--down-after=120", "--replicate-interval=300", "--scrub-rate=0")
#: What a hung first server may cost a client with default settings.
BOUND = 6.0

#: A blocking client (koboldfs.Client) in a process of its own, that tries
#: the servers in the order given: times a get and a put, prints them.
BLOCKING = """
import io, json, random, sys, time
random.randrange = lambda n: 0
from koboldfs import Client
with Client(sys.argv[1], sys.argv[2].split(",")) as client:
    start = time.monotonic()
    out = io.BytesIO()
    assert client.get(sys.argv[3], out)
    got = time.monotonic() - start
    client._client._next = 0
    start = time.monotonic()
    assert client.put(sys.argv[3] + ".again", out.getvalue())
    put = time.monotonic() - start
print(json.dumps({"get": got, "put": put, "size": len(out.getvalue())}))
"""

#: The C{koboldfs} command in a process of its own, timed once its modules
#: are imported (which takes seconds on a loaded machine, hung server or
#: not): prints its exit status and the seconds it ran.
COMMAND = """
import json, sys, time
import koboldfs.cli, koboldfs.blocking, koboldfs.connection
start = time.monotonic()
code = koboldfs.cli.main(sys.argv[1:])
print(json.dumps({"code": code, "took": time.monotonic() - start}), file=sys.stderr)
"""


class FailoverTests(ClusterMixin, TestCase):
    timeout = 180

    def setUp(self) -> None:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        self.db_path = os.path.join(base, "shared.sqlite")
        self.db = f"sqlite:///{self.db_path}"

    def sql(self, statement: str) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.db_path) as conn:
            return conn.execute(statement).fetchall()

    async def servers(self, *names: str) -> list[ServerProcess]:
        return [
            await self.startServer(name, db=self.db, host=f"host-{name}", extra=PATIENT)
            for name in names
        ]

    def client(self, namespace: str, *servers: ServerProcess, **options: Any) -> DeferredClient:
        client = DeferredClient(namespace, [s.address for s in servers], reactor, **options)
        self.addCleanup(client.close)
        return client

    def hang(self, server: ServerProcess) -> None:
        server.signal(signal.SIGSTOP)
        self.addCleanup(server.signal, signal.SIGCONT)

    def one_copy(self, namespace: str) -> None:
        """
        Make C{namespace}'s puts take one copy, so that a put times the
        client's failover alone (no forward to the hung server).
        """
        self.sql(f"UPDATE namespaces SET min_copies = 1 WHERE name = '{namespace}'")

    async def test_first_server_hung(self) -> None:
        """
        With the first listed server hung, a get, a put, a stat, a list, a
        URL and a delete of a client with default settings each complete
        through the next server in under 6 s, whether the client connects
        after the hang or had a connection open from before it.
        """
        a, b = await self.servers("a", "b")
        body = os.urandom(3 * 1024 * 1024 + 1)
        setup = self.client("demo", b)
        self.assertTrue(await setup.put("k", body))
        self.one_copy("demo")
        self.patch(random, "randrange", lambda n: 0)
        before = self.client("demo", a, b)

        def ping_a() -> defer.Deferred[bool]:
            before._next = 0
            return before.ping()

        # Connections to A open before the hang, one for each request.
        self.assertEqual(await defer.gatherResults([ping_a() for _ in range(6)]), [True] * 6)
        self.hang(a)
        times: dict[str, float] = {}

        async def timed(name: str, call: Any) -> Any:
            start = time.monotonic()
            result = await call
            times[name] = time.monotonic() - start
            self.assertLess(times[name], BOUND, name)
            return result

        for when, client in (("new", self.client("demo", a, b)), ("open", before)):
            out = io.BytesIO()
            client._next = 0  # the hung server first, every time
            self.assertTrue(await timed(f"get ({when} connection)", client.get("k", out)))
            self.assertEqual(out.getvalue(), body)
            client._next = 0
            self.assertTrue(await timed(f"put ({when})", client.put(f"p-{when}", b"put")))
            client._next = 0
            stat = await timed(f"stat ({when})", client.stat("k"))
            self.assertEqual(stat.size, len(body))
            client._next = 0
            self.assertIn("k", await timed(f"list ({when})", client.list()))
            client._next = 0
            self.assertIsNotNone(await timed(f"url ({when})", client.get_url("k")))
            client._next = 0
            self.assertTrue(await timed(f"delete ({when})", client.delete(f"p-{when}")))
        print("\nfirst listed server hung (SIGSTOP), DeferredClient, default settings:")
        for name, took in times.items():
            print(f"  {name}: {took:.2f} s")

    async def test_blocking_client_and_cli(self) -> None:
        """
        The blocking client and the C{koboldfs} command, each in a process
        of its own, with the first listed server hung: a get and a put
        complete through the next server in under 6 s (the command timed
        from its start once imported).
        """
        a, b = await self.servers("a", "b")
        body = os.urandom(1024 * 1024)
        setup = self.client("demo", b)
        self.assertTrue(await setup.put("k", body))
        self.one_copy("demo")
        addresses = f"{a.address},{b.address}"
        env = {**os.environ, "PYTHONPATH": CHECKOUT}

        def blocking() -> dict[str, float]:
            done = subprocess.run(
                [sys.executable, "-c", BLOCKING, "demo", addresses, "k"],
                capture_output=True,
                env=env,
                timeout=120,
                text=True,
            )
            self.assertEqual(done.returncode, 0, done.stderr)
            return json.loads(done.stdout)

        def cli(*argv: str) -> float:
            done = subprocess.run(
                [sys.executable, "-c", COMMAND, "-s", addresses, "-n", "demo", "-q", *argv],
                capture_output=True,
                env=env,
                timeout=120,
                text=True,
            )
            result = json.loads(done.stderr.splitlines()[-1])
            self.assertEqual(result["code"], 0, done.stderr)
            return result["took"]

        out = os.path.join(a.dir, "out")
        source = os.path.join(a.dir, "source")
        with open(source, "wb") as f:
            f.write(body)
        baseline = await deferToThread(blocking)
        cli_get = await deferToThread(cli, "get", "k", out)
        cli_put = await deferToThread(cli, "put", "cli-0", source)
        self.hang(a)
        hung = await deferToThread(blocking)
        hung_cli_get = await deferToThread(cli, "get", "k", out)
        hung_cli_put = await deferToThread(cli, "put", "cli-1", source)
        with open(out, "rb") as got:
            self.assertEqual(got.read(), body)
        print("\nfirst listed server hung (SIGSTOP), default settings, seconds (none hung / hung):")
        print(f"  koboldfs.Client get: {baseline['get']:.2f} / {hung['get']:.2f}")
        print(f"  koboldfs.Client put: {baseline['put']:.2f} / {hung['put']:.2f}")
        print(f"  koboldfs get (after its imports): {cli_get:.2f} / {hung_cli_get:.2f}")
        print(f"  koboldfs put (after its imports): {cli_put:.2f} / {hung_cli_put:.2f}")
        for took in (hung["get"], hung["put"], hung_cli_get, hung_cli_put):
            self.assertLess(took, BOUND)

    def holders(self, key: str) -> list[str]:
        return sorted(
            name
            for (name,) in self.sql(
                "SELECT replicas.server FROM replicas JOIN files"
                f" ON files.id = replicas.file_id WHERE files.key = '{key}'"
            )
        )

    async def test_forward_target_hung(self) -> None:
        """
        A put to B whose copy goes to A, hung once B had a connection to
        it open: B gives A up after its peer deadline (3 s) and, by
        default, acknowledges the put with its own copy, before the
        client's deadline; meanwhile B answers other requests at once.
        """
        a, b = await self.servers("a", "b")
        client = self.client("demo", b, retries=0)
        self.assertTrue(await client.put("warm", b"opens B's connection to A"))
        self.assertEqual(self.holders("warm"), ["a", "b"])
        other = self.client("demo", b)
        self.hang(a)
        start = time.monotonic()
        put = client.put("best-effort", os.urandom(256 * 1024))
        meanwhile = time.monotonic()
        self.assertIsNotNone(await other.stat("warm"))
        answered = time.monotonic() - meanwhile
        self.assertFalse(put.called, "the put should still wait for hung A")
        self.assertTrue(await put)
        took = time.monotonic() - start
        self.assertEqual(self.holders("best-effort"), ["b"])
        print("\nput to B, its forward target A hung (SIGSTOP), default namespace:")
        print(f"  acknowledged on B alone in {took:.2f} s; a stat on B meanwhile: {answered:.2f} s")
        self.assertLess(took, 5.0)

    async def test_forward_target_hung_strict(self) -> None:
        """
        With a namespace that requires two copies, A hung and C alive, a
        put to B ends on B and C: B waits for A no longer than its peer
        deadlines, and the client's retry (if any) goes where it can.
        """
        a, b, c = await self.servers("a", "b", "c")
        warm = self.client("demo", b)
        for n in range(4):  # B's connections to both peers, open
            self.assertTrue(await warm.put(f"warm{n}", b"x"))
        self.sql("UPDATE namespaces SET min_copies = 2 WHERE name = 'demo'")
        self.hang(a)
        times = []
        for n in range(6):  # A is ranked first for about half of them
            on_c = len(files_on_disk(c))
            start = time.monotonic()
            self.assertTrue(await self.client("demo", b).put(f"strict{n}", os.urandom(65536)))
            times.append(time.monotonic() - start)
            self.assertEqual(self.holders(f"strict{n}"), ["b", "c"])
            self.assertEqual(len(files_on_disk(c)), on_c + 1)
        print("\nput to B needing two hosts, peer A hung (SIGSTOP), C alive:")
        print("  on B and C in " + ", ".join(f"{t:.2f}" for t in times) + " s")
        for took in times:
            self.assertLess(took, 15.0)
