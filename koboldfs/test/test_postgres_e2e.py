"""
End-to-end tests of a cluster on PostgreSQL while PostgreSQL goes away:
real C{twistd koboldfs} servers and a real client putting files in a loop,
while the database restarts, or its primary stops and a streaming standby
is promoted in its place.

What must hold, as an application sees it: every put the client saw
succeed reads back afterwards with the same bytes; puts start succeeding
again by themselves once the database is back; and the servers ride it out
without being restarted.

Each test stops or restarts a PostgreSQL cluster of its own
(L{koboldfs.test.pgcluster}), never the shared test cluster, which a test
in trial's other worker (C{-j2}) may be using at the time.
"""

from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass
from urllib.parse import urlsplit

from twisted.internet import defer, reactor
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from koboldfs.client import DeferredClient
from koboldfs.errors import KoboldError
from koboldfs.protocol import CHUNK_SIZE
from koboldfs.test.cluster import ClusterMixin, ServerProcess
from koboldfs.test.pgcluster import SKIP, PostgresMixin, create_database
from koboldfs.test.support import sleep

log = Logger()

NAMESPACE = "e2e"

#: Seconds with no primary before the standby is promoted.
OUTAGE = 5.0


@dataclass
class Attempt:
    """
    One put by L{PutLoop}: when it was started and ended, and how it went.
    """

    key: str
    started: float
    ended: float
    acknowledged: bool
    error: str = ""


class PutLoop:
    """
    An application putting new files one after another through
    C{client}, remembering what the cluster acknowledged.

    A put that fails (the client gave up retrying) is not acknowledged and
    the loop goes on with the next file, as an application would, after a
    short pause.  An error that is not a L{KoboldError} is a bug: it ends
    the loop, and L{waitFor} and L{stop} raise it.
    """

    def __init__(self, client: DeferredClient, prefix: str = "file/") -> None:
        self.client = client
        self.prefix = prefix
        self.attempts: list[Attempt] = []
        self.acknowledged: dict[str, bytes] = {}
        self.unacknowledged: dict[str, bytes] = {}
        self._stopping = False
        self._random = random.Random()
        self.done: defer.Deferred[None] = defer.ensureDeferred(self._run())

    async def _run(self) -> None:
        n = 0
        while not self._stopping:
            key = f"{self.prefix}{n:06d}"
            n += 1
            # Mostly small files; one in ten streams, over several DATA frames.
            if n % 10 == 0:
                size = self._random.randrange(CHUNK_SIZE + 1, 3 * CHUNK_SIZE)
            else:
                size = self._random.randrange(8 * 1024)
            body = os.urandom(size)
            started = reactor.seconds()
            try:
                ok = await self.client.put(key, body)
            except KoboldError as e:
                self.unacknowledged[key] = body
                self.attempts.append(Attempt(key, started, reactor.seconds(), False, repr(e)))
                await sleep(0.1)
                continue
            if ok is not True:
                raise AssertionError(f"put({key!r}) returned {ok!r}, not True")
            self.acknowledged[key] = body
            self.attempts.append(Attempt(key, started, reactor.seconds(), True))

    def acknowledgedSince(self, when: float) -> list[Attempt]:
        """
        The acknowledged puts started at C{when} or later.
        """
        return [a for a in self.attempts if a.acknowledged and a.started >= when]

    async def waitFor(self, count: int, since: float, timeout: float, what: str) -> list[Attempt]:
        """
        Wait until C{count} puts started at C{since} or later were
        acknowledged; return them.
        """
        deadline = reactor.seconds() + timeout
        while len(acknowledged := self.acknowledgedSince(since)) < count:
            if self.done.called:
                await self.done  # the loop died: raise why
                raise AssertionError("the put loop stopped")
            if reactor.seconds() > deadline:
                failed = [a for a in self.attempts if not a.acknowledged][-3:]
                raise AssertionError(
                    f"{what}: only {len(acknowledged)} of {count} puts acknowledged "
                    f"in {timeout}s; last failures: {failed}"
                )
            await sleep(0.05)
        return acknowledged

    async def stop(self) -> None:
        """
        Finish the put in progress and stop.
        """
        self._stopping = True
        await self.done


class DatabaseOutageTests(PostgresMixin, ClusterMixin, TestCase):
    """
    Two servers sharing a PostgreSQL database, and an application putting
    files through both, while the database goes away and comes back.
    """

    timeout = 180

    if SKIP:
        skip = SKIP

    async def _cluster(self, db: str) -> tuple[list[ServerProcess], DeferredClient, PutLoop]:
        """
        Start two servers on C{db} and a put loop through both of them.
        """
        servers = [
            await self.startServer("a", db=db),
            await self.startServer("b", db=db),
        ]
        # Retries with a backoff, as an application riding out a failover
        # would set them: about 4 s of retrying before giving up.
        client = DeferredClient(
            NAMESPACE, [s.address for s in servers], reactor, retries=4, backoff=0.25, timeout=15
        )
        self.addCleanup(client.close)
        loop = PutLoop(client)
        self.addCleanup(lambda: defer.ensureDeferred(loop.stop()))
        return servers, client, loop

    async def _verify(self, servers: list[ServerProcess], loop: PutLoop) -> None:
        """
        Every acknowledged put reads back with its bytes, through each
        server (one that holds no copy streams it from its peer); an
        unacknowledged one is either absent or whole, never a key without
        its file; and no server was restarted or died.
        """
        pids = {s.name: s.process.pid for s in servers if s.process is not None}
        lost: list[str] = []
        wrong: list[str] = []
        dangling: list[str] = []
        for server in servers:
            reader = DeferredClient(NAMESPACE, [server.address], reactor, retries=5, backoff=0.2)
            self.addCleanup(reader.close)
            for key, body in loop.acknowledged.items():
                out = io.BytesIO()
                if not await reader.get(key, out):
                    lost.append(f"{key} via {server.name}")
                elif out.getvalue() != body:
                    wrong.append(f"{key} via {server.name}")
            for key, body in loop.unacknowledged.items():
                if await reader.stat(key) is None:
                    continue
                out = io.BytesIO()
                try:
                    found = await reader.get(key, out)
                except KoboldError as e:
                    dangling.append(f"{key} via {server.name}: {e!r}")
                    continue
                if not found or out.getvalue() != body:
                    dangling.append(f"{key} via {server.name}: found={found}")
        self.assertEqual(lost, [], "acknowledged puts lost")
        self.assertEqual(wrong, [], "acknowledged puts read back with other bytes")
        self.assertEqual(dangling, [], "unacknowledged puts visible but unreadable")
        for server in servers:
            assert server.process is not None
            self.assertIsNone(server.process.poll(), f"server {server.name} died:\n{server.tail()}")
            self.assertEqual(server.process.pid, pids[server.name])

    def _report(self, what: str, loop: PutLoop, outage: float, back: float) -> None:
        """
        Log how the outage looked from the application (in test.log).
        """
        failed = [a for a in loop.attempts if not a.acknowledged]
        log.info(
            "{what}: {acked} puts acknowledged, {failed} failed; outage began "
            "{outage:.2f}, database back {back:.2f}; first put acknowledged after "
            "{first:.2f} s; failures: {errors}",
            what=what,
            acked=len(loop.acknowledged),
            failed=len(failed),
            outage=outage,
            back=back,
            first=min((a.ended - back for a in loop.acknowledgedSince(back)), default=float("nan")),
            errors=[a.error for a in failed[:3]],
        )

    def test_restart(self) -> defer.Deferred[None]:
        """
        C{pg_ctl restart -m fast} closes every session of both servers
        while puts go on: puts resume on their own, no acknowledged file
        is lost, and neither server is restarted.
        """

        async def run() -> None:
            pg = await self.throwawayCluster()
            db = await create_database(pg.url())
            servers, client, loop = await self._cluster(db)
            await loop.waitFor(20, since=0, timeout=30, what="before the restart")
            began = reactor.seconds()
            await pg.restart("fast")
            back = reactor.seconds()
            await loop.waitFor(20, since=back, timeout=30, what="after the restart")
            await loop.stop()
            self._report("restart", loop, began, back)
            await self._verify(servers, loop)

        return defer.ensureDeferred(run())

    def test_standby_promoted(self) -> defer.Deferred[None]:
        """
        Servers given a primary and its streaming standby in a multi-host
        URL (C{target_session_attrs=read-write}) go on with the standby
        once the primary stops and the standby is promoted: puts resume
        within a bounded time, and every put acknowledged by the old
        primary is on the new one.
        """

        async def run() -> None:
            primary = await self.throwawayCluster()
            # Made before the base backup, so the standby has it too.
            name = urlsplit(await create_database(primary.url())).path.lstrip("/")
            standby = await self.standbyOf(primary)
            db = (
                f"postgresql://postgres@{primary.address},{standby.address}/{name}"
                "?target_session_attrs=read-write"
            )
            servers, client, loop = await self._cluster(db)
            await loop.waitFor(20, since=0, timeout=30, what="before the failover")
            began = reactor.seconds()
            await primary.stop("fast")
            # No primary for a while, as while a failover manager decides:
            # longer than the client's retries last, so some puts fail.
            await sleep(OUTAGE)
            await standby.promote()
            promoted = reactor.seconds()
            resumed = await loop.waitFor(
                20, since=promoted, timeout=60, what="after the standby's promotion"
            )
            self.assertLess(resumed[0].ended - promoted, 60.0)
            self.assertEqual(await standby.query("SELECT pg_is_in_recovery()"), [(False,)])
            await loop.stop()
            self._report("failover", loop, began, promoted)
            await self._verify(servers, loop)

        return defer.ensureDeferred(run())
