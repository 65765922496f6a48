"""
Client transactions: files that appear at commit and vanish at abort.

L{DeferredTransaction} is one transaction driven with Deferreds over a
L{koboldfs.pool.ClientPool}: its puts upload at once into pending files
that only it can read, and L{DeferredTransaction.commit} publishes them
all in one metadata transaction on any server.  L{TransactionalClientPool}
is the blocking pool that joins the C{transaction} package's current
transaction (the one pyramid_tm and Zope manage) as a data manager.  The
guarantees are in docs/transactions.md.
"""

from __future__ import annotations

from typing import Any

import transaction as transaction_package
from transaction.interfaces import NoTransaction
from twisted.internet import defer
from twisted.logger import Logger

from koboldfs.blocking import ClientPool as BlockingClientPool
from koboldfs.deferredclient import DeferredClient, Stat
from koboldfs.errors import ErrorCode, TransactionError
from koboldfs.names import check_key
from koboldfs.protocol import Message, Op

log = Logger()

#: Retry rounds of a commit: a commit is what must not be lost once the
#: other participants of a two-phase commit have voted yes.
COMMIT_RETRIES = 6


class DeferredTransaction:
    """
    One client transaction of a namespace; every method returns a
    Deferred.  Begin one with L{begin}.

    @ivar id: the transaction's id, as the servers know it.
    @ivar state: C{open}, C{prepared}, C{committed} or C{aborted}, as this
        client last saw it.
    """

    def __init__(self, client: DeferredClient, txn_id: str) -> None:
        self.client = client
        self.id = txn_id
        self.state = "open"
        #: Each key written: the address holding its pending upload, or
        #: None if the transaction deletes it.
        self._keys: dict[str, str | None] = {}

    @classmethod
    def begin(cls, client: DeferredClient) -> defer.Deferred[DeferredTransaction]:
        """
        Open a transaction on any server of C{client}.
        """

        async def begin() -> DeferredTransaction:
            fields = {"ns": client.namespace}
            reply = await client.request(Op.BEGIN, fields)
            return cls(client, reply["txn"])

        return defer.ensureDeferred(begin())

    def _open(self) -> None:
        if self.state != "open":
            raise TransactionError(
                ErrorCode.TXN_STATE, f"transaction {self.id} is {self.state}: no more changes"
            )

    def _fields(self, key: str) -> dict[str, Any]:
        return {"ns": self.client.namespace, "key": key, "txn": self.id}

    # -- changes

    def put(self, key: str, source: Any) -> defer.Deferred[bool]:
        """
        Upload C{source} now, durably, as a pending file that becomes
        C{key} at commit; until then only this transaction sees it.
        """
        key = check_key(key)
        self._open()

        async def put() -> bool:
            _, address = await self.client.upload(key, source, {"txn": self.id})
            self._keys[key] = address
            return True

        return defer.ensureDeferred(put())

    def delete(self, key: str) -> defer.Deferred[bool]:
        """
        Delete C{key} at commit; fire with whether it exists for this
        transaction now.
        """
        key = check_key(key)
        self._open()

        async def delete() -> bool:
            reply = await self.client.request_or_none(Op.DELETE, self._fields(key))
            self._keys[key] = None
            return reply is not None

        return defer.ensureDeferred(delete())

    # -- reads, which see this transaction's own changes

    def get(self, key: str, output: Any) -> defer.Deferred[bool]:
        key = check_key(key)
        extra = {"txn": self.id} if key in self._keys else None
        return self.client.download(key, output, extra)

    def stat(self, key: str) -> defer.Deferred[Stat | None]:
        key = check_key(key)
        if key not in self._keys:
            return self.client.stat(key)

        async def stat() -> Stat | None:
            reply = await self.client.request_or_none(Op.STAT, self._fields(key))
            return None if reply is None else Stat.from_reply(reply)

        return defer.ensureDeferred(stat())

    def list(
        self, prefix: str = "", after: str | None = None, limit: int = 1000
    ) -> defer.Deferred[list[str]]:
        """
        The published keys as this transaction will leave them: its
        deletes left out, its pending puts in.
        """

        async def list_() -> list[str]:
            deleted = {k for k, v in self._keys.items() if v is None}
            asked = limit + len(deleted)
            keys = await self.client.list(prefix, after, asked)
            merged = set(keys) - deleted
            merged |= {
                k
                for k, v in self._keys.items()
                if v is not None and k.startswith(prefix) and (after is None or k > after)
            }
            found = sorted(merged)
            if len(keys) == asked and keys:
                # More published keys follow: ours beyond the page wait for
                # the next one.
                found = [k for k in found if k <= keys[-1]]
            return found[:limit]

        return defer.ensureDeferred(list_())

    # -- the end

    def prepare(self, twophase: bool = False) -> defer.Deferred[None]:
        """
        Vote: every server holding a pending upload checks that its copy is
        on disk, whole.  With C{twophase}, each records its vote in the
        metadata and the transaction becomes prepared: it takes no more
        changes, survives any server's crash, and waits for L{commit}.

        @raise TransactionError: a check failed; abort.
        @raise ConnectionFailed: a holder is unreachable; abort.
        """
        return defer.ensureDeferred(self._prepare(twophase))

    async def _prepare(self, twophase: bool) -> None:
        fields = {"txn": self.id, "record": twophase}
        holders = sorted({a for a in self._keys.values() if a is not None})
        reply: Message | None = None
        for address in holders:
            reply = await self.client.request_on(address, Op.PREPARE, fields)
        if twophase:
            if reply is None:
                # Deletes only: any server records the prepared state.
                reply = await self.client.request(Op.PREPARE, fields)
            if reply["state"] not in ("prepared", "committed"):
                raise TransactionError(
                    ErrorCode.TXN_STATE,
                    f"transaction {self.id}: {reply['remaining']} pending uploads "
                    "were not vouched for by the servers holding them",
                )
            self.state = "prepared"

    def commit(self, twophase: bool = False) -> defer.Deferred[None]:
        """
        Publish every pending upload and apply every delete, at once, on
        any server; retried on others, and again, when they fail (a commit
        whose answer was lost is answered as done).  With C{twophase}, the
        transaction must have been prepared.
        """

        async def commit() -> None:
            fields = {"txn": self.id, "prepared": twophase}
            retries = max(self.client.retries, COMMIT_RETRIES)
            await self.client.request(Op.COMMIT, fields, retries=retries)
            self.state = "committed"

        return defer.ensureDeferred(commit())

    def abort(self) -> defer.Deferred[None]:
        """
        Discard every pending upload, bytes and rows.
        """

        async def abort() -> None:
            await self.client.request(Op.ABORT, {"txn": self.id})
            self.state = "aborted"

        return defer.ensureDeferred(abort())


class _DataManager:
    """
    The C{transaction} package's view of one L{DeferredTransaction}: a
    data manager (C{IDataManager}) with no savepoints.
    """

    def __init__(self, pool: TransactionalClientPool, remote: DeferredTransaction) -> None:
        self._pool = pool
        self.remote = remote
        self.transaction_manager = pool.manager
        #: Every participant voted yes: the outcome is commit, whatever
        #: fails after.
        self._decided = False

    def __repr__(self) -> str:
        return (
            f"<koboldfs transaction {self.remote.id} of namespace "
            f"{self.remote.client.namespace!r}: savepoints are not supported>"
        )

    def _run(self, f: Any, *args: Any) -> Any:
        return self._pool._call(f, *args)

    def abort(self, txn: Any) -> None:
        self._discard()

    def tpc_begin(self, txn: Any) -> None:
        pass

    def commit(self, txn: Any) -> None:
        # The uploads are done: nothing is left to send.
        pass

    def tpc_vote(self, txn: Any) -> None:
        self._run(self.remote.prepare, self._pool.twophase)

    def tpc_finish(self, txn: Any) -> None:
        self._decided = True
        self._run(self.remote.commit, self._pool.twophase)

    def tpc_abort(self, txn: Any) -> None:
        self._discard()

    def _discard(self) -> None:
        if self.remote.state in ("committed", "aborted"):
            return
        if self._decided:
            # The commit failed after every vote was yes (every server out
            # of reach for its retries): an abort now must not undo what
            # the other participants committed.  Try the commit again.
            try:
                self._run(self.remote.commit, self._pool.twophase)
            except Exception as e:
                log.error(
                    "koboldfs transaction {txn} was decided but its commit failed: it "
                    "stays prepared on the servers until --prepared-timeout: {error}",
                    txn=self.remote.id,
                    error=e,
                )
            return
        try:
            self._run(self.remote.abort)
        except Exception as e:
            self.remote.state = "aborted"
            # The servers collect it after their --pending-timeout.
            log.warn(
                "aborting koboldfs transaction {txn} failed, left for the servers "
                "to collect: {error}",
                txn=self.remote.id,
                error=e,
            )

    def sortKey(self) -> str:
        # Before zope.sqlalchemy ("~sqlalchemy:..."), which commits a
        # one-phase session in its vote: ours must come first, so that a
        # failed vote here keeps the database from committing.
        return f"koboldfs:{self.remote.client.namespace}:{self.remote.id}"


class TransactionalClientPool(BlockingClientPool):
    """
    A blocking L{ClientPool<koboldfs.blocking.ClientPool>} whose writes
    join the current transaction of C{manager} (the C{transaction}
    package's thread-local one by default): C{put} uploads at once into a
    pending file and C{delete} is recorded; both take effect when the
    transaction commits, and vanish if it aborts.  Reads inside the
    transaction see its own writes.  Savepoints are refused.

    @param twophase: vote with a real prepare on the servers, recorded in
        the metadata, and commit only prepared transactions.
    """

    def __init__(
        self,
        namespace: str,
        servers: list[str] | tuple[str, ...],
        twophase: bool = False,
        manager: Any = None,
        **options: Any,
    ) -> None:
        super().__init__(namespace, servers, **options)
        self.twophase = twophase
        self.manager = manager if manager is not None else transaction_package.manager

    def _joined(self) -> DeferredTransaction:
        """
        This pool's transaction in the current one, begun and joined on
        the first write.
        """
        current = self.manager.get()
        try:
            return current.data(self).remote  # type: ignore[no-any-return]
        except KeyError:
            pass
        remote = self._call(DeferredTransaction.begin, self._client)
        manager = _DataManager(self, remote)
        try:
            current.join(manager)
        except BaseException:
            self._call(remote.abort)
            raise
        current.set_data(self, manager)
        return remote

    def _current(self) -> DeferredTransaction | None:
        """
        This pool's transaction in the current one, if it is still open:
        a transaction whose commit failed stays current until aborted, but
        its writes are gone.
        """
        try:
            remote: DeferredTransaction = self.manager.get().data(self).remote
        except (KeyError, NoTransaction):
            return None
        return remote if remote.state in ("open", "prepared") else None

    def put(self, key: str, source: Any) -> bool:
        """Upload C{source} now; it becomes C{key} when the transaction commits."""
        return self._call(self._joined().put, key, source)  # type: ignore[no-any-return]

    def delete(self, key: str) -> bool:
        """Delete C{key} when the transaction commits; False if there is none."""
        return self._call(self._joined().delete, key)  # type: ignore[no-any-return]

    def get(self, key: str, output: Any) -> bool:
        remote = self._current()
        if remote is None:
            return super().get(key, output)
        return self._call(remote.get, key, output)  # type: ignore[no-any-return]

    def stat(self, key: str) -> Stat | None:
        remote = self._current()
        if remote is None:
            return super().stat(key)
        return self._call(remote.stat, key)  # type: ignore[no-any-return]

    def list(self, prefix: str = "", after: str | None = None, limit: int = 1000) -> list[str]:
        remote = self._current()
        if remote is None:
            return super().list(prefix, after, limit)
        return self._call(remote.list, prefix, after, limit)  # type: ignore[no-any-return]

    def get_url(self, key: str, expires: int | None = None) -> str | None:
        """
        The URL of the published file: a key this transaction wrote has
        none until commit (None if deleted; an error if put).
        """
        remote = self._current()
        if remote is not None and key in remote._keys:
            if remote._keys[key] is None:
                return None
            raise TransactionError(
                ErrorCode.TXN_STATE, f"{key!r} is pending in transaction {remote.id}: no URL yet"
            )
        return super().get_url(key, expires)
