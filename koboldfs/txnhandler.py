"""
The server's handling of client transactions (docs/transactions.md).

L{TransactionHandler} answers BEGIN, PREPARE, COMMIT and ABORT and the
transactional forms of put, get, stat and delete, for the server core
(L{koboldfs.node.Node}).  Everything it knows of a
transaction is in the metadata (L{koboldfs.metadata.txnstore}), never
in memory: any server can prepare, commit or abort any transaction, and a
server that dies loses nothing.  L{TransactionSweeper} aborts the
transactions of clients that went silent.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger

from koboldfs.errors import ErrorCode, NotFound, TransactionError
from koboldfs.interfaces import FileInfo
from koboldfs.names import check_key, check_namespace
from koboldfs.periodic import Periodic

if TYPE_CHECKING:
    from koboldfs.interfaces import INode
    from koboldfs.storage import PendingPut

log = Logger()

#: Most transactions one sweep aborts; the next sweep takes the rest.
SWEEP_BATCH = 100


class TransactionHandler:
    """
    One server's answers to transaction requests; methods raise
    L{KoboldError}s.
    """

    def __init__(self, node: INode) -> None:
        self.node = node

    @property
    def pending_timeout(self) -> float:
        return self.node.config.pending_timeout

    @property
    def prepared_timeout(self) -> float:
        return self.node.config.prepared_timeout

    def _now(self) -> float:
        return float(self.node.clock.seconds())

    async def begin(self, ns: str) -> dict[str, Any]:
        txn = uuid.uuid4().hex
        expires = self._now() + self.pending_timeout
        await self.node.store.begin_txn(txn, check_namespace(ns), self._now(), expires)
        return {"txn": txn, "timeout": self.pending_timeout}

    async def lookup(self, ns: str, key: str, txn: str) -> FileInfo:
        """
        C{key} as transaction C{txn} sees it: its own pending upload, or
        not found if it deleted it, else the live version.
        """
        info = await self.node.store.txn_lookup(txn, check_namespace(ns), check_key(key))
        if info is None:
            raise NotFound(ErrorCode.NOT_FOUND, f"no key {key!r} in namespace {ns!r}")
        return info

    async def delete(self, ns: str, key: str, txn: str) -> None:
        now = self._now()
        found, discarded = await self.node.store.txn_delete(
            txn, check_namespace(ns), check_key(key), now, now + self.pending_timeout
        )
        await self.reclaim(discarded)
        if not found:
            raise NotFound(ErrorCode.NOT_FOUND, f"no key {key!r} in namespace {ns!r}")

    async def finish_upload(self, put: PendingPut, txn: str, sha256: str | None) -> FileInfo:
        """
        Make an upload durable (as L{INode.finish_upload}), then record it
        as a pending file of C{txn}: stored, checksummed, and invisible to
        every reader but the transaction until it commits.
        """
        node = self.node
        await node.place(put)
        size, digest = await put.finish(sha256)
        now = self._now()
        discarded: list[FileInfo] = []

        async def record() -> FileInfo:
            info, superseded = await node.store.txn_put(
                txn,
                put.ns,
                put.key,
                put.fid,
                put.path,
                size,
                digest,
                now,
                node.name,
                now + self.pending_timeout,
            )
            discarded.extend(superseded)
            return info

        # Keep the bytes unless sure the record was not made; if it was and
        # the transaction dies, they are reclaimed.
        info = await node.publish(
            put,
            record,
            lambda: node.store.txn_lookup(txn, put.ns, put.key),
            not_recorded=(TransactionError,),
        )
        await self.reclaim(discarded)
        return info

    async def prepare(self, txn: str, record: bool) -> dict[str, Any]:
        """
        Vouch for this server's pending copies of C{txn}: each is on disk
        whole.  With C{record}, the vote is stored in the metadata, and the
        transaction is prepared once every pending file has one.
        """
        node = self.node
        now = self._now()
        state, pending = await node.store.txn_pending(txn, now)
        if state == "committed":
            return {"state": state, "remaining": 0}
        mine = [info for info, _ in pending if node.name in info.replicas]
        for info in mine:
            await self._check_copy(txn, info)
        if not record:
            others = [info for info, _ in pending if node.name not in info.replicas]
            return {"state": state, "remaining": len(others)}
        vote = await node.store.txn_vote(
            txn, node.name, [info.id for info in mine], now, now + self.prepared_timeout
        )
        return {"state": vote.state, "remaining": vote.remaining}

    async def _check_copy(self, txn: str, info: FileInfo) -> None:
        reader = self.node.storage.open_read(info.path)
        try:
            size = await reader.open()
        except NotFound:
            size = None
        finally:
            await defer.maybeDeferred(reader.close)
        if size != info.size:
            raise TransactionError(
                ErrorCode.TXN_STATE,
                f"transaction {txn}: the pending copy of {info.key!r} on {self.node.name} is "
                + ("missing" if size is None else f"{size} bytes, not {info.size}"),
            )

    async def commit(self, txn: str, prepared: bool) -> dict[str, Any]:
        now = self._now()
        done = await self.node.store.txn_commit(txn, now, now + self.prepared_timeout, prepared)
        return {"published": len(done.published), "already": done.already}

    async def abort(self, txn: str) -> dict[str, Any]:
        discarded = await self.node.store.txn_abort(txn, self._now())
        await self.reclaim(discarded)
        return {"discarded": len(discarded)}

    async def reclaim(self, discarded: list[FileInfo]) -> None:
        """
        Remove our copies of discarded pending files and forget them now;
        other servers' copies go with their replicators' next pass.  A
        failure is logged: the replicator reclaims what is left.
        """
        node = self.node
        for info in discarded:
            if node.name not in info.replicas:
                continue
            try:
                await node.storage.remove(info.path)
                await node.store.remove_replica(info.id, node.name)
                await node.store.purge_file(info.id)
            except Exception as e:
                log.warn(
                    "reclaiming discarded {key!r} on {name} failed: {error}",
                    key=info.key,
                    name=node.name,
                    error=e,
                )

    async def sweep(self) -> int:
        """
        Abort the transactions whose clients went silent; return how many
        pending files went with them.
        """
        discarded = await self.node.store.expire_txns(self._now(), SWEEP_BATCH)
        await self.reclaim(discarded)
        if discarded:
            log.info(
                "{name} collected {n} pending files of expired transactions",
                name=self.node.name,
                n=len(discarded),
            )
        return len(discarded)


def check_txn_id(txn: str) -> str:
    """
    Return C{txn} if it is a transaction id (as L{TransactionHandler.begin}
    makes them).

    @raise TransactionError: it is not.
    """
    if not (isinstance(txn, str) and len(txn) == 32 and all(c in "0123456789abcdef" for c in txn)):
        raise TransactionError(ErrorCode.BAD_REQUEST, f"{txn!r} is not a transaction id")
    return txn


class TransactionSweeper(Periodic):
    """
    Runs L{TransactionHandler.sweep} every C{interval} seconds, as a
    service; an error is logged and the next sweep runs on time.
    """

    def __init__(self, handler: TransactionHandler, clock: Any, interval: float) -> None:
        super().__init__(
            "collecting expired transactions", handler.sweep, interval, clock, now=False, default=0
        )


def sweep_interval(pending_timeout: float) -> float:
    """
    How often to look for expired transactions: a quarter of the timeout,
    so a vanished client's files go within 1.25 timeouts, at most a minute.
    """
    return max(0.25, min(pending_timeout / 4, 60.0))
