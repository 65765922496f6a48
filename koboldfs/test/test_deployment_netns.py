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
import shutil
import sys
from dataclasses import dataclass
from functools import partial
from string import Template

from twisted.internet import defer, reactor, utils
from twisted.trial.unittest import TestCase

from koboldfs.test.cluster import CHECKOUT, ClusterMixin, ServerProcess
from koboldfs.test.netns import Host, NetworkMixin
from koboldfs.test.pgcluster import SKIP as PG_SKIP
from koboldfs.test.pgcluster import PostgresMixin
from koboldfs.test.pgcluster import run as pg_run
from koboldfs.test.support import eventually

#: What the operator fetches a URL with: urllib, trusting only the CA.
FETCH = """
import hashlib, ssl, sys, urllib.request
context = ssl.create_default_context(cafile=sys.argv[2])
with urllib.request.urlopen(sys.argv[1], context=context, timeout=20) as response:
    print(response.status, hashlib.sha256(response.read()).hexdigest())
"""


#: The guide whose marked blocks this test runs.
GUIDE = os.path.join(CHECKOUT, "docs", "deployment.md")


def guide_block(name: str) -> str:
    """
    The code block of docs/deployment.md marked C{<!-- deployment-test:
    NAME -->}.
    """
    with open(GUIDE) as f:
        text = f.read()
    marker = f"<!-- deployment-test: {name} -->\n```"
    start = text.index(marker) + len(marker)
    start = text.index("\n", start) + 1
    return text[start : text.index("```", start)]


class ConfiguredServer(ServerProcess):
    """
    A server whose options are all in its ini file, as under systemd (the
    heartbeat and replication made quicker for the test), on the ports
    the guide uses: each machine has its own.
    """

    def __init__(self, base: str, name: str, netns: Host, ini: str) -> None:
        super().__init__(base, name, netns=netns)
        self.port, self.http_port = 9876, 9877
        self.address = f"{self.interface}:{self.port}"
        self.http = f"https://{self.interface}:{self.http_port}"
        self.ini = ini

    def listening(self) -> bool:
        """
        Whether its binary and HTTP ports accept connections: the guide's
        configuration has no S3 front end.
        """
        assert self.netns is not None
        try:
            for port in (self.port, self.http_port):
                self.netns.connect((self.interface, port), timeout=0.5).close()
        except OSError:
            return False
        return True

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            f"--logfile={self.log}",
            "koboldfs",
            f"--config={self.ini}",
            "--heartbeat=1",
            "--down-after=5",
            "--replicate-interval=1",
        ]


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
        return await self.run_on(self.op, "koboldfs", *argv, stdin=stdin)

    def logged(self, server: ServerProcess, text: str) -> bool:
        return text in server.tail()

    def stop(self, server: ServerProcess) -> defer.Deferred[int | None]:
        return defer.ensureDeferred(server.stop())

    async def shell(self, script: str, cwd: str, **env: str) -> None:
        """
        Run a block of the guide with C{sh -e}, here (not in a machine).
        """
        code, out = await pg_run(
            ["env", *(f"{k}={v}" for k, v in env.items()), "sh", "-e", "-c", script],
            cwd=cwd,
            check=False,
        )
        self.assertEqual(code, 0, f"{script}\n{out}")

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
            # The koboldfs command beside this Python (the venv's).
            "PATH": os.path.dirname(sys.executable) + ":" + os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": self.home,
            "PYTHONPATH": CHECKOUT,
        }

        # 1. PostgreSQL, on its own machine.
        postgres = await self.throwawayCluster(netns=net["db"])
        await postgres.query('CREATE DATABASE "koboldfs"')
        db = postgres.url("koboldfs")

        # 2. The cluster secret and the TLS certificates, one per machine,
        # each naming the address it is reached at: the guide's commands.
        await self.shell(guide_block("secret"), base)
        await self.shell(guide_block("ca"), base)
        secret, ca = os.path.join(base, "cluster-secret"), os.path.join(base, "ca.pem")
        self.assertEqual(os.stat(secret).st_mode & 0o777, 0o600)

        # 3. Three servers, each configured as the guide says, on its
        # machine's address: TLS for clients, HTTP and peers; no auth
        # setting, so keys are required.
        servers = []
        for name in ("s1", "s2", "s3"):
            host = net[name]
            await self.shell(guide_block("server-cert"), base, NAME=name, ADDR=host.address)
            etc = os.path.join(base, name, "etc")
            os.makedirs(etc)
            for source, target in ((f"{name}.pem", "server.pem"), ("ca.pem", "ca.pem")):
                shutil.copy(os.path.join(base, source), os.path.join(etc, target))
            shutil.copy(secret, os.path.join(etc, "cluster-secret"))
            ini = os.path.join(etc, "koboldfs.ini")
            text = Template(guide_block("server-ini")).substitute(
                NAME=name, ADDR=host.address, DB=db
            )
            with open(ini, "w") as f:
                f.write(
                    text.replace("/etc/koboldfs", etc).replace(
                        "/srv/koboldfs", os.path.join(base, name)
                    )
                )
            servers.append(ConfiguredServer(base, name, host, ini))
        for server in servers:
            self.addCleanup(self.stop, server)
            await server.start()
        addresses = ", ".join(s.address for s in servers)
        for server in servers:
            await eventually(
                partial(self.logged, server, "keys required"),
                what=f"{server.name} started, requiring keys",
            )

        # 4. The operator: a key, then a client config file that holds
        # what every command needs.
        async def registered() -> bool:
            ran = await self.koboldfs("admin", "servers", "--db", db)
            return ran.code == 0 and ran.out.count(" alive ") == 3

        await eventually(registered, timeout=60, what="three servers registered and alive")
        config = os.path.join(self.home, ".config", "koboldfs")
        create = f"koboldfs admin key create demo --db '{db}' > ~/.config/koboldfs/demo.key"
        ran = await self.run_on(self.op, "sh", "-c", create)
        self.assertEqual(ran.code, 0, ran.err)
        self.assertIn("not shown again", ran.err)
        with open(os.path.join(config, "demo.key")) as f:
            key = f.read().strip()
        with open(os.path.join(config, "client.ini"), "w") as f:
            f.write(
                Template(guide_block("client-ini")).substitute(
                    SERVERS=addresses, CA=ca, SECRET=secret
                )
            )
        listed = await self.ok("admin", "key", "list", "--db", db)
        key_id = key.split(".")[1]
        self.assertIn(key_id, listed)
        self.assertNotIn(key.split(".")[2], listed)
        pinged = await self.ok("ping")
        self.assertEqual(pinged.count("answered in"), 3, pinged)

        # 5. Files in and out, from the workstation.
        body = os.urandom(3 << 20) + b"end"
        with open(os.path.join(self.home, "cat.jpg"), "wb") as original:
            original.write(body)
        await self.ok("put", "notes.txt", "-", stdin=b"hello from the operator\n")
        await self.ok("put", "photos/cat.jpg", "cat.jpg")
        got = await self.koboldfs("cat", "photos/cat.jpg")
        self.assertEqual(got.code, 0, got.err)
        copy = os.path.join(self.home, "copy.jpg")
        await self.ok("get", "photos/cat.jpg", copy)
        with open(copy, "rb") as copied:
            self.assertEqual(copied.read(), body)
        self.assertEqual((await self.ok("ls")).split(), ["notes.txt", "photos/cat.jpg"])
        self.assertEqual((await self.ok("ls", "photos/")).split(), ["photos/cat.jpg"])
        stat = await self.ok("stat", "photos/cat.jpg")
        self.assertIn(f"size:      {len(body)}", stat)
        url = (await self.ok("url", "photos/cat.jpg")).strip()
        self.assertTrue(url.startswith("https://"), url)
        fetched = await self.run_on(self.op, sys.executable, "-c", FETCH, url, ca)
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
        fsck = await self.ok("admin", "fsck", "--db", db)
        self.assertIn("2 files, 6 copies: 6 good, 0 bad, 0 not checked", fsck)

        await self.ok("rm", "notes.txt")
        self.assertEqual((await self.ok("ls")).split(), ["photos/cat.jpg"])
        self.assertEqual((await self.koboldfs("stat", "notes.txt")).code, 1)

        # 7. The key revoked: refused, and said so.
        await self.ok("admin", "key", "revoke", "demo", key_id, "--db", db)
        refused = await self.koboldfs("ls")
        self.assertEqual(refused.code, 3, refused.out)
        self.assertIn("refused the key", refused.err)
        self.assertIn("wrong, revoked", refused.err)
