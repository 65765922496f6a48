"""
PostgreSQL failover under load: three servers on a primary and its
streaming standby (a multi-host URL, C{target_session_attrs=read-write}),
an application putting files in a loop, servers SIGKILLed at random (and
started again) while the primary crashes (C{pg_ctl stop -m immediate}) and
the standby is promoted.  With the standby synchronous
(C{synchronous_standby_names}), no acknowledged put may be lost; with it
asynchronous, some may be (docs/postgresql.md), and the test reports how
many.  C{KOBOLDFS_LONG_FAULTS=1} keeps the servers being killed for 60 s
instead of 10.
"""

from __future__ import annotations

import io
import os
import random
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from koboldfs.client import DeferredClient
from koboldfs.test.cluster import ClusterMixin, ServerProcess
from koboldfs.test.pgcluster import SKIP, PostgresMixin, create_database
from koboldfs.test.support import eventually, sleep
from koboldfs.test.test_postgres_e2e import NAMESPACE, PutLoop

LONG = bool(os.environ.get("KOBOLDFS_LONG_FAULTS"))
#: Seconds servers are killed at random, around the failover.
KILLING = 60.0 if LONG else 10.0
#: Seconds with no primary before the standby is promoted.
OUTAGE = 3.0


class Killer:
    """
    SIGKILLs a random running server every second or so (never the last
    one running) and starts it again a second later, retrying while it
    cannot start (a server does not start without a primary), until
    stopped; then every server runs again.
    """

    def __init__(self, servers: list[ServerProcess]) -> None:
        self.servers = servers
        self.kills = 0
        self._down: dict[str, defer.Deferred[None]] = {}
        self._stopping = False
        self._random = random.Random(7)
        self.done: defer.Deferred[None] = defer.ensureDeferred(self._run())

    async def _run(self) -> None:
        while not self._stopping:
            running = [s for s in self.servers if s.name not in self._down]
            if len(running) > 1:
                victim = self._random.choice(running)
                victim.kill()
                self.kills += 1
                self._down[victim.name] = defer.ensureDeferred(self._restart(victim))
            await sleep(0.5 + self._random.random())
        await defer.gatherResults(list(self._down.values()))

    async def _restart(self, server: ServerProcess) -> None:
        await sleep(1)
        while True:
            try:
                await server.start(timeout=30)
                break
            except RuntimeError:
                await sleep(1)
        del self._down[server.name]

    async def stop(self) -> None:
        self._stopping = True
        await self.done


class FailoverUnderLoadTests(PostgresMixin, ClusterMixin, TestCase):
    timeout = 600 if LONG else 300

    if SKIP:
        skip = SKIP

    async def failover(self, synchronous: bool) -> dict[str, Any]:
        primary = await self.throwawayCluster()
        # Made before the base backup, so the standby has it too.
        name = urlsplit(await create_database(primary.url())).path.lstrip("/")
        standby = await self.standbyOf(primary)
        if synchronous:
            await primary.query("ALTER SYSTEM SET synchronous_standby_names = '*'")
            await primary.query("SELECT pg_reload_conf()")

            async def sync() -> bool:
                rows = await primary.query("SELECT sync_state FROM pg_stat_replication")
                return rows == [("sync",)]

            await eventually(sync, timeout=30, what="the standby synchronous")
        db = (
            f"postgresql://postgres@{primary.address},{standby.address}/{name}"
            "?target_session_attrs=read-write"
        )
        servers = [
            await self.startServer(n, db=db, host=f"host-{n}", extra=("--scrub-rate=0",))
            for n in ("a", "b", "c")
        ]
        # An application riding out a failover: about 30 s of retrying.
        client = DeferredClient(
            NAMESPACE, [s.address for s in servers], reactor, retries=6, backoff=0.5
        )
        self.addCleanup(client.close)
        # Four puts at a time, so that some are always in flight.
        loops = [PutLoop(client, prefix=f"w{n}/") for n in range(4)]
        self.addCleanup(
            lambda: defer.gatherResults([defer.ensureDeferred(w.stop()) for w in loops])
        )
        loop = loops[0]
        await loop.waitFor(20, since=0, timeout=60, what="before the failover")
        killer = Killer(servers)
        self.addCleanup(lambda: defer.ensureDeferred(killer.stop()))
        await sleep(KILLING / 2)
        began = reactor.seconds()
        await primary.stop("immediate")  # a crash: what async replication can lose
        await sleep(OUTAGE)
        await standby.promote()
        promoted = reactor.seconds()
        await sleep(KILLING / 2)
        await killer.stop()
        resumed = await loop.waitFor(
            20, since=promoted, timeout=120, what="after the standby's promotion"
        )
        for each in loops:
            await each.stop()
        acknowledged = {k: v for each in loops for k, v in each.acknowledged.items()}
        attempts = [a for each in loops for a in each.attempts]
        self.assertEqual(await standby.query("SELECT pg_is_in_recovery()"), [(False,)])
        reader = DeferredClient(
            NAMESPACE, [s.address for s in servers], reactor, retries=5, backoff=0.5
        )
        self.addCleanup(reader.close)
        lost, wrong = [], []
        for key, body in acknowledged.items():
            out = io.BytesIO()
            if not await reader.get(key, out):
                lost.append(key)
            elif out.getvalue() != body:
                wrong.append(key)
        failed = [a for a in attempts if not a.acknowledged]
        figures: dict[str, Any] = {
            "acknowledged": len(acknowledged),
            "failed": len(failed),
            "lost": len(lost),
            "wrong": len(wrong),
            "kills": killer.kills,
            "first_put_after_promotion_s": round(resumed[0].ended - promoted, 1),
            "no_primary_s": round(promoted - began, 1),
        }
        kind = "synchronous" if synchronous else "asynchronous"
        print(f"\nfailover under load, {kind} standby: {figures} lost: {lost[:5]}")
        self.assertEqual(wrong, [], "acknowledged puts read back with other bytes")
        acked_at = {a.key: a.ended for a in attempts if a.acknowledged}
        figures["lost_acked_before_crash_s"] = [round(began - acked_at[k], 2) for k in lost]
        return figures

    async def test_synchronous_standby(self) -> None:
        """
        With a synchronous standby, no acknowledged put is lost.
        """
        figures = await self.failover(synchronous=True)
        self.assertEqual(figures["lost"], 0, figures)

    async def test_asynchronous_standby(self) -> None:
        """
        With an asynchronous standby, the puts acknowledged in the last
        moments before the crash may be lost (counted), and only those:
        each lost one was acknowledged within 2 s before the crash, when
        the standby may not have had its commit yet; none reads back wrong.
        """
        figures = await self.failover(synchronous=False)
        for before in figures["lost_acked_before_crash_s"]:
            self.assertTrue(0 <= before <= 2.0, figures)
