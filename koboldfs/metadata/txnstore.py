"""
The metadata store's side of client transactions (docs/transactions.md):
what a transaction holds, kept in the database so that any server can
finish it.  The client's side is L{koboldfs.txnclient}, the server's
L{koboldfs.txnhandler}.  Written once as units
(L{koboldfs.metadata.units}), which both stores run through the methods of
L{MetadataStore<koboldfs.metadata.store.MetadataStore>}.

A transaction's uploads are files in state C{pending}: stored, replicated
nowhere (the replicator walks only C{live} and C{deleted} files), invisible
to every lookup.  Table C{txn_keys} holds, for each key the transaction
touched, the pending file to publish or NULL for a delete.  Commit turns
them all C{live} (retiring the versions they replace) in one database
transaction; abort and expiry turn the pending files C{deleted}, for their
bytes to be reclaimed like any deleted file's, and forget the rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy import delete as sql_delete

from koboldfs.errors import ErrorCode, TransactionError
from koboldfs.interfaces import FileInfo
from koboldfs.metadata.files import (
    FILE_COLUMNS,
    FIND_LIVE,
    GOOD_REPLICAS,
    discard_pending,
    forget_file,
    lookup,
    new_file,
    retire,
)
from koboldfs.metadata.namespaces import ensure_namespace, get_namespace
from koboldfs.metadata.schema import files, namespaces, replicas, transactions, txn_keys
from koboldfs.metadata.units import Query, Unit, reader, writer

_TXN = bindparam("b_txn")
_GET_TXN = select(transactions.c.namespace_id, transactions.c.state, transactions.c.expires).where(
    transactions.c.id == _TXN
)
# Writers lock the transaction's row first (PostgreSQL; SQLite runs one
# writer at a time): a put racing its own transaction's commit, or two
# servers' votes, then run one after the other, each seeing the other's.
_LOCK_TXN = _GET_TXN.with_for_update()
_INSERT_TXN = insert(transactions).values(
    id=_TXN,
    namespace_id=bindparam("b_namespace_id"),
    state="open",
    created=bindparam("b_now"),
    expires=bindparam("b_expires"),
)
_TOUCH_TXN = (
    update(transactions).where(transactions.c.id == _TXN).values(expires=bindparam("b_expires"))
)
_SET_TXN_STATE = (
    update(transactions)
    .where(transactions.c.id == _TXN)
    .values(state=bindparam("b_state"), expires=bindparam("b_expires"))
)
_DELETE_TXN = sql_delete(transactions).where(transactions.c.id == _TXN)
_EXPIRED_TXNS = (
    select(transactions.c.id, transactions.c.state)
    .where(transactions.c.expires < bindparam("b_now"))
    .order_by(transactions.c.expires)
    .limit(bindparam("b_limit"))
)
_NAMESPACE_NAME = select(namespaces.c.name).where(namespaces.c.id == bindparam("b_namespace_id"))

_THIS_KEY = (txn_keys.c.txn_id == _TXN, txn_keys.c.key == bindparam("b_key"))
_TXN_KEY = select(txn_keys.c.file_id).where(*_THIS_KEY)
_INSERT_TXN_KEY = insert(txn_keys).values(
    txn_id=_TXN, key=bindparam("b_key"), file_id=bindparam("b_file_id")
)
_UPDATE_TXN_KEY = (
    update(txn_keys).where(*_THIS_KEY).values(file_id=bindparam("b_file_id"), voted=None)
)
_TXN_KEYS = (
    select(txn_keys.c.key, txn_keys.c.file_id, txn_keys.c.voted)
    .where(txn_keys.c.txn_id == _TXN)
    .order_by(txn_keys.c.key)
)
_DELETE_TXN_KEYS = sql_delete(txn_keys).where(txn_keys.c.txn_id == _TXN)
_VOTE = (
    update(txn_keys)
    .where(txn_keys.c.txn_id == _TXN, txn_keys.c.file_id == bindparam("b_file_id"))
    .values(voted=bindparam("b_server"))
)

_FILE_ID = bindparam("b_file_id")
_PENDING_FILE = select(*FILE_COLUMNS).where(files.c.id == _FILE_ID, files.c.state == "pending")
_PENDING_ROW = select(
    files.c.fid,
    files.c.namespace_id,
    files.c.key,
    files.c.size,
    files.c.sha256,
    files.c.created,
    files.c.path,
).where(files.c.id == _FILE_ID, files.c.state == "pending")
_REPLICAS_OF = select(replicas.c.server, replicas.c.created).where(
    replicas.c.file_id == _FILE_ID, replicas.c.state == "ok"
)


def _unknown(txn_id: str) -> TransactionError:
    return TransactionError(
        ErrorCode.TXN_UNKNOWN, f"transaction {txn_id} is unknown: aborted, expired or never begun"
    )


def _state(txn_id: str, state: str, what: str) -> TransactionError:
    return TransactionError(ErrorCode.TXN_STATE, f"transaction {txn_id} is {state}: {what}")


@dataclass(frozen=True)
class Vote:
    """
    A transaction's state after a server's vote, and how many of its
    pending files no server has vouched for yet.
    """

    state: str
    remaining: int


@dataclass(frozen=True)
class Commit:
    """
    What a commit did: the ids of the files it published and of the
    versions it retired, or nothing if the transaction was committed
    already (a retried commit).
    """

    published: tuple[int, ...] = ()
    retired: tuple[int, ...] = ()
    already: bool = False


def _get(txn_id: str, lock: bool = False) -> Unit[tuple[int, str, float] | None]:
    """
    A step: the transaction's namespace id, state and expiry, or None;
    with C{lock}, its row locked until the end of the database transaction.
    """
    out = yield Query(_LOCK_TXN if lock else _GET_TXN, {"b_txn": txn_id})
    return tuple(out.rows[0]) if out.rows else None  # type: ignore[return-value]


def _open(txn_id: str, namespace: str, now: float) -> Unit[int]:
    """
    A step: the namespace id of open transaction C{txn_id} of C{namespace}.

    @raise TransactionError: it is unknown, expired, of another namespace,
        or prepared or committed already.
    """
    found = yield from _get(txn_id, lock=True)
    if found is None:
        raise _unknown(txn_id)
    ns_id, state, expires = found
    if state != "open":
        raise _state(txn_id, state, "it takes no more changes")
    if expires < now:
        raise _unknown(txn_id)
    ns = yield from get_namespace(namespace)
    if ns is None or ns.id != ns_id:
        raise TransactionError(
            ErrorCode.TXN_STATE, f"transaction {txn_id} is not of namespace {namespace!r}"
        )
    return ns_id


def _file(file_id: int, namespace: str) -> Unit[FileInfo | None]:
    """
    A step: pending file C{file_id} with the servers holding it, or None.
    """
    out = yield Query(_PENDING_FILE, {"b_file_id": file_id})
    if not out.rows:
        return None
    row = dict(zip((column.key for column in FILE_COLUMNS), out.rows[0], strict=True))
    held = yield Query(GOOD_REPLICAS, {"b_file_id": file_id})
    return FileInfo(
        namespace=namespace, replicas=tuple(sorted(server for (server,) in held.rows)), **row
    )


def _set_key(
    txn_id: str, namespace: str, key: str, file_id: int | None, now: float
) -> Unit[list[FileInfo]]:
    """
    A step: make C{key} publish C{file_id} (None: delete it) at commit;
    return the pending file it replaces, now discarded, if any.
    """
    out = yield Query(_TXN_KEY, {"b_txn": txn_id, "b_key": key})
    discarded: list[FileInfo] = []
    params = {"b_txn": txn_id, "b_key": key, "b_file_id": file_id}
    if out.rows:
        old = out.rows[0][0]
        if old is not None:
            info = yield from _file(old, namespace)
            yield from discard_pending(old, now)
            if info is not None:
                discarded.append(info)
        yield Query(_UPDATE_TXN_KEY, params)
    else:
        yield Query(_INSERT_TXN_KEY, params)
    return discarded


def _discard(txn_id: str, ns_id: int, now: float) -> Unit[list[FileInfo]]:
    """
    A step: discard every pending file of C{txn_id} and forget it.
    """
    out = yield Query(_NAMESPACE_NAME, {"b_namespace_id": ns_id})
    namespace = out.rows[0][0] if out.rows else ""
    keys = yield Query(_TXN_KEYS, {"b_txn": txn_id})
    discarded = []
    for _, file_id, _ in keys.rows:
        if file_id is not None:
            info = yield from _file(file_id, namespace)
            yield from discard_pending(file_id, now)
            if info is not None:
                discarded.append(info)
    yield Query(_DELETE_TXN_KEYS, {"b_txn": txn_id})
    yield Query(_DELETE_TXN, {"b_txn": txn_id})
    return discarded


@writer
def begin_txn(txn_id: str, namespace: str, now: float, expires: float) -> Unit[float]:
    """
    Open transaction C{txn_id} in C{namespace} (created if missing), to be
    collected at C{expires} unless used again before; return C{expires}.
    """
    ns = yield from ensure_namespace(namespace, now)
    yield Query(
        _INSERT_TXN,
        {"b_txn": txn_id, "b_namespace_id": ns.id, "b_now": now, "b_expires": expires},
    )
    return expires


@writer
def txn_put(
    txn_id: str,
    namespace: str,
    key: str,
    fid: str,
    path: str,
    size: int,
    sha256: str,
    now: float,
    server: str,
    expires: float,
) -> Unit[tuple[FileInfo, list[FileInfo]]]:
    """
    Record a pending file uploaded to C{server} in open transaction
    C{txn_id}, to be published under C{key} at commit, and push the
    transaction's expiry to C{expires}.  Return it, and the pending file
    of the same key it replaces (discarded), if any.
    """
    ns_id = yield from _open(txn_id, namespace, now)
    file_id = yield from new_file(
        "pending", ns_id, key, fid, path, size, sha256, now, ((server, now),)
    )
    discarded = yield from _set_key(txn_id, namespace, key, file_id, now)
    yield Query(_TOUCH_TXN, {"b_txn": txn_id, "b_expires": expires})
    info = FileInfo(
        id=file_id,
        fid=fid,
        namespace=namespace,
        key=key,
        size=size,
        sha256=sha256,
        created=now,
        path=path,
        replicas=(server,),
    )
    return info, discarded


@writer
def txn_delete(
    txn_id: str, namespace: str, key: str, now: float, expires: float
) -> Unit[tuple[bool, list[FileInfo]]]:
    """
    Record that open transaction C{txn_id} deletes C{key} at commit, if
    the key exists as the transaction sees it (its own pending file, or a
    live version it did not delete); return whether it did, and the
    pending file discarded, if any.
    """
    ns_id = yield from _open(txn_id, namespace, now)
    out = yield Query(_TXN_KEY, {"b_txn": txn_id, "b_key": key})
    if out.rows:
        found = out.rows[0][0] is not None
    else:
        live = yield Query(FIND_LIVE, {"b_namespace_id": ns_id, "b_key": key})
        found = bool(live.rows)
    discarded: list[FileInfo] = []
    if found:
        discarded = yield from _set_key(txn_id, namespace, key, None, now)
    yield Query(_TOUCH_TXN, {"b_txn": txn_id, "b_expires": expires})
    return found, discarded


@reader
def txn_lookup(txn_id: str, namespace: str, key: str) -> Unit[FileInfo | None]:
    """
    C{key} as transaction C{txn_id} sees it: its own pending file, None if
    it deleted the key, else the live version.
    """
    found = yield from _get(txn_id)
    if found is None:
        raise _unknown(txn_id)
    out = yield Query(_TXN_KEY, {"b_txn": txn_id, "b_key": key})
    if not out.rows:
        return (yield from lookup(namespace, key))
    if out.rows[0][0] is None:
        return None
    return (yield from _file(out.rows[0][0], namespace))


@reader
def txn_pending(txn_id: str, now: float) -> Unit[tuple[str, list[tuple[FileInfo, str | None]]]]:
    """
    Transaction C{txn_id}'s state and pending files, each with the server
    that vouched for it, if any: what a server checks before voting.

    @raise TransactionError: it is unknown or expired.
    """
    found = yield from _get(txn_id)
    if found is None or (found[1] == "open" and found[2] < now):
        raise _unknown(txn_id)
    ns_id, state, _ = found
    if state == "committed":
        return state, []
    out = yield Query(_NAMESPACE_NAME, {"b_namespace_id": ns_id})
    keys = yield Query(_TXN_KEYS, {"b_txn": txn_id})
    pending = []
    for _, file_id, voted in keys.rows:
        if file_id is not None:
            info = yield from _file(file_id, out.rows[0][0])
            if info is not None:
                pending.append((info, voted))
    return state, pending


@writer
def txn_vote(
    txn_id: str, server: str, file_ids: list[int], now: float, expires: float
) -> Unit[Vote]:
    """
    Record that C{server} vouches for pending files C{file_ids} of
    transaction C{txn_id}; once every pending file is vouched for, the
    transaction is prepared, to be collected at C{expires} if no client
    finishes it.
    """
    found = yield from _get(txn_id, lock=True)
    if found is None or (found[1] == "open" and found[2] < now):
        raise _unknown(txn_id)
    state = found[1]
    if state == "committed":
        return Vote(state, 0)
    for file_id in file_ids:
        yield Query(_VOTE, {"b_txn": txn_id, "b_file_id": file_id, "b_server": server})
    keys = yield Query(_TXN_KEYS, {"b_txn": txn_id})
    remaining = sum(1 for _, file_id, voted in keys.rows if file_id is not None and voted is None)
    if remaining == 0 and state == "open":
        state = "prepared"
        yield Query(_SET_TXN_STATE, {"b_txn": txn_id, "b_state": state, "b_expires": expires})
    return Vote(state, remaining)


@writer
def txn_commit(txn_id: str, now: float, keep: float, prepared: bool) -> Unit[Commit]:
    """
    Publish every pending file of transaction C{txn_id} and delete the keys
    it deleted, retiring the versions they replace, all at once; keep the
    transaction's row, as committed, until C{keep}, so that a retried
    commit (its answer lost) is answered, not refused.

    @param prepared: refuse an open transaction (two-phase commit).
    @raise TransactionError: the transaction is unknown or expired, or
        not prepared when it had to be.
    """
    found = yield from _get(txn_id, lock=True)
    if found is None:
        raise _unknown(txn_id)
    ns_id, state, expires = found
    if state == "committed":
        return Commit(already=True)
    if state == "open":
        if prepared:
            raise _state(txn_id, state, "it must be prepared before it is committed")
        if expires < now:
            raise _unknown(txn_id)
    keys = yield Query(_TXN_KEYS, {"b_txn": txn_id})
    yield Query(_DELETE_TXN_KEYS, {"b_txn": txn_id})
    published, retired = [], []
    # In key order: concurrent commits lock rows in the same order.
    for key, file_id, _ in sorted(keys.rows):
        old = yield from retire(ns_id, key, now)
        if old is not None:
            retired.append(old)
        if file_id is not None:
            new = yield from _publish(file_id)
            if new is None:
                raise _state(txn_id, state, f"the pending file of {key!r} is gone")
            published.append(new)
    yield Query(_SET_TXN_STATE, {"b_txn": txn_id, "b_state": "committed", "b_expires": keep})
    return Commit(tuple(published), tuple(retired))


def _publish(file_id: int) -> Unit[int | None]:
    """
    A step: make pending file C{file_id} live under a new id, with its
    copies; return the id, or None if there is no such pending file.

    A new id, not the pending one: ids then follow the order in which
    files became live, as for plain puts, so replicators' cursors (which
    other processes' commits do not move on SQLite) do not pass over it.
    """
    out = yield Query(_PENDING_ROW, {"b_file_id": file_id})
    if not out.rows:
        return None
    fid, ns_id, key, size, sha256, created, path = out.rows[0]
    held = yield Query(_REPLICAS_OF, {"b_file_id": file_id})
    yield from forget_file(file_id)
    new = yield from new_file("live", ns_id, key, fid, path, size, sha256, created, held.rows)
    return new


@writer
def txn_abort(txn_id: str, now: float) -> Unit[list[FileInfo]]:
    """
    Discard transaction C{txn_id}: its pending files become deleted (for
    their bytes to be reclaimed) and its rows go.  Return the files.  An
    unknown transaction is aborted already.

    @raise TransactionError: it was committed.
    """
    found = yield from _get(txn_id, lock=True)
    if found is None:
        return []
    if found[1] == "committed":
        raise _state(txn_id, "committed", "it can no longer be aborted")
    return (yield from _discard(txn_id, found[0], now))


@writer
def expire_txns(now: float, limit: int) -> Unit[list[FileInfo]]:
    """
    Abort up to C{limit} transactions whose clients went silent (open or
    prepared past their expiry), and forget committed ones kept long
    enough; return the pending files discarded.
    """
    out = yield Query(_EXPIRED_TXNS, {"b_now": now, "b_limit": limit})
    discarded: list[FileInfo] = []
    for txn_id, _ in out.rows:
        found = yield from _get(txn_id, lock=True)
        if found is None or found[2] >= now:
            continue  # finished, or used again, meanwhile
        if found[1] == "committed":
            yield Query(_DELETE_TXN_KEYS, {"b_txn": txn_id})
            yield Query(_DELETE_TXN, {"b_txn": txn_id})
        else:
            discarded.extend((yield from _discard(txn_id, found[0], now)))
    return discarded
