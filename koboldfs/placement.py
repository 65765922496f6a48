"""
Placement: where a file's copies go and when it has enough of them, as
one policy for the put that forwards copies (L{koboldfs.forwarding}), the
replicator that makes the rest (L{koboldfs.replicator}), the status page
and C{koboldfs admin fsck}.

Every function here is pure: servers' records and a file's in, a decision
out, with the time passed in.  Every server computes them alike from the
metadata, which is how they agree without talking to each other.

  - B{counted}: a copy counts towards its namespace's replica count while
    its server is C{alive} or C{readonly} (L{COUNTED_STATES}); a draining
    server's copies are to be made elsewhere, a dead one's are forgotten.
  - B{wanted}: a namespace's C{replicas}, or one on every C{alive} server
    when it sets none (L{wanted_copies}).
  - B{short} (under-replicated): fewer counted copies than wanted
    (L{missing_copies}); a file with no good copy at all is short too.
  - B{ranked}: the servers to hold a file are ranked by rendezvous hashing
    of the file's fid and the server's name (L{placement_weight}), distinct
    C{--host}s first (L{choose}).
  - B{at the ack}: a put waits for copies on C{min_copies} distinct hosts
    (L{required_copies}) on the first-ranked peers (L{forward_targets}).

See docs/replication.md.
"""

from __future__ import annotations

import hashlib
from enum import Enum
from typing import Mapping

from koboldfs.interfaces import FileInfo, NamespaceInfo, ServerInfo, ServerState

#: Copies a put waits for while two or more hosts are alive, unless its
#: namespace sets C{min_copies}.
DEFAULT_MIN_COPIES = 2
#: States whose copies count towards a namespace's replica count.
COUNTED_STATES = (ServerState.ALIVE, ServerState.READONLY)
#: States whose copies do not count: when a server enters one, its files
#: may need copies elsewhere.
UNCOUNTED_STATES = (ServerState.DRAIN, ServerState.DEAD)


class Decision(Enum):
    """
    What a server does about a file it lacks.
    """

    COPY = "copy"
    ENOUGH = "enough"  # the namespace's count is met: nothing to do
    DEFER = "defer"  # other servers are to copy it first


def counted_copies(info: FileInfo, servers: Mapping[str, ServerInfo]) -> list[str]:
    """
    The servers whose copies of C{info} count: those neither draining nor
    dead (a server the metadata does not list yet counts: C{servers} may
    be a view older than the file).  A down server's copy counts: it is
    expected back, and its absence alone makes no copy.
    """
    return [
        name
        for name in info.replicas
        if name not in servers or servers[name].state in COUNTED_STATES
    ]


def wanted_copies(replicas: int | None, servers: Mapping[str, ServerInfo]) -> int:
    """
    How many counted copies a file of a namespace whose C{replicas} setting
    is C{replicas} should have: that setting, or (None) one on every
    C{alive} server.
    """
    if replicas is not None:
        return replicas
    return sum(1 for s in servers.values() if s.state == ServerState.ALIVE)


def missing_copies(info: FileInfo, servers: Mapping[str, ServerInfo], wanted: int) -> int:
    """
    How many copies C{info} lacks of the C{wanted} (L{wanted_copies}): more
    than 0 means it is under-replicated.
    """
    return max(0, wanted - len(counted_copies(info, servers)))


def placement_weight(fid: str, server: str) -> bytes:
    """
    Where C{server} ranks for a copy of file C{fid}, lowest first:
    rendezvous hashing, which every server computes alike.
    """
    return hashlib.sha256(f"{fid}/{server}".encode()).digest()


def choose(
    info: FileInfo,
    me: str,
    servers: Mapping[str, ServerInfo],
    wanted: int | None,
    now: float,
    down_after: float,
) -> Decision:
    """
    Whether server C{me} copies C{info} now, given every server's state
    and a namespace count of C{wanted} copies (None: every server).

    While fewer than C{wanted} copies count, the servers that are to make
    the rest are picked, without any coordination, in an order every
    server computes alike: servers that are alive and up, lack a copy and
    have room on their disks (a full one's copies wait for space),
    those on a C{--host} holding no copy yet (counting the ones already
    picked) first, then by a hash of the file's and the server's names
    (rendezvous hashing: spreads files evenly, and moves few when servers
    come and go).  A server not among them defers.
    """
    if wanted is None:
        return Decision.COPY
    counted = counted_copies(info, servers)
    need = missing_copies(info, servers, wanted)
    if need <= 0:
        return Decision.ENOUGH
    hosts = {servers[name].host for name in counted if name in servers}
    candidates = [
        s
        for s in servers.values()
        if s.name not in info.replicas
        and s.state == ServerState.ALIVE
        and not s.full
        and (s.name == me or s.is_up(now, down_after))
    ]

    candidates.sort(key=lambda s: placement_weight(info.fid, s.name))
    for _ in range(need):
        if not candidates:
            break
        best = min(candidates, key=lambda s: s.host in hosts)
        if best.name == me:
            return Decision.COPY
        candidates.remove(best)
        hosts.add(best.host)
    return Decision.DEFER


def live_hosts(
    servers: Mapping[str, ServerInfo], me: str, my_host: str, now: float, down_after: float
) -> set[str]:
    """
    The C{--host}s with a server that takes new files: C{alive} and heard
    from within C{down_after}; ours counts whatever the metadata says.
    """
    hosts = {my_host}
    for server in servers.values():
        up = server.is_up(now, down_after)
        if server.state == ServerState.ALIVE and server.name != me and up:
            hosts.add(server.host)
    return hosts


def required_copies(namespace: NamespaceInfo | None, hosts: int) -> int:
    """
    How many distinct hosts must hold a file before its put is
    acknowledged: the namespace's C{min_copies}, else 2 while C{hosts}
    (alive) are two or more, else 1.
    """
    if namespace is not None and namespace.min_copies is not None:
        return namespace.min_copies
    return min(DEFAULT_MIN_COPIES, max(hosts, 1))


def wanted_hosts(namespace: NamespaceInfo | None) -> int:
    """
    How many distinct hosts a put of C{namespace} would have hold it if
    enough were alive: its C{min_copies}, else L{DEFAULT_MIN_COPIES}.
    """
    if namespace is not None and namespace.min_copies is not None:
        return namespace.min_copies
    return DEFAULT_MIN_COPIES


def forward_targets(
    fid: str,
    me: str,
    my_host: str,
    servers: Mapping[str, ServerInfo],
    now: float,
    down_after: float,
) -> list[ServerInfo]:
    """
    The peers a put of C{fid} may be forwarded to, best first: alive and
    up, with room on its disk, on a host other than ours, in the order L{choose} would pick them,
    so that the copy made at the put is the one the namespace's count
    wanted anyway.
    """
    candidates = [
        s
        for s in servers.values()
        if s.name != me
        and s.host != my_host
        and s.state == ServerState.ALIVE
        and not s.full
        and s.is_up(now, down_after)
    ]
    candidates.sort(key=lambda s: placement_weight(fid, s.name))
    return candidates
