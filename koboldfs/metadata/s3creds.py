"""
S3 credentials and their grants (docs/security.md): the units that
record, find, list, touch and revoke them.
"""

from __future__ import annotations

from sqlalchemy import BindParameter, bindparam, delete, insert, select, update

from koboldfs.interfaces import S3CredentialInfo, S3Grant
from koboldfs.metadata.schema import s3_credentials, s3_grants
from koboldfs.metadata.units import Query, Unit, reader, writer

_ACCESS_KEY: BindParameter[str] = bindparam("b_access_key")
_CREDENTIAL_COLUMNS = (
    s3_credentials.c.access_key,
    s3_credentials.c.sealed,
    s3_credentials.c.cluster,
    s3_credentials.c.created,
    s3_credentials.c.last_used,
)
_FIND = select(*_CREDENTIAL_COLUMNS).where(s3_credentials.c.access_key == _ACCESS_KEY)
_ALL = select(*_CREDENTIAL_COLUMNS).order_by(s3_credentials.c.created, s3_credentials.c.access_key)
_GRANTS_OF = (
    select(s3_grants.c.namespace, s3_grants.c.readonly)
    .where(s3_grants.c.access_key == _ACCESS_KEY)
    .order_by(s3_grants.c.namespace)
)
_ALL_GRANTS = select(s3_grants.c.access_key, s3_grants.c.namespace, s3_grants.c.readonly)
_INSERT = insert(s3_credentials).values(
    access_key=_ACCESS_KEY,
    sealed=bindparam("b_sealed"),
    cluster=bindparam("b_cluster"),
    created=bindparam("b_now"),
)
_INSERT_GRANT = insert(s3_grants).values(
    access_key=_ACCESS_KEY, namespace=bindparam("b_namespace"), readonly=bindparam("b_readonly")
)
_TOUCH = (
    update(s3_credentials)
    .where(s3_credentials.c.access_key == _ACCESS_KEY)
    .values(last_used=bindparam("b_now"))
)
_DELETE_GRANTS = delete(s3_grants).where(s3_grants.c.access_key == _ACCESS_KEY)
_DELETE = delete(s3_credentials).where(s3_credentials.c.access_key == _ACCESS_KEY)


def _info(row: tuple, grants: list[tuple[str, bool]]) -> S3CredentialInfo:
    access_key, sealed, cluster, created, last_used = row
    found = [S3Grant(None, True)] if cluster else []
    found += [S3Grant(namespace, not readonly) for namespace, readonly in sorted(grants)]
    return S3CredentialInfo(access_key, sealed, tuple(found), created, last_used)


@writer
def add_s3_credential(
    access_key: str, sealed: str, grants: tuple[S3Grant, ...], now: float
) -> Unit[S3CredentialInfo]:
    """
    Record a credential with its sealed secret and C{grants}; a grant of
    namespace None makes it cluster-wide.
    """
    cluster = any(grant.namespace is None for grant in grants)
    yield Query(
        _INSERT,
        {"b_access_key": access_key, "b_sealed": sealed, "b_cluster": cluster, "b_now": now},
    )
    named = {grant.namespace: grant.write for grant in grants if grant.namespace is not None}
    for namespace, write in named.items():
        yield Query(
            _INSERT_GRANT,
            {"b_access_key": access_key, "b_namespace": namespace, "b_readonly": not write},
        )
    return _info(
        (access_key, sealed, cluster, now, None),
        [(namespace, not write) for namespace, write in named.items()],
    )


@reader
def find_s3_credential(access_key: str) -> Unit[S3CredentialInfo | None]:
    """
    Credential C{access_key} with its grants, or None.
    """
    out = yield Query(_FIND, {"b_access_key": access_key})
    if not out.rows:
        return None
    grants = yield Query(_GRANTS_OF, {"b_access_key": access_key})
    return _info(out.rows[0], [(ns, bool(readonly)) for ns, readonly in grants.rows])


@reader
def list_s3_credentials() -> Unit[list[S3CredentialInfo]]:
    """
    Every credential with its grants, oldest first.
    """
    out = yield Query(_ALL)
    grants = yield Query(_ALL_GRANTS)
    by_key: dict[str, list[tuple[str, bool]]] = {}
    for access_key, namespace, readonly in grants.rows:
        by_key.setdefault(access_key, []).append((namespace, bool(readonly)))
    return [_info(row, by_key.get(row[0], [])) for row in out.rows]


@writer
def touch_s3_credential(access_key: str, now: float) -> Unit[None]:
    """
    Record that credential C{access_key} was used at C{now}.
    """
    yield Query(_TOUCH, {"b_access_key": access_key, "b_now": now})


@writer
def revoke_s3_credential(access_key: str) -> Unit[bool]:
    """
    Forget credential C{access_key} and its grants; return whether it
    existed.
    """
    yield Query(_DELETE_GRANTS, {"b_access_key": access_key})
    out = yield Query(_DELETE, {"b_access_key": access_key})
    return out.rowcount > 0
