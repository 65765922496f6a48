"""
A deployment as docs/deployment.md makes it, on machines of their own:
PostgreSQL on one, three servers on three others (each its own --host,
listening on its machine's address, so --auth=auto requires keys), TLS
everywhere with a CA made by the test, and an operator's workstation
running the C{koboldfs} command with a key it made with C{koboldfs admin
key create} and a client config file.

The machines are network namespaces (koboldfs.test.netns, docs/testing.md)
with addresses from 198.18.0.0/15 that the test assigns and removes; the
test is skipped only where the kernel refuses namespaces (or PostgreSQL
is missing), saying why.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sys
from dataclasses import dataclass
from functools import partial

from twisted.internet import defer, reactor, utils
from twisted.trial.unittest import TestCase

from koboldfs.test.certs import TestCA
from koboldfs.test.cluster import CHECKOUT, ClusterMixin, ServerProcess
from koboldfs.test.netns import Host, NetworkMixin
from koboldfs.test.pgcluster import SKIP as PG_SKIP
from koboldfs.test.pgcluster import PostgresMixin
from koboldfs.test.support import eventually

#: What the operator fetches a URL with: urllib, trusting only the CA.
FETCH = """
import hashlib, ssl, sys, urllib.request
context = ssl.create_default_context(cafile=sys.argv[2])
with urllib.request.urlopen(sys.argv[1], context=context, timeout=20) as response:
    print(response.status, hashlib.sha256(response.read()).hexdigest())
"""


@dataclass
class Ran:
    code: int
    out: str
    err: str


class DeploymentTests(NetworkMixin, PostgresMixin, ClusterMixin, TestCase):
    """
    Three servers and PostgreSQL on four machines, run from a fifth.
    """

    timeout = 300

    if PG_SKIP:
        skip = PG_SKIP

    async def run_on(self, host: Host, *argv: str, stdin: bytes = b"") -> Ran:
        """
        Run C{argv} on C{host} as the operator, without blocking the
        reactor; stdout and stderr apart.
        """
        if stdin:
            path = os.path.join(self.home, "stdin")
            with open(path, "wb") as f:
                f.write(stdin)
            argv = ("sh", "-c", '"$@" < ' + path, "sh", *argv)
        full = [*host.prefix, *argv]
        out, err, code = await utils.getProcessOutputAndValue(
            full[0], full[1:], env=self.env, path=self.home, reactor=reactor
        )
        return Ran(code, out.decode(errors="replace"), err.decode(errors="replace"))

    async def koboldfs(self, *argv: str, stdin: bytes = b"") -> Ran:
        """
        The C{koboldfs} command (this checkout's) on the operator's machine.
        """
        return await self.run_on(
            self.op, sys.executable, "-m", "koboldfs.cli", *argv, stdin=stdin
        )

    def logged(self, server: ServerProcess, text: str) -> bool:
        return text in server.tail()

    def stop(self, server: ServerProcess) -> defer.Deferred[int | None]:
        return defer.ensureDeferred(server.stop())

    async def ok(self, *argv: str, stdin: bytes = b"") -> str:
        ran = await self.koboldfs(*argv, stdin=stdin)
        self.assertEqual(ran.code, 0, f"koboldfs {' '.join(argv)}:\n{ran.out}\n{ran.err}")
        return ran.out

    async def test_deployment(self) -> None:
        """
        The steps of docs/deployment.md, and what an operator then does:
        put, get, ls, stat, url (fetched over HTTPS), rm, admin status and
        servers through a server, fsck as a peer, a key revoked and refused.
        """
        net = self.makeNetwork(["db", "s1", "s2", "s3", "op"])
        self.op = net["op"]
        base = os.path.abspath(self.mktemp())
        self.home = os.path.join(base, "operator")
        os.makedirs(os.path.join(self.home, ".config", "koboldfs"))
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": self.home,
            "PYTHONPATH": CHECKOUT,
        }

        # 1. PostgreSQL, on its own machine.
        postgres = await self.throwawayCluster(netns=net["db"])
        await postgres.query('CREATE DATABASE "koboldfs"')
        db = postgres.url("koboldfs")

        # 2. The cluster secret and the TLS certificates, one per machine,
        # each naming the address it is reached at.
        secret = os.path.join(base, "cluster-secret")
        with open(secret, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        os.chmod(secret, 0o600)
        ca = TestCA(os.path.join(base, "ca"))

        # 3. Three servers, each on its machine's address, TLS for clients,
        # HTTP and peers; no --auth: auto, so keys are required.
        servers = []
        for name in ("s1", "s2", "s3"):
            host = net[name]
            server = ServerProcess(base, name, db=db, netns=host)
            pem = ca.server_pem(host.address)
            tls = f"privateKey={pem}:interface={host.address}"
            server.extra = (
                f"--listen=ssl:{server.port}:{tls}",
                f"--http=ssl:{server.http_port}:{tls}",
                f"--secret-file={secret}",
                f"--tls-ca={ca.ca}",
                "--replicate-interval=1",
            )
            servers.append(server)
        for server in servers:
            self.addCleanup(self.stop, server)
            await server.start()
        addresses = ",".join(s.address for s in servers)
        for server in servers:
            await eventually(
                partial(self.logged, server, "keys required"),
                what=f"{server.name} started, requiring keys",
            )

        # 4. The operator: a key, then a client config file that holds
        # what every command needs.
        async def registered() -> bool:
            ran = await self.koboldfs("admin", "--db", db, "servers")
            return ran.code == 0 and ran.out.count(" alive ") == 3

        await eventually(registered, timeout=60, what="three servers registered and alive")
        ran = await self.koboldfs("admin", "--db", db, "key", "create", "demo")
        self.assertEqual(ran.code, 0, ran.err)
        self.assertIn("not shown again", ran.err)
        key = ran.out.strip()
        key_file = os.path.join(self.home, ".config", "koboldfs", "demo.key")
        with open(key_file, "w") as f:
            f.write(key + "\n")
        with open(os.path.join(self.home, ".config", "koboldfs", "client.ini"), "w") as f:
            f.write(
                "[koboldfs]\n"
                f"servers = {addresses}\n"
                "namespace = demo\n"
                "key_file = demo.key\n"
                f"ca = {ca.ca}\n"
                f"secret_file = {secret}\n"
            )
        listed = await self.ok("admin", "--db", db, "key", "list")
        key_id = key.split(".")[1]
        self.assertIn(key_id, listed)
        self.assertNotIn(key.split(".")[2], listed)

        # 5. Files in and out, from the workstation.
        body = os.urandom(3 << 20) + b"end"
        await self.ok("put", "photos/cat.jpg", "-", stdin=body)
        await self.ok("put", "notes.txt", "-", stdin=b"hello from the operator\n")
        got = await self.koboldfs("cat", "photos/cat.jpg")
        self.assertEqual(got.code, 0, got.err)
        copy = os.path.join(self.home, "cat.jpg")
        await self.ok("get", "photos/cat.jpg", copy)
        with open(copy, "rb") as copied:
            self.assertEqual(copied.read(), body)
        self.assertEqual((await self.ok("ls")).split(), ["notes.txt", "photos/cat.jpg"])
        self.assertEqual((await self.ok("ls", "photos/")).split(), ["photos/cat.jpg"])
        stat = await self.ok("stat", "photos/cat.jpg")
        self.assertIn(f"size:      {len(body)}", stat)
        url = (await self.ok("url", "photos/cat.jpg")).strip()
        self.assertTrue(url.startswith("https://"), url)
        fetched = await self.run_on(self.op, sys.executable, "-c", FETCH, url, ca.ca)
        self.assertEqual(fetched.code, 0, fetched.err)
        self.assertEqual(fetched.out.split(), ["200", hashlib.sha256(body).hexdigest()])

        # 6. Health, through a server (no database named: the config
        # file's servers and cluster secret), and fsck as a peer.
        async def healthy() -> bool:
            ran = await self.koboldfs("admin", "status")
            return ran.code == 0 and ran.out.endswith("OK\n")

        await eventually(healthy, timeout=60, what="admin status OK through a server")
        status = await self.ok("admin", "status")
        self.assertIn("servers: 3 (3 alive)", status)
        self.assertIn("files: 2 (", status)
        self.assertIn("  s1: scrub: ", status)  # its status page, over HTTPS
        self.assertIn(servers[0].address, await self.ok("admin", "servers"))
        fsck = await self.ok("admin", "--db", db, "fsck")
        self.assertIn("2 files, 6 copies: 6 good, 0 bad, 0 not checked", fsck)

        await self.ok("rm", "notes.txt")
        self.assertEqual((await self.ok("ls")).split(), ["photos/cat.jpg"])
        self.assertEqual((await self.koboldfs("stat", "notes.txt")).code, 1)

        # 7. The key revoked: refused, and said so.
        await self.ok("admin", "--db", db, "key", "revoke", "demo", key_id)
        refused = await self.koboldfs("ls")
        self.assertEqual(refused.code, 3, refused.out)
        self.assertIn("refused the key", refused.err)
        self.assertIn("wrong, revoked", refused.err)
