"""
Machines for multi-host tests: Linux network namespaces joined by a switch.

A L{Network} is a set of named hosts, each a network namespace with its
loopback up and one address from 198.18.0.0/15 (the range set aside for
network tests) on its C{eth0}, a veth whose other end is a port of a
bridge in a namespace of its own (the switch).  Nothing is made in, and no
packet goes through, the namespace the tests run in: a host can reach the
other hosts of its network and itself, and no other address.

Faults are made where a network makes them, in the switch (iptables in
its namespace, which sees what the bridge forwards), never in the hosts:

    - L{Network.cut}, L{Network.isolate}, L{Network.partition}: the switch
      drops every packet between the hosts cut from each other, both ways:
      no error, no reset, a connection just stops.
    - L{Network.netem}: what a host sends waits, or is lost, in a delay
      line (NFQUEUE to a small process in the switch, L{delay_line}): this
      kernel has no C{netem} qdisc, nor the C{tc} drop action.

Leftovers of a run that died are removed by the next one: namespace names
carry the owner's pid and the network's index (C{kfs-PID-INDEX-LABEL}),
and a lease file per index (C{/run/koboldfs-netns/INDEX}, holding the
owner's pid and start time) says which networks are alive.  Leases are
taken, and the dead ones' namespaces reaped, under an C{flock}, so
networks of concurrent runs (trial -j2, other checkouts) never share an
index, hence never a name or a subnet.

Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN), C{ip} (iproute2) and, for
cuts and netem, C{iptables} (.ci/run installs both); a kernel that
refuses namespaces makes L{Network} raise C{SkipTest}.

This module imports no Twisted: it runs as the delay line's process too
(C{python netns.py delay-line ...}), and its calls are short blocking
commands, fine in a trial test.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import ipaddress
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import unittest
from collections import deque
from typing import IO, Any, Callable, Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")

#: The addresses the networks take their subnets from.
RANGE = ipaddress.IPv4Network("198.18.0.0/15")
#: Each network has one /24 of RANGE: 512 networks at once, 254 hosts each.
SUBNETS = list(RANGE.subnets(new_prefix=24))
#: Namespace names start with this.
PREFIX = "kfs"
#: Leases and their lock.
STATE_DIR = "/run/koboldfs-netns"
NETNS_DIR = "/run/netns"

_NAME = re.compile(rf"^{PREFIX}-(\d+)-(\d+)(?:-|$)")
_LABEL = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

#: The chains this module adds to the switch's filter table.
CUT_CHAIN = "kfs-cut"
NETEM_CHAIN = "kfs-netem"


class NetnsError(RuntimeError):
    """
    A command setting up or changing a network failed; the message holds
    its output.
    """


def _command(
    argv: Sequence[str], input: str | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """
    Run a setup command to completion; raise L{NetnsError} if it fails.
    """
    try:
        done = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=timeout
        )
    except FileNotFoundError:
        raise NetnsError(
            f"{argv[0]} not found: install Debian's iproute2 and iptables (.ci/run does)"
        ) from None
    if done.returncode != 0:
        raise NetnsError(
            f"{' '.join(argv)} exited with {done.returncode}:\n{done.stdout}{done.stderr}"
            + (f"\ninput:\n{input}" if input else "")
        )
    return done


def in_namespace(name: str, f: Callable[[], T]) -> T:
    """
    Call C{f} in a thread that has joined network namespace C{name}, and
    return what it returns.  Sockets it makes stay in that namespace; the
    thread ends with the call, so no other code runs in the namespace (and
    the namespace's processes, listed by their main thread, never include
    ours).
    """
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {name}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(f())
        except BaseException as e:
            error.append(e)

    thread = threading.Thread(target=run, name=f"netns {name}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def _write_sysctls(values: dict[str, str]) -> None:
    for path, value in values.items():
        with contextlib.suppress(FileNotFoundError):  # a kernel without IPv6
            with open(path, "w") as f:
                f.write(value)


#: Set in every namespace before its interfaces exist: no IPv6 at all, so
#: nothing sends router solicitations or multicast listener reports, and no
#: link-local address offers a way around the IPv4 filters.
SYSCTLS = {
    "/proc/sys/net/ipv6/conf/all/disable_ipv6": "1",
    "/proc/sys/net/ipv6/conf/default/disable_ipv6": "1",
}


def _bridge_to_iptables() -> None:
    """
    Make this namespace's bridges hand the IPv4 packets they forward to
    iptables (br_netfilter), where the cuts and delay lines are.
    """
    path = "/proc/sys/net/bridge/bridge-nf-call-iptables"
    try:
        with open(path, "w") as f:
            f.write("1")
    except FileNotFoundError:
        raise NetnsError(
            f"no {path}: the kernel needs br_netfilter (modprobe br_netfilter)"
        ) from None


# -- leases: which networks are alive ---------------------------------------------


def _start_time(pid: int) -> str | None:
    """
    When process C{pid} started (clock ticks since boot), or None if there
    is no such process: with the pid, an identity that a reused pid lacks.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # Fields after the command name, which is in parentheses and may hold anything.
    return stat.rpartition(")")[2].split()[19]


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """
    Hold the lock of the lease directory: one process at a time takes a
    lease, makes its namespaces or reaps another's.
    """
    os.makedirs(STATE_DIR, mode=0o755, exist_ok=True)
    fd = os.open(os.path.join(STATE_DIR, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _leases() -> dict[int, tuple[int, str]]:
    """
    Every lease: its index, and its owner's pid and start time.
    """
    leases = {}
    for entry in os.listdir(STATE_DIR):
        if not entry.isdigit():
            continue
        try:
            with open(os.path.join(STATE_DIR, entry)) as f:
                pid, started = f.read().split()
            leases[int(entry)] = (int(pid), started)
        except (OSError, ValueError):
            leases[int(entry)] = (0, "")  # unreadable: nobody's
    return leases


def _namespace_inode(name: str) -> tuple[int, int] | None:
    try:
        st = os.stat(os.path.join(NETNS_DIR, name))
    except OSError:
        return None
    return st.st_dev, st.st_ino


def processes_in(name: str) -> list[int]:
    """
    The processes whose main thread is in namespace C{name} (what
    C{ip netns pids} lists), never this one.
    """
    inode = _namespace_inode(name)
    if inode is None:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:  # gone, or a zombie
            continue
        if (st.st_dev, st.st_ino) == inode:
            pids.append(int(entry))
    return pids


def _kill_all_in(names: Iterable[str], timeout: float = 10.0) -> None:
    """
    SIGKILL every process in namespaces C{names}, and wait until none is
    left (a zombie has left its namespace already).
    """
    names = list(names)
    deadline = time.monotonic() + timeout
    while True:
        pids = [pid for name in names for pid in processes_in(name)]
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)


def _delete_namespaces(names: Iterable[str]) -> None:
    """
    Kill what runs in namespaces C{names} and delete them, with the veths
    and bridges in them (the kernel frees a namespace, and destroys its
    interfaces, once nothing holds it).
    """
    names = [name for name in names if _namespace_inode(name) is not None]
    if not names:
        return
    _kill_all_in(names)
    _command(["ip", "-force", "-batch", "-"], input="".join(f"netns del {n}\n" for n in names))


def _our_namespaces() -> list[str]:
    try:
        return sorted(entry for entry in os.listdir(NETNS_DIR) if _NAME.match(entry))
    except FileNotFoundError:
        return []


def _reap_locked() -> list[str]:
    leases = _leases()
    alive = {
        index: pid
        for index, (pid, started) in leases.items()
        if pid > 0 and _start_time(pid) == started
    }
    dead = []
    for name in _our_namespaces():
        match = _NAME.match(name)
        assert match is not None
        pid, index = int(match.group(1)), int(match.group(2))
        if alive.get(index) != pid:
            dead.append(name)
    _delete_namespaces(dead)
    for index in leases.keys() - alive.keys():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(STATE_DIR, str(index)))
    return dead


def reap() -> list[str]:
    """
    Remove the namespaces (and their processes) and leases of networks
    whose owner is dead; return the names of the namespaces removed.  Every
    new L{Network} does this first.
    """
    if not os.path.isdir(STATE_DIR) and not _our_namespaces():
        return []
    with _locked():
        return _reap_locked()


def _skip_unless_possible() -> None:
    """
    Raise C{SkipTest} where namespaces cannot be made at all.
    """
    if os.geteuid() != 0:
        raise unittest.SkipTest(
            "network namespaces need root (CAP_SYS_ADMIN and CAP_NET_ADMIN); "
            "run as root, as CI does"
        )
    if shutil.which("ip") is None:
        raise NetnsError("ip not found: install Debian's iproute2 (.ci/run does)")


# -- the network -------------------------------------------------------------------


class Host:
    """
    One machine of a L{Network}: a network namespace with one address.

    @ivar label: its short name in the test (C{"s1"}).
    @ivar name: its namespace's name.
    @ivar address: its IPv4 address, as a string.
    @ivar network: the network it is on.
    @ivar port: its veth's end in the switch (C{pN}).
    @ivar queue: the NFQUEUE number of its delay line in the switch.
    """

    def __init__(self, network: Network, label: str, name: str, address: str, index: int) -> None:
        self.network = network
        self.label = label
        self.name = name
        self.address = address
        self.port = f"p{index}"
        self.queue = index

    def __repr__(self) -> str:
        return f"<Host {self.label} {self.address} ({self.name})>"

    @property
    def prefix(self) -> list[str]:
        """
        What to put before an argv to run it in this host: the process
        (and its children) stay in the namespace, with our environment.
        """
        return ["ip", "netns", "exec", self.name]

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 60.0, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """
        Run C{argv} in this host to completion; its output as text.

        @raise subprocess.CalledProcessError: C{check} is set and it failed.
        """
        kwargs.setdefault("capture_output", True)
        return subprocess.run(
            [*self.prefix, *argv], check=check, timeout=timeout, text=True, **kwargs
        )

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """
        Start C{argv} in this host; L{Network.close} kills and reaps it, if
        it still runs then.
        """
        process = subprocess.Popen([*self.prefix, *argv], **kwargs)
        self.network._started.append(process)
        return process

    def connect(self, address: tuple[str, int], timeout: float | None = None) -> socket.socket:
        """
        C{socket.create_connection} from this host: for probes from the
        test process (the socket is this host's, whichever thread uses it).
        """
        return in_namespace(self.name, lambda: socket.create_connection(address, timeout))


class Network:
    """
    Hosts joined by one switch; see the module docstring.  Use it as a
    context manager, or hand L{close} to C{addCleanup} right after making
    it (before the servers in it, so that their clean stops run first).

    @ivar hosts: label to L{Host}, in the order given.
    @ivar subnet: its /24, e.g. C{"198.18.3.0/24"}: what a server in it
        may trust (PostgreSQL's pg_hba).
    """

    def __init__(self, labels: Iterable[str]) -> None:
        labels = list(labels)
        if len(set(labels)) != len(labels):
            raise ValueError(f"host labels repeat: {labels}")
        if not 0 < len(labels) < 255:
            raise ValueError(f"a network has 1 to 254 hosts, not {len(labels)}")
        for label in labels:
            if not _LABEL.match(label):
                raise ValueError(f"host label {label!r} is not [a-z][a-z0-9-]*, 32 at most")
        _skip_unless_possible()
        self.hosts: dict[str, Host] = {}
        self._started: list[subprocess.Popen[Any]] = []
        self._lines: dict[str, subprocess.Popen[str]] = {}
        self._hooked = False
        self._cuts: set[frozenset[str]] = set()
        self.index: int | None = None
        self.closed = False
        try:
            with _locked():
                _reap_locked()
                self._lease()
                self._create(labels)
        except BaseException:
            self.close()
            raise

    # -- making it

    def _lease(self) -> None:
        taken = _leases()
        free = [i for i in range(len(SUBNETS)) if i not in taken]
        if not free:
            raise NetnsError(f"all {len(SUBNETS)} test subnets are leased: see {STATE_DIR}")
        self.index = free[0]
        with open(os.path.join(STATE_DIR, str(self.index)), "w") as f:
            f.write(f"{os.getpid()} {_start_time(os.getpid())}\n")
        self.subnet = str(SUBNETS[self.index])
        self.switch = f"{PREFIX}-{os.getpid()}-{self.index}"

    def _create(self, labels: list[str]) -> None:
        net = ipaddress.IPv4Network(self.subnet)
        for i, label in enumerate(labels):
            self.hosts[label] = Host(self, label, f"{self.switch}-{label}", str(net[i + 1]), i)
        # The first namespace says whether this kernel lets us make any.
        try:
            _command(["ip", "netns", "add", self.switch])
        except NetnsError as e:
            raise unittest.SkipTest(f"the kernel refuses network namespaces: {e}") from None
        _command(
            ["ip", "-batch", "-"],
            input="".join(f"netns add {host.name}\n" for host in self.hosts.values()),
        )
        for name in [self.switch, *(host.name for host in self.hosts.values())]:
            in_namespace(name, lambda: _write_sysctls(SYSCTLS))
        switch = ["link add br0 type bridge", "link set br0 up"]
        for host in self.hosts.values():
            switch += [
                f"link add {host.port} type veth peer name eth0 netns {host.name}",
                f"link set {host.port} master br0 up",
            ]
        _command(["ip", "-n", self.switch, "-batch", "-"], input="\n".join(switch) + "\n")
        for host in self.hosts.values():
            _command(
                ["ip", "-n", host.name, "-batch", "-"],
                input=(
                    "link set lo up\n"
                    f"addr add {host.address}/{net.prefixlen} dev eth0\n"
                    "link set eth0 up\n"
                ),
            )

    def __getitem__(self, label: str) -> Host:
        return self.hosts[label]

    def _host(self, host: Host | str) -> Host:
        return host if isinstance(host, Host) else self.hosts[host]

    @property
    def namespaces(self) -> list[str]:
        """
        The names of every namespace of this network, the switch's first.
        """
        return [self.switch, *(host.name for host in self.hosts.values())]

    # -- packet filters, in the switch

    def _apply(self) -> None:
        """
        Make the switch's filter table say what the cuts and delay lines
        are, in one transaction.  The bridge hands what it forwards to
        iptables (br_netfilter), so these see every packet between two
        hosts and none a host sends itself.
        """
        cut: list[str] = []
        for pair in sorted(sorted(pair) for pair in self._cuts):
            a, b = (self.hosts[label].address for label in pair)
            cut += [f"-s {a}/32 -d {b}/32 -j DROP", f"-s {b}/32 -d {a}/32 -j DROP"]
        netem = [
            f"-m physdev --physdev-in {self.hosts[label].port} -j NFQUEUE --queue-num {queue}"
            for label, queue in sorted((label, self.hosts[label].queue) for label in self._lines)
        ]
        lines = ["*filter"]
        for chain, rules in ((CUT_CHAIN, cut), (NETEM_CHAIN, netem)):
            lines += [f":{chain} - [0:0]", f"-F {chain}"]
            if not self._hooked:
                # Cuts first: a packet cut off never waits in a delay line.
                lines.append(f"-A FORWARD -j {chain}")
            lines += [f"-A {chain} {rule}" for rule in rules]
        if shutil.which("iptables-restore") is None:
            raise NetnsError("iptables-restore not found: install Debian's iptables (.ci/run does)")
        if not self._hooked:
            in_namespace(self.switch, _bridge_to_iptables)
        _command(
            ["ip", "netns", "exec", self.switch, "iptables-restore", "--noflush", "-w", "10"],
            input="\n".join([*lines, "COMMIT"]) + "\n",
        )
        self._hooked = True

    def partition(self, side_a: Iterable[Host | str], side_b: Iterable[Host | str]) -> None:
        """
        Cut every host of C{side_a} from every host of C{side_b}; links
        within each side stay.  Adds to cuts already made.
        """
        a = [self._host(h).label for h in side_a]
        b = [self._host(h).label for h in side_b]
        self._cuts |= {frozenset((x, y)) for x in a for y in b if x != y}
        self._apply()

    def cut(self, a: Host | str, b: Host | str) -> None:
        """
        Drop every packet between C{a} and C{b}, both ways; their links to
        the other hosts stay.
        """
        self.partition([a], [b])

    def heal(self, a: Host | str, b: Host | str) -> None:
        """
        Undo L{cut}: packets between C{a} and C{b} pass again.
        """
        self._cuts.discard(frozenset((self._host(a).label, self._host(b).label)))
        self._apply()

    def isolate(self, host: Host | str) -> None:
        """
        Cut C{host} from every other host: a machine whose cable is out.
        Its own loopback and its own address still work.
        """
        self.partition([host], self.hosts.values())

    def rejoin(self, host: Host | str) -> None:
        """
        Undo L{isolate} and every L{cut} that involves C{host}.
        """
        label = self._host(host).label
        self._cuts = {pair for pair in self._cuts if label not in pair}
        self._apply()

    def heal_all(self) -> None:
        """
        Undo every cut, isolation and partition.
        """
        self._cuts.clear()
        self._apply()

    def cuts(self) -> set[frozenset[str]]:
        """
        The pairs of host labels now cut from each other.
        """
        return set(self._cuts)

    # -- delay and loss

    def netem(
        self,
        host: Host | str,
        delay_ms: float = 0.0,
        loss_pct: float = 0.0,
        jitter_ms: float = 0.0,
        seed: int | None = None,
    ) -> None:
        """
        Delay every IPv4 packet C{host} sends to the other hosts by
        C{delay_ms} (plus or minus up to C{jitter_ms}, uniformly; packets
        keep their order) and lose C{loss_pct} percent of them, as netem on
        its link would.  Replaces the host's earlier setting.  Each end of
        a link adds its own: the same netem on two hosts doubles the delay
        of their round trips.
        """
        host = self._host(host)
        if delay_ms < 0 or jitter_ms < 0 or not 0 <= loss_pct <= 100:
            raise ValueError("netem wants delay_ms >= 0, jitter_ms >= 0 and 0 <= loss_pct <= 100")
        self.clear_netem(host)
        argv = [
            "ip",
            "netns",
            "exec",
            self.switch,
            sys.executable,
            os.path.abspath(__file__),
            "delay-line",
            f"--queue={host.queue}",
            f"--delay-ms={delay_ms}",
            f"--jitter-ms={jitter_ms}",
            f"--loss-pct={loss_pct}",
        ]
        if seed is not None:
            argv.append(f"--seed={seed}")
        line = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert line.stdout is not None
        ready, _, _ = select.select([line.stdout], [], [], 15.0)
        said = line.stdout.readline() if ready else ""
        if said.strip() != "ready":
            _stop(line)
            raise NetnsError(f"the delay line for {host.label} did not start (said {said!r})")
        self._lines[host.label] = line
        self._apply()

    def clear_netem(self, host: Host | str) -> None:
        """
        Undo L{netem}: packets from C{host} pass at once again (those held
        in its delay line go on their way).
        """
        line = self._lines.pop(self._host(host).label, None)
        if line is not None:
            self._apply()
            _stop(line)

    # -- the end

    def close(self) -> None:
        """
        Kill every process still running in this network's namespaces,
        delete them (with their veths and the bridge) and give up the
        lease.  Safe to call more than once, and after a failed start.
        """
        if self.closed:
            return
        self.closed = True
        for line in self._lines.values():
            _stop(line)
        self._lines.clear()
        if self.index is None:
            return
        try:
            _delete_namespaces(self.namespaces)
        finally:
            for process in self._started:
                if process.poll() is None:
                    process.kill()
                process.wait()
            with _locked():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(STATE_DIR, str(self.index)))

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Network {self.subnet} {list(self.hosts)}>"


def _stop(process: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """
    SIGTERM, then SIGKILL if it lingers; reaped either way.
    """
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()
    if process.stdout is not None:
        process.stdout.close()


class NetworkMixin:
    """
    For trial test cases: networks that are gone at cleanup.  Make the
    network before what runs in it, so that their clean-ups run first.
    """

    def makeNetwork(self, labels: Iterable[str]) -> Network:
        network = Network(labels)
        self.addCleanup(network.close)  # type: ignore[attr-defined]
        return network


# -- the delay line: netem in user space ---------------------------------------------
#
# The switch's kernel queues each packet a host sends to this process
# (iptables NFQUEUE), which gives it back (or drops it) when its time has
# come.  It speaks nfnetlink_queue itself: only the packets' metadata
# crosses, never their bytes.  It runs in the switch, not in the host: a
# packet held in the sender's own namespace still counts against its
# socket's small-queue budget (TSQ), which throttled a TCP stream behind
# 20 ms of delay to 0.3 MB/s; crossing the veth into the switch frees it
# from its socket, as netem's qdisc does by itself.

_NETLINK_NETFILTER = 12
_SOL_NETLINK = 270
_NETLINK_NO_ENOBUFS = 5
_SO_RCVBUFFORCE = 33
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 1
_NLM_F_ACK = 4
_QUEUE_PACKET = 3 << 8 | 0
_QUEUE_VERDICT = 3 << 8 | 1
_QUEUE_CONFIG = 3 << 8 | 2
_CFG_CMD, _CFG_PARAMS, _CFG_QUEUE_MAXLEN, _CFG_MASK, _CFG_FLAGS = 1, 2, 3, 4, 5
_CMD_BIND = 1
_COPY_META = 1
_F_GSO = 4
_PACKET_HDR = 1
_VERDICT_HDR = 2
_NF_DROP, _NF_ACCEPT = 0, 1


def _attr(kind: int, data: bytes) -> bytes:
    pad = b"\0" * (-len(data) % 4)
    return struct.pack("=HH", 4 + len(data), kind) + data + pad


def _message(
    kind: int, queue: int, attrs: bytes, flags: int = _NLM_F_REQUEST, seq: int = 0
) -> bytes:
    payload = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack("!H", queue) + attrs
    return struct.pack("=IHHII", 16 + len(payload), kind, flags, seq, 0) + payload


def _messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    """
    The (type, payload) of each netlink message in one datagram.
    """
    offset = 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16:
            return
        yield kind, data[offset + 16 : offset + length]
        offset += (length + 3) & ~3


def _packet_id(payload: bytes) -> int | None:
    offset = 4  # nfgenmsg
    while offset + 4 <= len(payload):
        length, kind = struct.unpack_from("=HH", payload, offset)
        if length < 4:
            return None
        if kind & 0x3FFF == _PACKET_HDR:
            return struct.unpack_from("!I", payload, offset + 4)[0]
        offset += (length + 3) & ~3
    return None


def _configure(sock: socket.socket, queue: int, attrs: bytes, seq: int) -> None:
    sock.send(_message(_QUEUE_CONFIG, queue, attrs, _NLM_F_REQUEST | _NLM_F_ACK, seq))
    for kind, payload in _messages(sock.recv(65536)):
        if kind == _NLMSG_ERROR:
            (error,) = struct.unpack_from("=i", payload)
            if error:
                raise OSError(-error, f"nfnetlink_queue config: {os.strerror(-error)}")
            return
    raise OSError("nfnetlink_queue config: no answer")


def delay_line(
    queue: int, delay_ms: float, jitter_ms: float, loss_pct: float, seed: int | None, out: IO[str]
) -> None:
    """
    Hold each packet of NFQUEUE C{queue} for C{delay_ms} (+- C{jitter_ms}),
    never letting one overtake another; drop C{loss_pct} percent of them.
    Write C{ready} to C{out} once bound; on SIGTERM, let every held packet
    go and return.

    Without loss, a GSO packet (up to 64 KiB of a TCP stream) is held
    whole: delay costs little throughput.  With loss, the kernel cuts
    them into the packets the wire would carry, so that each is lost on
    its own, as on a real link.
    """
    rng = random.Random(seed)
    wake_r, wake_w = socket.socketpair()
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 32 << 20)
    sock.setsockopt(_SOL_NETLINK, _NETLINK_NO_ENOBUFS, 1)
    sock.bind((0, 0))
    flags = 0 if loss_pct else _F_GSO
    for seq, attrs in enumerate(
        [
            _attr(_CFG_CMD, struct.pack("!BBH", _CMD_BIND, 0, socket.AF_INET)),
            _attr(_CFG_PARAMS, struct.pack("!IB", 0, _COPY_META)),
            _attr(_CFG_QUEUE_MAXLEN, struct.pack("!I", 65536)),
            _attr(_CFG_MASK, struct.pack("!I", _F_GSO))
            + _attr(_CFG_FLAGS, struct.pack("!I", flags)),
        ],
        1,
    ):
        _configure(sock, queue, attrs, seq)
    out.write("ready\n")
    out.flush()

    def verdict(packet: int, decision: int) -> None:
        attrs = _attr(_VERDICT_HDR, struct.pack("!II", decision, packet))
        sock.send(_message(_QUEUE_VERDICT, queue, attrs))

    held: deque[tuple[float, int]] = deque()
    last = 0.0
    sock.setblocking(False)
    while True:
        wait = max(0.0, held[0][0] - time.monotonic()) if held else None
        readable, _, _ = select.select([sock, wake_r], [], [], wait)
        if wake_r in readable:
            break
        if readable:
            while True:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    break
                now = time.monotonic()
                for kind, payload in _messages(data):
                    packet = _packet_id(payload) if kind == _QUEUE_PACKET else None
                    if packet is None:
                        continue
                    if loss_pct and rng.random() * 100 < loss_pct:
                        verdict(packet, _NF_DROP)
                        continue
                    hold = delay_ms + (rng.uniform(-jitter_ms, jitter_ms) if jitter_ms else 0.0)
                    last = max(last, now + max(0.0, hold) / 1000)
                    held.append((last, packet))
        now = time.monotonic()
        while held and held[0][0] <= now:
            verdict(held.popleft()[1], _NF_ACCEPT)
    while held:
        verdict(held.popleft()[1], _NF_ACCEPT)
    sock.close()


def main(argv: Sequence[str] | None = None) -> None:
    """
    C{python netns.py delay-line ...}: the delay line of L{Network.netem};
    C{python netns.py reap}: remove the leftovers of dead runs by hand.
    """
    parser = argparse.ArgumentParser(prog="netns.py")
    commands = parser.add_subparsers(dest="command", required=True)
    line = commands.add_parser("delay-line")
    line.add_argument("--queue", type=int, required=True)
    line.add_argument("--delay-ms", type=float, default=0.0)
    line.add_argument("--jitter-ms", type=float, default=0.0)
    line.add_argument("--loss-pct", type=float, default=0.0)
    line.add_argument("--seed", type=int, default=None)
    commands.add_parser("reap")
    args = parser.parse_args(argv)
    if args.command == "delay-line":
        delay_line(args.queue, args.delay_ms, args.jitter_ms, args.loss_pct, args.seed, sys.stdout)
    else:
        for name in reap():
            print(f"removed {name}")


if __name__ == "__main__":
    main()
