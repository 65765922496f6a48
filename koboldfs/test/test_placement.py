"""
Tests of the placement policy (L{koboldfs.placement}): who holds a file's
copies, how many a put waits for, and when a file is short of copies,
with plain records; and that the status page's counts and C{koboldfs
admin fsck} call the same files short.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from koboldfs.cli import admin_fsck
from koboldfs.interfaces import FileInfo, NamespaceInfo, ServerInfo
from koboldfs.metadata.sqlstore import SQLAlchemyStore
from koboldfs.placement import (
    Decision,
    choose,
    counted_copies,
    forward_targets,
    live_hosts,
    missing_copies,
    required_copies,
    wanted_copies,
)
from koboldfs.testing import InlineThreadPool, SyncReactor

NOW = 1000.0
DOWN_AFTER = 30.0


def server(name: str, host: str, state: str = "alive", heartbeat: float = NOW) -> ServerInfo:
    return ServerInfo(name, host, f"{name}:1", "http://x", state=state, heartbeat=heartbeat)


def namespace(min_copies: int | None) -> NamespaceInfo:
    return NamespaceInfo(1, "ns", 0.0, min_copies=min_copies)


class RuleTests(SynchronousTestCase):
    """
    How many copies a put waits for, and where they go.
    """

    def test_default(self) -> None:
        """
        Two copies while two hosts or more are alive, one on a single host;
        a namespace's setting wins, even over what is possible (the put
        then fails, see below).
        """
        self.assertEqual(required_copies(None, 1), 1)
        self.assertEqual(required_copies(None, 2), 2)
        self.assertEqual(required_copies(None, 5), 2)
        self.assertEqual(required_copies(namespace(None), 3), 2)
        self.assertEqual(required_copies(namespace(1), 3), 1)
        self.assertEqual(required_copies(namespace(3), 2), 3)

    def test_live_hosts(self) -> None:
        """
        Hosts count once, only with a server alive and up; ours counts
        whatever the metadata says of it.
        """
        servers = {
            s.name: s
            for s in [
                server("a", "h1"),
                server("a2", "h1"),
                server("b", "h2"),
                server("c", "h3", state="readonly"),
                server("d", "h4", state="drain"),
                server("e", "h5", heartbeat=NOW - DOWN_AFTER - 1),
                server("f", "h6", state="dead"),
            ]
        }
        self.assertEqual(live_hosts(servers, "a", "h1", NOW, DOWN_AFTER), {"h1", "h2"})
        self.assertEqual(live_hosts({}, "a", "h1", NOW, DOWN_AFTER), {"h1"})

    def test_targets(self) -> None:
        """
        Peers on our host, not alive, or down are never targets; the
        others come in the order the replica placement picks them: the
        first is the server L{choose} picks for the second copy.
        """
        servers = {
            s.name: s
            for s in [
                server("a", "h1"),
                server("a2", "h1"),
                server("c", "h3", state="readonly"),
                server("e", "h5", heartbeat=NOW - DOWN_AFTER - 1),
                *(server(f"p{i}", f"host{i}") for i in range(8)),
            ]
        }
        for n in range(20):
            fid = hashlib.md5(str(n).encode()).hexdigest()
            targets = forward_targets(fid, "a", "h1", servers, NOW, DOWN_AFTER)
            self.assertEqual({t.name for t in targets}, {f"p{i}" for i in range(8)})
            info = FileInfo(1, fid, "ns", "k", 1, "0" * 64, 0.0, "p", replicas=("a",))
            first = targets[0]
            self.assertIs(choose(info, first.name, servers, 2, NOW, DOWN_AFTER), Decision.COPY, fid)
            for other in targets[1:]:
                self.assertIs(choose(info, other.name, servers, 2, NOW, DOWN_AFTER), Decision.DEFER)


class ChooseTests(SynchronousTestCase):
    """
    Who copies a file, computed alike by every server from the metadata.
    """

    def servers(self, *specs: tuple[str, str, str]) -> dict[str, ServerInfo]:
        return {
            name: ServerInfo(name, host, f"{name}:1", "http://x/", state=state, heartbeat=100.0)
            for name, host, state in specs
        }

    def info(self, *replicas: str, fid: str = "f" * 32) -> FileInfo:
        return FileInfo(1, fid, "ns", "k", 1, "0" * 64, 0.0, "files/x", replicas)

    def test_everyServer(self) -> None:
        """
        With no count, every server copies every file it lacks.
        """
        servers = self.servers(("a", "h", "alive"), ("b", "h", "alive"))
        self.assertIs(choose(self.info("a"), "b", servers, None, 100.0, 5.0), Decision.COPY)

    def test_exactlyNeeded(self) -> None:
        """
        Of the servers lacking a copy, exactly as many as are missing pick
        themselves, for any file.
        """
        servers = self.servers(*((n, n, "alive") for n in "abcde"))
        for n in range(20):
            info = self.info("a", fid=f"{n:032x}")
            chosen = [
                name
                for name in "bcde"
                if choose(info, name, servers, 3, 100.0, 5.0) is Decision.COPY
            ]
            self.assertEqual(len(chosen), 2)

    def test_uncountedStates(self) -> None:
        """
        Draining and dead servers' copies do not count, readonly ones do;
        nor do they, or down servers, get picked.
        """
        servers = self.servers(
            ("a", "ha", "drain"), ("b", "hb", "dead"), ("c", "hc", "readonly"), ("d", "hd", "alive")
        )
        info = self.info("a", "b", "c")
        self.assertIs(choose(info, "d", servers, 2, 100.0, 5.0), Decision.COPY)
        self.assertIs(choose(info, "d", servers, 1, 100.0, 5.0), Decision.ENOUGH)
        self.assertEqual(counted_copies(info, servers), ["c"])
        servers["e"] = ServerInfo("e", "he", "e:1", "http://x/", heartbeat=0.0)
        self.assertIs(choose(info, "d", servers, 2, 100.0, 5.0), Decision.COPY)


class UnderReplicatedTests(SynchronousTestCase):
    """
    "Short of copies" is one count: L{missing_copies}, the metadata's
    health (status page, C{admin status}) and C{admin fsck} agree on the
    same files, including one with no good copy left (which fsck once
    reported as a problem but not as short).
    """

    def setUp(self) -> None:
        self.reactor = SyncReactor()
        self.reactor.advance(NOW)
        root = self.mktemp()
        os.makedirs(root)
        url = f"sqlite:///{os.path.join(root, 'metadata.sqlite')}"
        self.store = SQLAlchemyStore(url, self.reactor, InlineThreadPool())
        self.wait(self.store.start())
        self.addCleanup(lambda: self.wait(self.store.stop()))

    def wait(self, d: object) -> object:
        return self.successResultOf(defer.ensureDeferred(d))  # type: ignore[arg-type]

    def add(self, key: str, *servers: str) -> FileInfo:
        fid = hashlib.md5(key.encode()).hexdigest()
        info = self.wait(
            self.store.add_file(
                "ns", key, fid, f"files/{fid}", 1, "0" * 64, NOW, servers[0], also=servers[1:]
            )
        )
        return info  # type: ignore[return-value]

    def test_one_count(self) -> None:
        # Servers down (no heartbeat for long), so fsck connects to none.
        for name, state in (("a", "alive"), ("b", "alive"), ("c", "drain")):
            self.wait(self.store.register_server(server(name, name, heartbeat=0.0)))
            self.wait(self.store.set_server_state(name, state))
        self.wait(self.store.set_namespace("ns", replicas=2))
        self.add("full", "a", "b")
        self.add("one", "a")
        self.add("draining", "a", "c")
        lost = self.add("lost", "a")
        self.wait(self.store.quarantine_replica(lost.id, "a"))
        servers = {s.name: s for s in self.wait(self.store.servers())}  # type: ignore[attr-defined]
        live = self.wait(self.store.live_files(None, 0, 100))
        wanted = wanted_copies(2, servers)
        short = {i.key for i in live if missing_copies(i, servers, wanted)}  # type: ignore[attr-defined]
        self.assertEqual(short, {"one", "draining", "lost"})
        health = self.wait(self.store.health())
        self.assertEqual(health.under_replicated, len(short))  # type: ignore[attr-defined]
        out = io.StringIO()
        args = argparse.Namespace(namespace=None, concurrency=2, down_after=DOWN_AFTER)
        with contextlib.redirect_stdout(out):
            self.wait(admin_fsck(self.store, args, self.reactor))
        self.assertIn(f"{len(short)} files short of copies, 1 with no good copy", out.getvalue())
