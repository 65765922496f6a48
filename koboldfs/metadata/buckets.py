"""
Removing an empty namespace (S3's DeleteBucket): the unit, which touches
every table that names a namespace.

A namespace is empty when it has no live, pending or part file, no
multipart upload and no transaction under way.  Its deleted files may
still wait for the replicators to reclaim their bytes: their rows move to
the hidden namespace L{GRAVEYARD} (a name no namespace may have), so that
the namespace's own row can go, and a put that read its id just before
fails on the foreign key, is run again by its driver, and creates the
namespace afresh rather than landing in a removed one.
"""

from __future__ import annotations

from sqlalchemy import BindParameter, bindparam, delete, literal_column, or_, select, update

from koboldfs.metadata.namespaces import GRAVEYARD, ensure_namespace
from koboldfs.metadata.schema import (
    client_keys,
    files,
    namespaces,
    s3_uploads,
    transactions,
    txn_keys,
)
from koboldfs.metadata.units import Query, Unit, writer

_ID: BindParameter[int] = bindparam("b_namespace_id")
_LOCK = select(namespaces.c.id).where(namespaces.c.name == bindparam("b_name")).with_for_update()
_IN_USE = (
    select(files.c.id)
    .where(
        files.c.namespace_id == _ID,
        or_(
            *(
                files.c.state == literal_column(f"'{state}'")
                for state in ("live", "pending", "part")
            )
        ),
    )
    .limit(1)
)
_UPLOADS = select(s3_uploads.c.upload_id).where(s3_uploads.c.namespace_id == _ID).limit(1)
_OPEN_TXNS = (
    select(transactions.c.id)
    .where(transactions.c.namespace_id == _ID, transactions.c.state != "committed")
    .limit(1)
)
_BURY = (
    update(files).where(files.c.namespace_id == _ID).values(namespace_id=bindparam("b_graveyard"))
)
_DONE_TXNS = select(transactions.c.id).where(transactions.c.namespace_id == _ID)
_FORGET_TXN_KEYS = delete(txn_keys).where(txn_keys.c.txn_id.in_(_DONE_TXNS.scalar_subquery()))
_FORGET_TXNS = delete(transactions).where(transactions.c.namespace_id == _ID)
_FORGET_KEYS = delete(client_keys).where(client_keys.c.namespace_id == _ID)
_FORGET = delete(namespaces).where(namespaces.c.id == _ID)


@writer
def delete_namespace(name: str, now: float) -> Unit[str]:
    """
    Remove namespace C{name} if it is empty, with its client keys and the
    memory of its committed transactions; return C{"deleted"},
    C{"not-empty"} or C{"missing"}.  Its row is locked first (PostgreSQL),
    so a put that is recording a file into it now is waited for, and seen.
    """
    out = yield Query(_LOCK, {"b_name": name})
    if not out.rows:
        return "missing"
    ns = {"b_namespace_id": out.rows[0][0]}
    for in_use in (_IN_USE, _UPLOADS, _OPEN_TXNS):
        found = yield Query(in_use, ns)
        if found.rows:
            return "not-empty"
    graveyard = yield from ensure_namespace(GRAVEYARD, now)
    yield Query(_BURY, {**ns, "b_graveyard": graveyard.id})
    for forget in (_FORGET_TXN_KEYS, _FORGET_TXNS, _FORGET_KEYS, _FORGET):
        yield Query(forget, ns)
    return "deleted"
