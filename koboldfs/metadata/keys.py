"""
Client keys of namespaces (docs/security.md): the units that record, find,
list and revoke them.
"""

from __future__ import annotations


from sqlalchemy import bindparam, insert, select
from sqlalchemy import delete as sql_delete

from koboldfs.auth import KeyInfo
from koboldfs.metadata.namespaces import ensure_namespace
from koboldfs.metadata.schema import client_keys, namespaces
from koboldfs.metadata.units import Query, Unit, reader, writer

_KEY_COLUMNS = (
    namespaces.c.name,
    client_keys.c.key_id,
    client_keys.c.stored_key,
    client_keys.c.readonly,
    client_keys.c.created,
)
_KEYS_OF = select(*_KEY_COLUMNS).join_from(
    client_keys, namespaces, client_keys.c.namespace_id == namespaces.c.id
)
_FIND_KEY = _KEYS_OF.where(
    namespaces.c.name == bindparam("b_name"), client_keys.c.key_id == bindparam("b_key_id")
)
_NAMESPACE_KEYS = _KEYS_OF.where(namespaces.c.name == bindparam("b_name")).order_by(
    client_keys.c.created, client_keys.c.key_id
)
_INSERT_KEY = insert(client_keys).values(
    key_id=bindparam("b_key_id"),
    namespace_id=bindparam("b_namespace_id"),
    stored_key=bindparam("b_stored_key"),
    readonly=bindparam("b_readonly"),
    created=bindparam("b_now"),
)
_DELETE_KEY = sql_delete(client_keys).where(
    client_keys.c.key_id == bindparam("b_key_id"),
    client_keys.c.namespace_id.in_(
        select(namespaces.c.id).where(namespaces.c.name == bindparam("b_name"))
    ),
)


def _key(row: tuple) -> KeyInfo:
    name, key_id, stored_key, readonly, created = row
    return KeyInfo(name, key_id, stored_key, bool(readonly), created)


@writer
def add_key(
    namespace: str, key_id: str, stored_key: str, readonly: bool, now: float
) -> Unit[KeyInfo]:
    """
    Record a key of C{namespace} (created at C{now} if missing), by the
    stored form L{koboldfs.auth.new_key} made.
    """
    ns = yield from ensure_namespace(namespace, now)
    yield Query(
        _INSERT_KEY,
        {
            "b_key_id": key_id,
            "b_namespace_id": ns.id,
            "b_stored_key": stored_key,
            "b_readonly": readonly,
            "b_now": now,
        },
    )
    return KeyInfo(namespace, key_id, stored_key, readonly, now)


@reader
def find_key(namespace: str, key_id: str) -> Unit[KeyInfo | None]:
    """
    Key C{key_id} of C{namespace}, or None.
    """
    out = yield Query(_FIND_KEY, {"b_name": namespace, "b_key_id": key_id})
    return _key(out.rows[0]) if out.rows else None


@reader
def namespace_keys(namespace: str) -> Unit[list[KeyInfo]]:
    """
    The keys of C{namespace}, oldest first.
    """
    out = yield Query(_NAMESPACE_KEYS, {"b_name": namespace})
    return [_key(row) for row in out.rows]


@writer
def revoke_key(namespace: str, key_id: str) -> Unit[bool]:
    """
    Forget key C{key_id} of C{namespace}; return whether it existed.
    """
    out = yield Query(_DELETE_KEY, {"b_name": namespace, "b_key_id": key_id})
    return out.rowcount > 0
