"""
Put forwarding, for write durability: a put is acknowledged only once its
file is durable on C{min_copies} distinct C{--host}s (how many, and which
peers, is L{koboldfs.placement}'s to say).

The server receiving a put (the origin) streams the body, as it arrives,
to its own disk and to peers on other hosts, over the server-to-server
request REPLICA_PUT.  Each peer writes it into its C{tmp/}, checks it
against the size and SHA-256 the client sent, fsyncs it, renames it into
place and answers OK: durable here.  A peer records nothing.  Once the
origin's own copy is durable too and every peer answered OK, the origin
commits the file row and every replica row in one transaction, and only
then answers the client.  So no replica row names bytes that are not on
disk, and no put is acknowledged with fewer durable copies than required.
Bytes a peer made durable for a put that was never committed (the origin
failed or crashed) are orphans, which L{koboldfs.orphans} removes.

The client's connection is paused while the local disk or any peer's
connection lags (L{Gate}): the put goes at the pace of the slowest, and
nothing holds a whole file.

See docs/replication.md ("Write durability").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from koboldfs.errors import ErrorCode, KoboldError, ServerError, Unavailable
from koboldfs.interfaces import FileInfo, ServerInfo
from koboldfs.protocol import Message
from koboldfs.placement import forward_targets, live_hosts, required_copies, wanted_hosts
from koboldfs.storage import relpath_for

if TYPE_CHECKING:
    from koboldfs.connection import ClientProtocol
    from koboldfs.interfaces import INode
    from koboldfs.storage import PendingPut

log = Logger()

#: Seconds a peer that a put could not reach is passed by: it may still
#: heartbeat to the metadata (cut off from us alone), so it is not down.
UNREACHABLE_FOR = 15.0
#: Seconds, beyond one peer's connect deadline, that finding a put's peers
#: may take in all: two hung peers in a row must not make the put outlast
#: its client's reply deadline (5 s by default).
SETUP_SPARE = 1.0


def too_few_hosts(namespace: str, required: int, hosts: int) -> Unavailable:
    """
    The error of a put that cannot reach its copies: retryable, since a
    host may come back.
    """
    alive = "1 host is" if hosts == 1 else f"{hosts} hosts are"
    return Unavailable(
        ErrorCode.UNAVAILABLE,
        f"namespace {namespace!r} needs copies on {required} distinct hosts before a put is "
        f"acknowledged, and only {alive} alive",
    )


@implementer(IPushProducer)
class Gate:
    """
    Pauses one producer (the client's connection) while any of several
    consumers (the local disk, each peer) wants it paused, and resumes it
    only once none does.  Closed when its put ends, so that a late
    resume cannot release a later put's pause.
    """

    def __init__(self, producer: IPushProducer) -> None:
        self._producer = producer
        self._reasons: set[str] = set()
        self._closed = False

    @property
    def paused(self) -> bool:
        return bool(self._reasons)

    def pause(self, reason: str) -> None:
        if self._closed or reason in self._reasons:
            return
        if not self._reasons:
            self._producer.pauseProducing()
        self._reasons.add(reason)

    def resume(self, reason: str) -> None:
        if self._closed or reason not in self._reasons:
            return
        self._reasons.discard(reason)
        if not self._reasons:
            self._producer.resumeProducing()

    def side(self, reason: str) -> IPushProducer:
        """
        A producer to register with one consumer: its pauses are that
        consumer's reason.
        """
        return _Side(self, reason)

    def close(self) -> None:
        """
        Stop acting on the producer; its owner resumes it as it ends the put.
        """
        self._closed = True
        self._reasons.clear()

    # IPushProducer, for completeness: a gate can itself be gated.
    def pauseProducing(self) -> None:
        self.pause("")

    def resumeProducing(self) -> None:
        self.resume("")

    def stopProducing(self) -> None:
        self.close()


@implementer(IPushProducer)
class _Side:
    def __init__(self, gate: Gate, reason: str) -> None:
        self._gate = gate
        self._reason = reason

    def pauseProducing(self) -> None:
        self._gate.pause(self._reason)

    def resumeProducing(self) -> None:
        self._gate.resume(self._reason)

    def stopProducing(self) -> None:
        pass


@dataclass
class _Peer:
    """
    One peer a put is forwarded to.
    """

    server: ServerInfo
    conn: ClientProtocol
    answered: defer.Deferred[None] = field(default_factory=defer.Deferred)
    reply: Message | None = None
    waiting: bool = False
    released: bool = False
    #: Its copy failed, and the put goes on without it (best effort).
    dropped: bool = False


class Forward:
    """
    The copies of one put on its way to peers, as it arrives.

    L{start} looks up the namespace, works out how many copies the put
    needs, and opens a REPLICA_PUT to that many peers on distinct hosts
    (skipping those that cannot be reached); the client's connection is
    paused meanwhile, and the few chunks already received wait in memory.
    L{write} sends each chunk on; L{finish} ends the put: local and peer
    copies durable, then one commit.

    A namespace that sets C{min_copies} is strict: if a peer fails, the put
    fails (C{failed} is called, or L{finish} raises) with a retryable
    error, since its bytes cannot be re-sent elsewhere without holding
    them.  Without it the second copy is best effort: a peer that cannot
    be reached or fails is as good as down, the put is acknowledged with
    the copies that succeeded, and the replicator makes the rest, so that
    a server dying does not fail every put until it is taken for down.
    """

    def __init__(
        self, node: INode, put: PendingPut, gate: Gate, failed: Callable[[KoboldError], None]
    ) -> None:
        self._node = node
        self._put = put
        self._gate = gate
        self._failed = failed
        self._peers: list[_Peer] = []
        self._pending: list[bytes] | None = []
        self._ready = False
        self._readyWaiters: list[defer.Deferred[None]] = []
        self._ending = False
        self._done = False
        self._strict = True
        #: Why the put cannot be acknowledged, once known.
        self.error: KoboldError | None = None

    @property
    def peers(self) -> list[str]:
        """
        The peers whose copies this put waits for.
        """
        return [peer.server.name for peer in self._peers if not peer.dropped]

    def start(self) -> None:
        self._gate.pause("setup")
        defer.ensureDeferred(self._setup())

    async def _setup(self) -> None:
        node, put = self._node, self._put
        try:
            namespace = await node.store.namespace(put.ns)
            my_host = node.config.host
            hosts = live_hosts(
                node.servers, node.name, my_host, node.clock.seconds(), node.config.down_after
            )
            if node.name not in node.servers or len(hosts) < wanted_hosts(namespace):
                # Fewer hosts known than the put wants: a server may have
                # started since our last look (at our start, or the last
                # heartbeat), so look again rather than take one copy.
                await node.refresh_servers()
                hosts = live_hosts(
                    node.servers, node.name, my_host, node.clock.seconds(), node.config.down_after
                )
            now = node.clock.seconds()
            required = required_copies(namespace, len(hosts))
            self._strict = namespace is not None and namespace.min_copies is not None
            if required > len(hosts):
                raise too_few_hosts(put.ns, required, len(hosts))
            if namespace is not None and namespace.private:
                put.path = relpath_for(put.fid, put.key, private=namespace.name)
            need = required - 1
            used, errors = {my_host}, []
            deadline = node.clock.seconds() + node.config.peer_connect_timeout + SETUP_SPARE
            targets = forward_targets(
                put.fid, node.name, my_host, node.servers, now, node.config.down_after
            )
            for server in targets:
                if len(self._peers) >= need or self._done:
                    break
                if server.host in used:
                    continue
                passed_by = node.unreachable.get(server.name, 0.0) - node.clock.seconds()
                if passed_by > 0:
                    errors.append(
                        f"{server.name}: unreachable lately, passed by for {passed_by:.0f}s"
                    )
                    continue
                # A hung peer costs its connection's deadline
                # (--peer-connect-timeout), then the next is tried, in what
                # is left of the setup's.
                left = deadline - node.clock.seconds()
                if left <= 0:
                    errors.append(f"{server.name}: not tried, no time left to find peers")
                    break
                connecting = defer.ensureDeferred(node.peers.acquire(server.address))
                try:
                    conn = await connecting.addTimeout(left, node.clock)
                except (KoboldError, defer.TimeoutError) as e:
                    # Unreachable, hung, or it refused our cluster secret.
                    why = e if isinstance(e, KoboldError) else f"no answer in {left:.1f}s"
                    errors.append(f"{server.name}: {why}")
                    node.unreachable[server.name] = node.clock.seconds() + UNREACHABLE_FOR
                    continue
                node.unreachable.pop(server.name, None)
                if self._done:
                    node.peers.release(server.address, conn)
                    break
                peer = _Peer(server, conn)
                header = {"fid": put.fid, "path": put.path, "size": put.size}
                conn.begin_replica_put(header).addBoth(self._answered, peer)
                self._peers.append(peer)
                used.add(server.host)
            if self._done:
                return
            if len(self._peers) < need and not self._strict:
                log.warn(
                    "put of {key!r} in {ns!r} goes on with {copies} of {required} copies, the"
                    " replicator makes the rest: {errors}",
                    key=put.key,
                    ns=put.ns,
                    copies=len(self._peers) + 1,
                    required=required,
                    errors="; ".join(errors),
                )
            elif len(self._peers) < need:
                raise Unavailable(
                    ErrorCode.UNAVAILABLE,
                    f"namespace {put.ns!r} needs copies on {required} distinct hosts, and only "
                    f"{len(self._peers) + 1} could be reached"
                    + (f": {'; '.join(errors)}" if errors else ""),
                )
            pending, self._pending = self._pending or [], None
            for chunk in pending:
                self._send(chunk)
        except KoboldError as e:
            self._fail(e)
        except Exception as e:
            log.failure("forwarding {fid} failed", fid=put.fid)
            self._fail(ServerError(ErrorCode.INTERNAL, f"internal error: {e!r}"))
        finally:
            self._gate.resume("setup")
            self._ready = True
            waiters, self._readyWaiters = self._readyWaiters, []
            for d in waiters:
                d.callback(None)

    def _whenReady(self) -> defer.Deferred[None]:
        if self._ready:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._readyWaiters.append(d)
        return d

    def write(self, chunk: bytes) -> None:
        """
        Send a chunk of the body on, or keep it until the peers are open.
        """
        if self._done:
            return
        if self._pending is not None:
            self._pending.append(chunk)
        else:
            self._send(chunk)

    def _send(self, chunk: bytes) -> None:
        for peer in self._peers:
            if peer.dropped:
                continue
            peer.conn.send_chunk(chunk)
            if peer.conn.flow.paused and not peer.waiting:
                peer.waiting = True
                self._gate.pause(peer.server.name)
                peer.conn.flow.wait().addBoth(self._drained, peer)

    def _drained(self, result: Any, peer: _Peer) -> None:
        # A lost connection fails the reply too, which says why.
        peer.waiting = False
        self._gate.resume(peer.server.name)

    def _answered(self, result: Message | Failure, peer: _Peer) -> None:
        if isinstance(result, Failure):
            error = result.value
        elif not self._ending:
            error = ServerError(ErrorCode.BAD_REQUEST, "answered before the end of the body")
        else:
            peer.reply = result
            error = None
        if error is not None and not self._strict:
            log.warn(
                "put of {key!r} goes on without its copy on {peer}: {error}",
                key=self._put.key,
                peer=peer.server.name,
                error=error,
            )
            peer.dropped = True
            if not peer.released:
                peer.released = True
                peer.conn.close()
        elif error is not None:
            self._fail(
                Unavailable(
                    ErrorCode.UNAVAILABLE,
                    f"the copy on {peer.server.name} ({peer.server.host}) failed, so this put "
                    f"would not be durable on enough hosts: {error}",
                )
            )
        peer.answered.callback(None)

    def _fail(self, error: KoboldError) -> None:
        if self._done:
            return
        self.error = error
        self.abort()
        self._failed(error)

    def abort(self) -> None:
        """
        Give up: the peers drop what they received (their connections
        close).  Idempotent.
        """
        if self._done:
            return
        self._done = True
        self._pending = None
        self._gate.close()
        for peer in self._peers:
            if not peer.released:
                peer.released = True
                peer.conn.close()

    async def finish(self, sha256: str | None) -> FileInfo:
        """
        The client's END: make every copy durable, then commit the file
        with all of them, and return it.  Raises (having published
        nothing that is recorded) if any copy fails.
        """
        node, put = self._node, self._put
        await self._whenReady()
        if self.error is not None:
            await put.upload.abort()
            raise self.error
        if not self.peers:
            # One copy is enough for this namespace, or the only one left.
            self.abort()
            return await node.finish_upload(put, sha256)
        self._ending = True
        for peer in self._peers:
            if not peer.dropped:
                peer.conn.end_put(sha256)
        try:
            size, digest = await put.finish(sha256)
        except BaseException:
            # The peers' copies, if durable, are orphans: see koboldfs.orphans.
            self.abort()
            raise
        await defer.gatherResults([peer.answered for peer in self._peers])
        for peer in self._peers:
            if peer.dropped:
                continue
            if self.error is None and peer.reply is not None and peer.reply.get("sha256") != digest:
                self.error = Unavailable(
                    ErrorCode.UNAVAILABLE, f"{peer.server.name} stored other bytes than ours"
                )
        if self.error is not None:
            self.abort()
            await node.storage.remove(put.path)
            raise self.error
        self._done = True
        self._gate.close()
        for peer in self._peers:
            if not peer.released:
                peer.released = True
                node.peers.release(peer.server.address, peer.conn)
        return await self._commit(size, digest)

    async def _commit(self, size: int, digest: str) -> FileInfo:
        # The peers' copies of a put that did not commit are orphans.
        node, put = self._node, self._put
        return await node.record_put(put, size, digest, also=tuple(self.peers))
