"""
The C{koboldfs} command end to end, against real C{twistd koboldfs}
servers: as a subprocess (C{python -m koboldfs.cli}) where pipes and exit
statuses are the point, and in-process (L{koboldfs.cli.main} in a thread,
with its standard streams replaced) for the rest, which is faster.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import shutil
import struct
import subprocess
import sys
import termios
import urllib.error
import urllib.request
from dataclasses import dataclass

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from koboldfs import cli
from koboldfs.client import DeferredClient
from koboldfs.errors import ChecksumMismatch, DataLost
from koboldfs.test.cluster import CHECKOUT, ClusterMixin, ServerProcess
from koboldfs.test.support import eventually, free_port


@dataclass
class Result:
    code: int
    out: bytes
    err: str


def run_process(argv: list[str], stdin: bytes = b"", env: dict[str, str] | None = None) -> Result:
    """
    Run C{koboldfs ARGV} as its own process, as a user's shell would.
    """
    done = subprocess.run(
        [sys.executable, "-m", "koboldfs.cli", *argv],
        input=stdin,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": CHECKOUT, **(env or {})},
        timeout=120,
    )
    return Result(done.returncode, done.stdout, done.stderr.decode(errors="replace"))


def source_of(server: ServerProcess, body: bytes) -> str:
    path = os.path.join(server.dir, "body")
    with open(path, "wb") as f:
        f.write(body)
    return path


def with_terminal(argv: list[str]) -> str:
    """
    Run C{koboldfs ARGV} with a pseudo-terminal as its stderr; return what
    it wrote there.
    """
    import pty

    master, slave = pty.openpty()
    # 24 rows of 80 columns: a new pty has none, and a bar no width.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "koboldfs.cli", *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=slave,
            env={**os.environ, "PYTHONPATH": CHECKOUT},
        )
        os.close(slave)
        slave = -1
        seen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the other end is closed
                break
            if not chunk:
                break
            seen += chunk
        assert process.wait(120) == 0, seen
        return seen.decode(errors="replace")
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


class _Stream(io.TextIOWrapper):
    """
    A text stream over bytes, as sys.stdout is: with a C{buffer}, and not
    a terminal.
    """

    def __init__(self, data: bytes = b"") -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8", write_through=True)

    def bytes(self) -> bytes:
        self.flush()
        return self.buffer.getvalue()  # type: ignore[attr-defined,no-any-return]


class CLITestsMixin(ClusterMixin):
    timeout = 180

    def cli(self, *argv: str, stdin: bytes = b"") -> defer.Deferred[Result]:
        """
        C{main(argv)} in a thread (the blocking client must not run in the
        reactor's), with its own stdin, stdout and stderr.
        """
        out, err, inp = _Stream(), _Stream(), _Stream(stdin)
        self.patch(sys, "stdout", out)  # type: ignore[attr-defined]
        self.patch(sys, "stderr", err)  # type: ignore[attr-defined]
        self.patch(sys, "stdin", inp)  # type: ignore[attr-defined]
        d = deferToThread(cli.main, list(argv))
        return d.addCallback(lambda code: Result(code, out.bytes(), err.bytes().decode()))

    async def cluster(self, n: int = 1, extra: tuple[str, ...] = ()) -> list[ServerProcess]:
        base = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
        os.makedirs(base)
        db = f"sqlite:///{base}/shared.sqlite"
        self.db = db
        return [await self.startServer(name, db=db, extra=extra) for name in "abc"[:n]]


class FileCommandTests(CLITestsMixin, TestCase):
    """
    put, get, cat, rm, ls, stat, url and ping on a real server.
    """

    async def test_streaming(self) -> None:
        """
        Bytes piped into C{put -} come back whole from C{get KEY -} and
        C{cat}, in separate processes, across several 1 MiB chunks; C{get}
        to a file writes it; the servers can be given by environment.
        """
        (a,) = await self.cluster()
        body = os.urandom(3 * 1024 * 1024 + 17)
        env = {"KOBOLDFS_SERVERS": a.address, "KOBOLDFS_NAMESPACE": "pipes"}
        put = await deferToThread(run_process, ["put", "big.bin", "-"], body, env)
        self.assertEqual((put.code, put.out), (0, b""), put.err)
        got = await deferToThread(run_process, ["get", "big.bin", "-"], b"", env)
        self.assertEqual(got.code, 0, got.err)
        self.assertEqual(hashlib.sha256(got.out).hexdigest(), hashlib.sha256(body).hexdigest())
        cat = await deferToThread(run_process, ["cat", "big.bin"], b"", env)
        self.assertEqual(cat.code, 0, cat.err)
        self.assertEqual(len(cat.out), len(body))
        self.assertEqual(cat.out, body)
        # In the default namespace it is not there.
        missing = await deferToThread(
            run_process, ["-s", a.address, "cat", "big.bin"], b"", {"KOBOLDFS_NAMESPACE": ""}
        )
        self.assertEqual(missing.code, cli.EXIT_NOT_FOUND)
        self.assertIn("no key 'big.bin' in namespace 'default'", missing.err)
        # To a file, and into a directory under the key's last part.
        target = os.path.abspath(self.mktemp())
        os.makedirs(target)
        r = await self.cli("-s", a.address, "-n", "pipes", "get", "big.bin", target)
        self.assertEqual(r.code, 0, r.err)
        with open(os.path.join(target, "big.bin"), "rb") as f:
            self.assertEqual(f.read(), body)
        # No partial file is left behind.
        self.assertEqual(os.listdir(target), ["big.bin"])
        # A progress bar when stderr is a terminal, none when it is a pipe
        # (above: nothing but the error was written to stderr).
        self.assertEqual(put.err, "")
        bar = await deferToThread(
            with_terminal, ["-s", a.address, "-n", "pipes", "put", "tty.bin", source_of(a, body)]
        )
        self.assertIn("100%", bar)

    async def test_exit_statuses(self) -> None:
        """
        0 on success, 1 for a missing key, 2 for a usage error, 3 when no
        server answers; each failure says on stderr what to do.
        """
        (a,) = await self.cluster()
        source = os.path.join(a.dir, "hello.txt")
        with open(source, "wb") as f:
            f.write(b"hello\n")
        ok = await deferToThread(run_process, ["-s", a.address, "put", "hello.txt", source])
        self.assertEqual(ok.code, cli.EXIT_OK, ok.err)
        # Usage: no command, an unknown option, a bad key, a missing file.
        none = await deferToThread(run_process, [])
        self.assertEqual(none.code, cli.EXIT_USAGE)
        self.assertIn("usage: koboldfs", none.err)
        bad = await deferToThread(run_process, ["get", "--frobnicate", "k"])
        self.assertEqual(bad.code, cli.EXIT_USAGE)
        self.assertIn("unrecognized arguments", bad.err)
        r = await self.cli("-s", a.address, "stat", "")
        self.assertEqual(r.code, cli.EXIT_USAGE)
        r = await self.cli("-s", a.address, "put", "k", os.path.join(a.dir, "nonesuch"))
        self.assertEqual(r.code, cli.EXIT_USAGE)
        self.assertIn("cannot read", r.err)
        r = await self.cli("-s", "not an address", "ping")
        self.assertEqual(r.code, cli.EXIT_USAGE, r.err)
        # Not found.
        for argv in (["stat", "nope"], ["url", "nope"], ["get", "nope", "-"], ["rm", "nope"]):
            r = await self.cli("-s", a.address, *argv)
            self.assertEqual(r.code, cli.EXIT_NOT_FOUND, (argv, r.err))
            self.assertIn("no key 'nope'", r.err)
            self.assertEqual(r.out, b"")
        # Unreachable: a port nobody listens on.
        nobody = f"127.0.0.1:{free_port()}"
        gone = await deferToThread(run_process, ["-s", nobody, "cat", "hello.txt"])
        self.assertEqual(gone.code, cli.EXIT_UNAVAILABLE)
        self.assertIn(f"no server answered at {nobody}", gone.err)
        self.assertIn("KOBOLDFS_SERVERS", gone.err)
        r = await self.cli("-s", nobody, "ping")
        self.assertEqual(r.code, cli.EXIT_UNAVAILABLE)
        # A refused request (here: an upload to a read-only server) is 3 too.
        state = await deferToThread(
            run_process, ["admin", "--db", self.db, "server", "set-state", "a", "readonly"]
        )
        self.assertEqual(state.code, 0, state.err)
        await self.eventuallyRefused(a, source)

    async def eventuallyRefused(self, a: ServerProcess, source: str) -> None:
        # The server learns its state at its next heartbeat (1 s here).
        async def refused() -> bool:
            r = await self.cli("-s", a.address, "put", "other", source)
            if r.code == cli.EXIT_OK:
                return False
            self.assertEqual(r.code, cli.EXIT_UNAVAILABLE, r.err)
            self.assertIn("takes no new files", r.err)
            return True

        await eventually(refused, what="the server to refuse uploads")

    async def test_ls(self) -> None:
        """
        C{ls} lists every key with the prefix, in order, over more pages
        than one; C{ls -l} adds size, copies, date and SHA-256.
        """
        a, b = await self.cluster(2)
        client = DeferredClient("lots", [a.address])
        self.addCleanup(client.close)
        keys = [f"dir/{i:03d}" for i in range(25)] + ["other"]
        await defer.gatherResults([client.put(k, k.encode()) for k in keys])
        r = await self.cli("-s", f"{a.address},{b.address}", "-n", "lots", "ls", "dir/")
        self.assertEqual(r.code, 0, r.err)
        self.assertEqual(r.out.decode().splitlines(), keys[:-1])
        # Pages of 10: three requests and a fourth, empty one.
        r = await self.cli("-n", "lots", "-s", a.address, "ls", "--page-size", "10")
        self.assertEqual(r.out.decode().splitlines(), keys)
        r = await self.cli("-n", "lots", "-s", a.address, "ls", "--page-size", "0")
        self.assertEqual(r.code, cli.EXIT_USAGE)
        r = await self.cli("-n", "lots", "-s", a.address, "ls", "-l", "--page-size", "7", "dir/00")
        self.assertEqual(r.code, 0, r.err)
        lines = r.out.decode().splitlines()
        self.assertEqual(len(lines), 10)
        size, copies, created, sha256, key = lines[3].split()
        self.assertEqual(key, "dir/003")
        self.assertEqual(int(size), len(b"dir/003"))
        self.assertIn(int(copies), (1, 2))
        self.assertRegex(created, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        self.assertEqual(sha256, hashlib.sha256(b"dir/003").hexdigest())
        r = await self.cli("-n", "empty", "-s", a.address, "ls")
        self.assertEqual((r.code, r.out), (0, b""))

    async def test_ls_over_a_server_page(self) -> None:
        """
        More keys than a server returns in one LIST reply (1,000): C{ls}
        still lists them all.
        """
        (a,) = await self.cluster()
        client = DeferredClient("many", [a.address])
        self.addCleanup(client.close)
        keys = [f"{i:04d}" for i in range(cli.PAGE + 1)]
        sem = defer.DeferredSemaphore(16)
        await defer.gatherResults([sem.run(client.put, k, b"") for k in keys])
        r = await self.cli("-n", "many", "-s", a.address, "ls", "--page-size", "5000")
        self.assertEqual(r.code, 0, r.err)
        self.assertEqual(r.out.decode().splitlines(), keys)

    async def test_stat_url_rm_ping(self) -> None:
        """
        C{stat} shows what the cluster knows of a key, C{url} a URL that
        serves it, C{rm} deletes keys, C{ping} asks each server.
        """
        a, b = await self.cluster(2)
        servers = f"{a.address},{b.address}"
        r = await self.cli("-s", servers, "put", "motd", "-", stdin=b"Welcome.\n")
        self.assertEqual(r.code, 0, r.err)
        r = await self.cli("-s", servers, "stat", "motd")
        self.assertEqual(r.code, 0, r.err)
        fields = dict(line.split(":", 1) for line in r.out.decode().splitlines())
        self.assertEqual(fields["key"].strip(), "motd")
        self.assertEqual(fields["namespace"].strip(), "default")
        self.assertEqual(fields["size"].strip(), "9")
        self.assertEqual(fields["sha256"].strip(), hashlib.sha256(b"Welcome.\n").hexdigest())
        r = await self.cli("-s", servers, "url", "motd")
        self.assertEqual(r.code, 0, r.err)
        url = r.out.decode().strip()
        self.assertTrue(url.startswith(("http://127.0.0.1:")), url)
        body = await deferToThread(lambda: urllib.request.urlopen(url, timeout=30).read())
        self.assertEqual(body, b"Welcome.\n")
        r = await self.cli("-s", servers, "url", "motd", "--expires", "0")
        self.assertEqual(r.code, cli.EXIT_USAGE)
        # rm: several keys; a missing one is 1, unless -f.
        r = await self.cli("-s", a.address, "put", "two", "-", stdin=b"2")
        self.assertEqual(r.code, 0, r.err)
        r = await self.cli("-s", a.address, "rm", "motd", "two", "three")
        self.assertEqual(r.code, cli.EXIT_NOT_FOUND)
        self.assertIn("'three'", r.err)
        self.assertNotIn("'two'", r.err)
        r = await self.cli("-s", a.address, "rm", "-f", "motd", "three")
        self.assertEqual(r.code, 0, r.err)
        r = await self.cli("-s", a.address, "ls")
        self.assertEqual((r.code, r.out), (0, b""))
        # ping: each server; one down still answers 0 while another does.
        r = await self.cli("-s", servers, "ping")
        self.assertEqual(r.code, 0, r.err)
        self.assertIn(f"{a.address}: answered in", r.out.decode())
        self.assertIn(f"{b.address}: answered in", r.out.decode())
        await b.stop()
        r = await self.cli("-s", servers, "ping")
        self.assertEqual(r.code, 0, r.err)
        self.assertIn(f"{b.address}: no answer", r.out.decode())


class AdminTests(CLITestsMixin, TestCase):
    """
    C{koboldfs admin}, on the metadata database of real servers.
    """

    async def admin(self, *argv: str) -> Result:
        """
        C{koboldfs admin ARGV} in-process, on the test's reactor.
        """
        out, err = _Stream(), _Stream()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = await cli.admin(reactor, list(argv))
        return Result(code, out.bytes(), err.bytes().decode())

    async def healthy(self, db: str) -> bool:
        r = await self.admin("--db", db, "status", "--down-after", "3")
        self.assertIn(r.code, (0, 1), r.err)
        return r.code == 0

    async def test_status(self) -> None:
        """
        C{admin status} exits 1 while a server is down and files are short
        of their copies, and 0 once it is back and has caught up.
        """
        a, b = await self.cluster(2)
        await eventually(lambda: self.healthy(self.db), what="a healthy cluster")
        r = await self.admin("--db", self.db, "status")
        self.assertIn("servers: 2 (2 alive)", r.out.decode())
        # Each server's own figures, from its status page.
        self.assertRegex(
            r.out.decode(), r"\n  a: scrub: \d+ rounds done, .* 0 bad; 0 copies to retry\n"
        )
        self.assertIn("\n  b: scrub: ", r.out.decode())
        self.assertTrue(r.out.decode().endswith("OK\n"), r.out)
        await b.stop()
        client = DeferredClient("default", [a.address])
        self.addCleanup(client.close)
        await client.put("while-b-was-down", b"x" * 10)

        async def degraded() -> bool:
            r = await self.admin("--db", self.db, "status", "--down-after", "3")
            return r.code == cli.EXIT_NOT_FOUND and b"DOWN: b" in r.out

        await eventually(degraded, what="b reported down")
        r = await self.admin("--db", self.db, "status", "--down-after", "3")
        out = r.out.decode()
        self.assertIn("under-replicated: 1 files, 1 copies to make", out)
        self.assertIn("DEGRADED: 1 of 2 servers down; 1 files short of their copies", out)
        # Through the command, as a monitor runs it: exit status 1.
        process = await deferToThread(
            run_process, ["admin", "status", "--down-after", "3"], b"", {"KOBOLDFS_DB": self.db}
        )
        self.assertEqual(process.code, cli.EXIT_NOT_FOUND, process.err)
        await b.start()
        await eventually(lambda: self.healthy(self.db), what="b back and caught up")

    async def test_servers_and_namespaces(self) -> None:
        """
        The servers with their state, heartbeat and disk; their states
        changed; namespaces listed, created and changed.
        """
        a, b = await self.cluster(2)
        db = self.db

        async def both_registered() -> bool:
            # A server listens a moment before it registers.
            r = await self.admin("--db", db, "servers")
            return len(r.out.decode().splitlines()) == 3

        await eventually(both_registered, what="both servers registered")
        r = await self.admin("--db", db, "servers")
        self.assertEqual(r.code, 0, r.err)
        lines = r.out.decode().splitlines()
        self.assertEqual(lines[0].split()[:4], ["NAME", "HOST", "ADDRESS", "STATE"])
        self.assertEqual(
            [line.split()[:4] for line in lines[1:]],
            [["a", "a", a.address, "alive"], ["b", "b", b.address, "alive"]],
        )
        r = await self.admin("--db", db, "server", "set-state", "b", "drain")
        self.assertEqual(r.code, 0, r.err)
        r = await self.admin("--db", db, "servers")
        self.assertEqual(r.out.decode().splitlines()[2].split()[3], "drain")
        r = await self.admin("--db", db, "server", "set-state", "nonesuch", "dead")
        self.assertEqual(r.code, cli.EXIT_NOT_FOUND)
        self.assertIn("no server named 'nonesuch'", r.err)
        r = await self.admin("--db", db, "server", "set-state", "b", "sleeping")
        self.assertEqual(r.code, cli.EXIT_USAGE)
        # Namespaces.
        r = await self.admin(
            "--db",
            db,
            "namespace",
            "create",
            "photos",
            "--replicas",
            "2",
            "--min-copies",
            "2",
            "--private",
            "--url-template",
            "https://cdn.example/{path}",
        )
        self.assertEqual(r.code, 0, r.err)
        self.assertIn("photos: replicas 2, min copies 2, private", r.out.decode())
        r = await self.admin("--db", db, "namespace", "create", "photos")
        self.assertEqual(r.code, cli.EXIT_NOT_FOUND)
        r = await self.admin("--db", db, "namespace", "set", "photos", "--replicas", "3")
        self.assertEqual(r.code, 0, r.err)
        r = await self.admin("--db", db, "namespace", "set", "photos")
        self.assertEqual(r.code, cli.EXIT_USAGE)
        r = await self.admin("--db", db, "namespace", "set", "nonesuch", "--replicas", "1")
        self.assertEqual(r.code, cli.EXIT_NOT_FOUND)
        r = await self.admin("--db", db, "namespace", "set", "photos", "--url-template", "{nope}")
        self.assertEqual(r.code, cli.EXIT_USAGE, r.err)
        r = await self.admin("--db", db, "namespaces")
        rows = [line.split() for line in r.out.decode().splitlines()]
        self.assertEqual(rows[0][:4], ["NAME", "REPLICAS", "MIN", "ACCESS"])
        self.assertEqual(rows[1][:4], ["photos", "3", "2", "private"])
        self.assertEqual(rows[1][-1], "https://cdn.example/{path}")
        # The database named by the environment.
        self.patch(os, "environ", {**os.environ, "KOBOLDFS_DB": db})
        r = await self.admin("namespaces")
        self.assertEqual(r.code, 0, r.err)
        # No such database.
        r = await self.admin("--db", f"sqlite:///{a.dir}/nonesuch.sqlite", "servers")
        self.assertEqual(r.code, cli.EXIT_UNAVAILABLE)
        self.assertIn("KOBOLDFS_DB", r.err)
        r = await self.admin()
        self.assertEqual(r.code, cli.EXIT_USAGE)

    async def test_fsck(self) -> None:
        """
        C{admin fsck} finds a missing copy and a corrupt one, lists them,
        and has them made again: the next fsck finds none.
        """
        a, b = await self.cluster(2, extra=("--scrub-rate=0",))
        client = DeferredClient("default", [a.address])
        self.addCleanup(client.close)
        bodies = {f"k{i}": os.urandom(1000 + i) for i in range(3)}
        for key, body in bodies.items():
            await client.put(key, body)
        await client.put("other", b"in another namespace")
        await eventually(lambda: self.healthy(self.db), what="every file on both servers")
        r = await self.admin("--db", self.db, "fsck")
        self.assertEqual(r.code, 0, (r.out, r.err))
        self.assertIn("4 files, 8 copies: 8 good, 0 bad", r.out.decode())
        on_a, on_b = stored(a), stored(b)
        os.unlink(on_a[bodies["k0"]])
        with open(on_b[bodies["k1"]], "r+b") as f:
            f.write(b"\0" * 10)
        r = await self.admin("--db", self.db, "fsck")
        self.assertEqual(r.code, cli.EXIT_NOT_FOUND, r.out)
        out = r.out.decode()
        self.assertIn("4 files, 8 copies: 6 good, 2 bad", out)
        self.assertIn("PROBLEM: default/k0 (file 1", out)
        self.assertIn("on a: bad copy", out)
        self.assertIn("PROBLEM: default/k1 (file 2", out)
        self.assertIn("on b: bad copy", out)
        await eventually(lambda: self.healthy(self.db), what="the copies made again")
        r = await self.admin("--db", self.db, "fsck", "--namespace", "default")
        self.assertEqual(r.code, 0, r.out)
        self.assertEqual(open(on_a[bodies["k0"]], "rb").read(), bodies["k0"])
        self.assertEqual(open(on_b[bodies["k1"]], "rb").read(), bodies["k1"])
        r = await self.admin("--db", self.db, "fsck", "--namespace", "nonesuch")
        self.assertEqual(r.code, cli.EXIT_NOT_FOUND)

    async def test_no_good_copy(self) -> None:
        """
        A copy found bad twice leaves both bad versions in C{quarantine/};
        once every copy is bad, fsck counts the file as having no good copy,
        C{get} raises the non-retryable L{DataLost} (a L{ChecksumMismatch})
        and its URL answers 410, not the 503 of an outage.
        """
        a, b = await self.cluster(2, extra=("--scrub-rate=0",))
        client = DeferredClient("default", [a.address], retries=3, backoff=0.2)
        self.addCleanup(client.close)
        body = os.urandom(3000)
        await client.put("k", body)
        await client.put("fine", b"another file")
        url = await client.get_url("k")
        assert url is not None
        await eventually(lambda: self.healthy(self.db), what="every file on both servers")
        quarantine = os.path.join(a.data, "quarantine")
        damaged = []
        for damage in (b"first", b"second"):
            path = stored(a)[body]
            with open(path, "r+b") as f:
                f.write(damage)
            damaged.append(damage + body[len(damage) :])
            out = io.BytesIO()
            # A's copy fails its checksum; the retry is relayed from B's.
            self.assertTrue(await client.get("k", out))
            self.assertEqual(out.getvalue(), body)
            await eventually(lambda: self.healthy(self.db), what="A's copy made again")
        kept = sorted(os.listdir(quarantine))
        self.assertEqual(len(kept), 2, kept)
        self.assertEqual(kept[1], kept[0] + ".1")
        self.assertEqual(
            [open(os.path.join(quarantine, name), "rb").read() for name in kept], damaged
        )
        for server in (a, b):
            with open(stored(server)[body], "r+b") as f:
                f.write(b"third")
        r = await self.admin("--db", self.db, "fsck")
        self.assertEqual(r.code, cli.EXIT_NOT_FOUND, r.out)
        out_text = r.out.decode()
        self.assertIn("2 files, 4 copies: 2 good, 2 bad", out_text)
        self.assertIn("1 files short of copies, 1 with no good copy", out_text)
        self.assertIn("PROBLEM: default/k (file 1): no good copy left", out_text)
        with self.assertRaises(DataLost) as caught:
            await client.get("k", io.BytesIO())
        self.assertIsInstance(caught.exception, ChecksumMismatch)
        self.assertFalse(caught.exception.retryable)
        self.assertIn("no good copy of 'k' is left", str(caught.exception))
        with self.assertRaises(DataLost):
            await client.get_url("k")
        # Over HTTP, from either server.
        for server in (a, b):
            there = f"{server.http}/{url.split('/', 3)[3]}"
            status, headers = await deferToThread(http_status, there)
            self.assertEqual(status, 410, there)
            self.assertEqual(headers.get("x-koboldfs-error"), "DATA_LOST")
        # The next fsck finds it so from the metadata alone.
        r = await self.admin("--db", self.db, "fsck")
        self.assertIn("1 files short of copies, 1 with no good copy", r.out.decode())
        self.assertEqual(await client.get("fine", io.BytesIO()), True)

    async def test_replaced_disk(self) -> None:
        """
        A server back on an empty disk, after C{server forget-copies},
        copies back every file it held.
        """
        a, b = await self.cluster(2, extra=("--scrub-rate=0",))
        client = DeferredClient("default", [a.address])
        self.addCleanup(client.close)
        bodies = [os.urandom(2000 + i) for i in range(3)]
        for i, body in enumerate(bodies):
            await client.put(f"k{i}", body)
        await eventually(lambda: self.healthy(self.db), what="every file on both servers")
        await b.stop()
        shutil.rmtree(b.data)
        r = await self.admin("--db", self.db, "server", "forget-copies", "b")
        self.assertEqual(r.code, 0, r.err)
        self.assertIn("b: 3 copies marked quarantined", r.out.decode())
        r = await self.admin("--db", self.db, "status")
        self.assertIn("quarantined copies: 3", r.out.decode())
        self.assertEqual(r.code, cli.EXIT_NOT_FOUND)
        await b.start()
        await eventually(lambda: self.healthy(self.db), what="b's copies made again")
        self.assertEqual(sorted(stored(b)), sorted(bodies))
        r = await self.admin("--db", self.db, "server", "forget-copies", "nonesuch")
        self.assertEqual(r.code, cli.EXIT_NOT_FOUND)


def http_status(url: str) -> tuple[int, dict[str, str]]:
    """
    The status and headers of a GET of C{url}, whatever the status.
    """
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}


def stored(server: ServerProcess) -> dict[bytes, str]:
    """
    The paths of a server's stored files, by their contents.
    """
    found = {}
    for dirpath, _, names in os.walk(os.path.join(server.data, "files")):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                found[f.read()] = path
    return found
