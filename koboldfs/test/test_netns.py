"""
Tests of L{koboldfs.test.netns}, the multi-host harness, with real
processes in real network namespaces: that hosts talk over their own
addresses, that cuts and netem do to packets what they say, that nothing
is left behind, by a closed network or by a run that died; and a small
KoboldFS cluster spread over four hosts.

Traffic goes only to the 198.18.x.y addresses these networks assign.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import unittest

from twisted.trial.unittest import SynchronousTestCase, TestCase

from koboldfs.test import netns
from koboldfs.test.cluster import CHECKOUT, ClusterMixin
from koboldfs.test.netns import Network, NetworkMixin
from koboldfs.test.pgcluster import SKIP as PG_SKIP
from koboldfs.test.pgcluster import PostgresMixin, run
from koboldfs.test.support import eventually

PORT = 7000

#: A peer for the probes, run in a host: C{echo ADDR PORT} serves TCP
#: (says "listening", then echoes one message per connection);
#: C{call ADDR PORT TIMEOUT} connects, sends, reads the echo and prints
#: how long the connect and the whole exchange took (or the error);
#: C{sink ADDR PORT} counts UDP datagrams "x" until one says "end";
#: C{spray ADDR PORT N [WHAT]} sends N of them (or of WHAT); C{drain ADDR
#: PORT} reads one TCP stream to its end, then answers "done"; C{stream
#: ADDR PORT N} sends it N MiB and prints how many seconds that took.
PEER = r"""
import json, socket, sys, time
mode, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "echo":
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(16)
    print("listening", flush=True)
    while True:
        c, _ = s.accept()
        c.settimeout(10)
        try:
            c.sendall(c.recv(100))
        except OSError:
            pass
        c.close()
elif mode == "call":
    start = time.monotonic()
    try:
        c = socket.create_connection((addr, port), timeout=float(sys.argv[4]))
        connected = time.monotonic() - start
        c.sendall(b"ping")
        ok = c.recv(100) == b"ping"
        print(json.dumps({"ok": ok, "connect": connected, "total": time.monotonic() - start}))
    except OSError as e:
        print(json.dumps({"ok": False, "error": repr(e)}))
elif mode == "sink":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, port))
    print("listening", flush=True)
    s.settimeout(30)
    n = 0
    while s.recv(100) == b"x":
        n += 1
    print(n, flush=True)
elif mode == "spray":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    what = sys.argv[5].encode() if len(sys.argv) > 5 else b"x"
    for _ in range(int(sys.argv[4])):
        s.sendto(what, (addr, port))
        time.sleep(0.001)
elif mode == "drain":
    s = socket.socket()
    s.bind((addr, port))
    s.listen(1)
    print("listening", flush=True)
    c, _ = s.accept()
    while c.recv(1 << 20):
        pass
    c.sendall(b"done")
elif mode == "stream":
    start = time.monotonic()
    c = socket.create_connection((addr, port), timeout=60)
    chunk = b"x" * (1 << 20)
    for _ in range(int(sys.argv[4])):
        c.sendall(chunk)
    c.shutdown(socket.SHUT_WR)
    assert c.recv(10) == b"done"
    print(time.monotonic() - start)
"""


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def running(pid: int) -> bool:
    """
    Whether process C{pid} exists and is not a zombie (a killed orphan may
    wait a while for whoever adopted it to reap it).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def owned_by(pid: int) -> set[str]:
    """
    The namespaces whose names say process C{pid} made them: other runs
    on this machine make and remove theirs at the same time.
    """
    return {name for name in namespace_names() if name.startswith(f"{netns.PREFIX}-{pid}-")}


def namespace_names() -> set[str]:
    return {line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()}


def root_links() -> set[str]:
    return {line.split(":")[1].strip() for line in ip("-o", "link", "show").splitlines()}


def holders(inodes: set[tuple[int, int]]) -> list[int]:
    """
    The processes (or threads) still in any of these namespaces.
    """
    found = []
    for task in os.listdir("/proc"):
        if not task.isdigit():
            continue
        try:
            threads = os.listdir(f"/proc/{task}/task")
        except OSError:
            continue
        for thread in threads:
            try:
                st = os.stat(f"/proc/{task}/task/{thread}/ns/net")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in inodes:
                found.append(int(thread))
    return found


def inodes_of(network: Network) -> set[tuple[int, int]]:
    inodes = set()
    for name in network.namespaces:
        st = os.stat(os.path.join(netns.NETNS_DIR, name))
        inodes.add((st.st_dev, st.st_ino))
    return inodes


class PeersTestCase(NetworkMixin, SynchronousTestCase):
    """
    Probe processes in the hosts of a network.
    """

    def serve(self, host: netns.Host, mode: str) -> subprocess.Popen[str]:
        """
        A L{PEER} server on C{host}'s address, listening once this returns.
        """
        server = host.popen(
            [sys.executable, "-c", PEER, mode, host.address, str(PORT)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None
        self.assertEqual(server.stdout.readline().strip(), "listening")
        return server

    def echo(self, host: netns.Host) -> subprocess.Popen[str]:
        return self.serve(host, "echo")

    def call(self, src: netns.Host, dst: netns.Host, timeout: float = 2.0) -> dict:
        """
        One exchange from C{src} to C{dst}'s echo server.
        """
        done = src.run([sys.executable, "-c", PEER, "call", dst.address, str(PORT), str(timeout)])
        return json.loads(done.stdout)

    def assertReaches(self, src: netns.Host, dst: netns.Host) -> dict:
        result = self.call(src, dst)
        self.assertTrue(result["ok"], f"{src.label} cannot reach {dst.label}: {result}")
        return result

    def assertCutOff(self, src: netns.Host, dst: netns.Host) -> None:
        result = self.call(src, dst, timeout=1.0)
        self.assertFalse(result["ok"], f"{src.label} still reaches {dst.label}")
        # Dropped on the wire: the connect times out, nothing refuses it.
        self.assertIn("timed out", result["error"])


class NetworkTests(PeersTestCase):
    """
    Hosts, links and faults, with probe processes in the hosts.
    """

    def setUp(self) -> None:
        self.net = self.makeNetwork(["a", "b", "c"])
        self.a, self.b, self.c = self.net["a"], self.net["b"], self.net["c"]

    def test_addresses(self) -> None:
        """
        Each host has its loopback and one address of the network's own
        /24 of 198.18.0.0/15 on eth0, no route beyond that /24 (it can send
        to no other address), and no IPv6.
        """
        subnet = ipaddress.IPv4Network(self.net.subnet)
        self.assertTrue(subnet.subnet_of(netns.RANGE))
        self.assertEqual(len({host.address for host in self.net.hosts.values()}), 3)
        for host in self.net.hosts.values():
            self.assertIn(ipaddress.IPv4Address(host.address), subnet)
            addresses = {
                (line.split()[1], line.split()[3])
                for line in host.run(["ip", "-o", "addr", "show"]).stdout.splitlines()
            }
            self.assertEqual(addresses, {("lo", "127.0.0.1/8"), ("eth0", f"{host.address}/24")})
            routes = host.run(["ip", "-4", "route", "show"]).stdout.splitlines()
            self.assertEqual([route.split()[0] for route in routes], [self.net.subnet])
            no_v6 = host.run(["cat", "/proc/sys/net/ipv6/conf/all/disable_ipv6"]).stdout
            self.assertEqual(no_v6.strip(), "1")

    def test_tcp(self) -> None:
        """
        Processes in two hosts exchange TCP on their addresses, both ways.
        """
        self.echo(self.a)
        self.echo(self.b)
        self.assertReaches(self.a, self.b)
        self.assertReaches(self.b, self.a)

    def test_cut(self) -> None:
        """
        A cut stops traffic between two hosts in both directions, as a
        silent loss (connects time out), leaves their links to a third,
        and heal restores it.
        """
        for host in (self.a, self.b, self.c):
            self.echo(host)
        self.net.cut("a", "b")
        self.assertEqual(self.net.cuts(), {frozenset("ab")})
        self.assertCutOff(self.a, self.b)
        self.assertCutOff(self.b, self.a)
        self.assertReaches(self.a, self.c)
        self.assertReaches(self.c, self.b)
        self.net.heal("b", "a")
        self.assertEqual(self.net.cuts(), set())
        self.assertReaches(self.a, self.b)
        self.assertReaches(self.b, self.a)

    def test_isolate(self) -> None:
        """
        An isolated host reaches nobody and nobody reaches it, but it still
        reaches itself; rejoin undoes it.
        """
        for host in (self.a, self.b, self.c):
            self.echo(host)
        self.net.isolate(self.a)
        self.assertCutOff(self.a, self.b)
        self.assertCutOff(self.c, self.a)
        self.assertReaches(self.a, self.a)
        self.assertReaches(self.b, self.c)
        self.net.rejoin("a")
        self.assertReaches(self.a, self.b)
        self.assertReaches(self.c, self.a)

    def test_partition(self) -> None:
        """
        A partition splits the network in two halves that each still
        work; heal_all joins them again.
        """
        for host in (self.a, self.b, self.c):
            self.echo(host)
        self.net.partition(["a", "b"], ["c"])
        self.assertReaches(self.a, self.b)
        self.assertCutOff(self.a, self.c)
        self.assertCutOff(self.c, self.b)
        self.net.heal_all()
        self.assertReaches(self.c, self.a)
        self.assertReaches(self.b, self.c)

    def test_delay(self) -> None:
        """
        With netem's delay on one host, every round trip through it takes
        at least the delay (a connect waits for the SYN or its answer,
        whichever that host sends), in both directions; its talk to
        itself is not delayed; clear_netem makes it fast again.
        """
        self.echo(self.a)
        self.echo(self.b)
        fast = min(self.assertReaches(self.a, self.b)["connect"] for _ in range(3))
        self.net.netem(self.a, delay_ms=300)
        for src, dst in ((self.a, self.b), (self.b, self.a)):
            slow = self.assertReaches(src, dst)
            self.assertGreaterEqual(slow["connect"], 0.3, f"{src.label} to {dst.label}")
            # Connect, then request and answer: two round trips.
            self.assertGreaterEqual(slow["total"], 0.6, f"{src.label} to {dst.label}")
        self.assertLess(self.assertReaches(self.a, self.a)["connect"], 0.3)
        self.echo(self.c)
        self.assertLess(self.assertReaches(self.b, self.c)["connect"], 0.3)
        self.net.clear_netem(self.a)
        after = min(self.assertReaches(self.a, self.b)["connect"] for _ in range(3))
        self.assertLess(after, 0.3, f"still slow after clear_netem (before netem: {fast})")

    def test_delay_throughput(self) -> None:
        """
        A TCP stream behind a delay still moves: 16 MiB behind 50 ms in
        well under 10 s (a delay line that held packets in the sender's
        namespace throttled this to 0.3 MB/s: over 50 s).
        """
        self.net.netem(self.a, delay_ms=50)
        sink = self.serve(self.b, "drain")
        done = self.a.run([sys.executable, "-c", PEER, "stream", self.b.address, str(PORT), "16"])
        self.assertLess(float(done.stdout), 10.0)
        self.assertGreater(float(done.stdout), 0.05)
        sink.wait(10)

    def test_jitter(self) -> None:
        """
        With jitter, each round trip takes the delay give or take the
        jitter, never less.
        """
        self.echo(self.b)
        self.net.netem(self.a, delay_ms=200, jitter_ms=100, seed=7)
        for _ in range(3):
            self.assertGreaterEqual(self.assertReaches(self.a, self.b)["connect"], 0.1)

    def spray(self, n: int = 500) -> int:
        """
        How many of C{n} datagrams from a reach b.  The end is said from b
        to itself, which no netem of a's touches.
        """
        sink = self.serve(self.b, "sink")
        assert sink.stdout is not None
        self.a.run([sys.executable, "-c", PEER, "spray", self.b.address, str(PORT), str(n)])
        self.b.run([sys.executable, "-c", PEER, "spray", self.b.address, str(PORT), "1", "end"])
        count = int(sink.stdout.readline())
        sink.wait()
        return count

    def test_loss(self) -> None:
        """
        netem's loss drops that share of what a host sends: all of it at
        100%, about 30% at 30%, nothing without it.
        """
        self.assertEqual(self.spray(), 500)
        self.net.netem(self.a, loss_pct=30, seed=1)
        received = self.spray()
        # 500 tries at 70%: 350 expected, standard deviation about 10.
        self.assertTrue(290 <= received <= 410, received)
        self.net.netem(self.a, loss_pct=100)
        self.assertEqual(self.spray(), 0)
        self.echo(self.b)
        self.assertCutOff(self.a, self.b)
        self.net.clear_netem("a")
        self.assertReaches(self.a, self.b)

    def test_bad_arguments(self) -> None:
        """
        Impossible settings and unknown hosts are refused, and change
        nothing.
        """
        self.assertRaises(ValueError, self.net.netem, "a", loss_pct=101)
        self.assertRaises(ValueError, self.net.netem, "a", delay_ms=-1)
        self.assertRaises(KeyError, self.net.cut, "a", "nosuch")
        self.assertEqual(self.net.cuts(), set())


class LifecycleTests(PeersTestCase):
    """
    Networks leave nothing behind: not when closed, not when the test
    fails, not when their owner is killed; and concurrent owners never
    collide.
    """

    def setUp(self) -> None:
        netns.reap()
        self.namespaces = owned_by(os.getpid())
        self.links = root_links()

    def assertNothingLeft(self, network: Network, inodes: set[tuple[int, int]]) -> None:
        self.assertTrue(network.closed)
        self.assertFalse(set(network.namespaces) & namespace_names())
        self.assertEqual(owned_by(os.getpid()), self.namespaces)
        self.assertEqual(root_links(), self.links)
        # No process or thread holds them: the kernel frees the
        # namespaces, and with them their veths and the bridge.
        self.assertEqual(holders(inodes), [])
        self.assertFalse(os.path.exists(os.path.join(netns.STATE_DIR, str(network.index))))

    def test_close(self) -> None:
        """
        close() kills what runs in the hosts (a server, a delay line) and
        removes every namespace, veth and bridge it made: ip netns list
        and the links of the test's own namespace are as before.
        """
        network = Network(["a", "b"])
        self.addCleanup(network.close)
        self.assertEqual(root_links(), self.links)
        self.assertEqual(owned_by(os.getpid()), self.namespaces | set(network.namespaces))
        bridge = ip("-n", network.switch, "-o", "link", "show", "type", "bridge")
        self.assertIn("br0", bridge)
        inodes = inodes_of(network)
        server = self.echo(network["b"])
        network.cut("a", "b")
        network.netem("a", delay_ms=10)
        line = network._lines["a"]
        stray = subprocess.Popen([*network["a"].prefix, "sleep", "600"])
        network.close()
        self.assertIsNotNone(server.poll())
        self.assertIsNotNone(line.poll())
        self.assertEqual(stray.wait(5), -signal.SIGKILL)
        self.assertNothingLeft(network, inodes)
        network.close()

    def test_failure(self) -> None:
        """
        A test that fails inside C{with Network(...)} leaves nothing
        either.
        """
        with self.assertRaises(ZeroDivisionError):
            with Network(["a"]) as network:
                inodes = inodes_of(network)
                network["a"].popen(["sleep", "600"])
                raise ZeroDivisionError("a test failing")
        self.assertNothingLeft(network, inodes)

    def test_dead_owner(self) -> None:
        """
        The namespaces and processes of a network whose owner was killed
        are removed by the next network made, and only those: a live
        owner's network stays.
        """
        live = self.makeNetwork(["x"])
        script = (
            "import json, subprocess, sys\n"
            "from koboldfs.test.netns import Network\n"
            "net = Network(['x', 'y'])\n"
            "p = net['x'].popen(['sleep', '600'])\n"
            "print(json.dumps([net.namespaces, p.pid, net.index]), flush=True)\n"
            "sys.stdin.read()\n"
        )
        owner = subprocess.Popen(
            [sys.executable, "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": CHECKOUT},
            text=True,
        )
        assert owner.stdout is not None
        names, sleeper, index = json.loads(owner.stdout.readline())
        self.assertNotEqual(index, live.index)
        self.assertTrue(set(names) <= namespace_names())
        owner.kill()
        owner.wait()
        self.addCleanup(lambda: owner.stdin and owner.stdin.close())
        # Its namespaces and the process in them outlive it...
        self.assertTrue(set(names) <= namespace_names())
        os.kill(sleeper, 0)
        # ...until the next network is made.
        again = self.makeNetwork(["x"])
        self.assertFalse(set(names) & namespace_names())
        self.assertTrue(set(live.namespaces) <= namespace_names())
        self.assertFalse(running(sleeper))
        self.assertTrue(os.path.exists(os.path.join(netns.STATE_DIR, str(live.index))))
        self.assertEqual(netns.reap(), [])
        self.assertEqual(len({live.index, again.index}), 2)

    def test_concurrent_owners(self) -> None:
        """
        Networks made at once by several processes get distinct indices,
        so distinct names and subnets.
        """
        script = (
            "import json, sys\n"
            "from koboldfs.test.netns import Network\n"
            "with Network(['a', 'b']) as net:\n"
            "    print(json.dumps([net.index, net.subnet, net.namespaces]), flush=True)\n"
            "    sys.stdin.read()\n"
        )
        owners = [
            subprocess.Popen(
                [sys.executable, "-c", script],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": CHECKOUT},
                text=True,
            )
            for _ in range(4)
        ]
        seen = []
        for owner in owners:
            assert owner.stdout is not None and owner.stdin is not None
            seen.append(json.loads(owner.stdout.readline()))
        for owner in owners:
            assert owner.stdin is not None
            owner.stdin.close()
            self.assertEqual(owner.wait(30), 0)
        for position in range(3):
            values = [json.dumps(entry[position]) for entry in seen]
            self.assertEqual(len(set(values)), 4, values)
        made = {name for entry in seen for name in entry[2]}
        self.assertEqual(len(made), 4 * 3)
        self.assertFalse(made & namespace_names())

    def test_bad_labels(self) -> None:
        """
        Labels that repeat or could not be part of a name are refused
        before anything is made.
        """
        self.assertRaises(ValueError, Network, ["a", "a"])
        self.assertRaises(ValueError, Network, ["A/b"])
        self.assertRaises(ValueError, Network, [])
        self.assertEqual(owned_by(os.getpid()), self.namespaces)

    def test_refused(self) -> None:
        """
        Where the kernel refuses namespaces (here: root of a user
        namespace, without the real root's capabilities), Network skips
        the test and says why, and leaves nothing behind.
        """
        done = subprocess.run(
            [
                "unshare",
                "--user",
                "--map-root-user",
                sys.executable,
                "-c",
                "import os, unittest\n"
                "from koboldfs.test.netns import Network\n"
                "print(os.getpid())\n"
                "try:\n"
                "    Network(['a'])\n"
                "except unittest.SkipTest as e:\n"
                "    print('skipped:', e)\n",
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": CHECKOUT},
        )
        self.assertIn("skipped: the kernel refuses network namespaces", done.stdout, done.stderr)
        self.assertIn("Operation not permitted", done.stdout)
        self.assertEqual(owned_by(int(done.stdout.split()[0])), set())

    def test_not_root(self) -> None:
        """
        Without root, Network skips at once, saying root is needed.
        """
        self.patch(os, "geteuid", lambda: 1000)
        with self.assertRaises(unittest.SkipTest) as raised:
            Network(["a"])
        self.assertIn("need root", str(raised.exception))


#: Run in host c1: put a file through one server (unless that is "-"),
#: read it back through another, print what happened as JSON.
CLIENT = r"""
import io, json, sys, time
from koboldfs import Client
put_to, get_from, key, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
body = bytes(range(256)) * (size // 256)
result = {}
if put_to != "-":
    start = time.monotonic()
    with Client("netns", servers=[put_to], timeout=30) as client:
        result["put"] = client.put(key, body)
    result["put_seconds"] = time.monotonic() - start
with Client("netns", servers=[get_from], timeout=30, retries=5) as client:
    out = io.BytesIO()
    result["get"] = client.get(key, out)
    result["same"] = out.getvalue() == body
    stat = client.stat(key)
    result["servers"] = sorted(stat.servers) if stat else None
print(json.dumps(result, default=str))
"""


class ClusterTests(NetworkMixin, PostgresMixin, ClusterMixin, TestCase):
    """
    A small cluster on four machines: PostgreSQL in C{db}, servers in
    C{s1} and C{s2}, a client in C{c1}.
    """

    timeout = 180

    if PG_SKIP:
        skip = PG_SKIP

    async def client(self, put_to: str, get_from: str, key: str, size: int = 1 << 20) -> dict:
        code, output = await run(
            [
                *self.net["c1"].prefix,
                "env",
                f"PYTHONPATH={CHECKOUT}",
                sys.executable,
                "-c",
                CLIENT,
                put_to,
                get_from,
                key,
                str(size),
            ],
            check=False,
        )
        self.assertEqual(code, 0, output)
        return json.loads(output.strip().splitlines()[-1])

    async def test_cluster(self) -> None:
        """
        A file put to s1 reads back through s2; with s2 cut off from s1
        (both still reaching the database) a put to s1 still succeeds,
        and reads back through s1; healed, it reads back through s2.
        """
        self.net = self.makeNetwork(["db", "s1", "s2", "c1"])
        postgres = await self.throwawayCluster(netns=self.net["db"])
        self.assertEqual(postgres.interface, self.net["db"].address)
        await postgres.query('CREATE DATABASE "koboldfs"')
        db = postgres.url("koboldfs")
        options = ("--auth=open", "--peer-timeout=5")
        s1 = await self.startServer("s1", db=db, netns=self.net["s1"], extra=options)
        s2 = await self.startServer("s2", db=db, netns=self.net["s2"], extra=options)
        self.assertEqual((s1.host, s2.host), ("s1", "s2"))
        self.assertTrue(s1.address.startswith(self.net["s1"].address + ":"))
        expected = [("s1", "s1", s1.address), ("s2", "s2", s2.address)]

        async def registered() -> bool:
            rows = await postgres.query(
                "SELECT name, host, address FROM servers ORDER BY name", "koboldfs"
            )
            return [tuple(row) for row in rows] == expected

        # Each registers itself, on its own address, through the network.
        await eventually(registered, what=f"servers registered as {expected}")

        first = await self.client(s1.address, s2.address, "first")
        self.assertEqual((first["put"], first["get"], first["same"]), (True, True, True), first)

        self.net.cut("s1", "s2")
        cut = await self.client(s1.address, s1.address, "during-cut")
        self.assertEqual((cut["put"], cut["get"], cut["same"]), (True, True, True), cut)
        # The second copy could not be made: the put was acknowledged with
        # s1's alone, as the best-effort default promises.
        self.assertEqual(cut["servers"], ["s1"], cut)

        self.net.heal("s1", "s2")
        healed = await self.client("-", s2.address, "during-cut")
        self.assertEqual((healed["get"], healed["same"]), (True, True), healed)
