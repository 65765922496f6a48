"""
Namespaces and their settings: the units that find, create, list and
change them.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, Mapping

from sqlalchemy import bindparam, insert, select, update

from koboldfs.interfaces import NamespaceInfo
from koboldfs.metadata.schema import files, namespaces
from koboldfs.metadata.units import Query, Unit, reader, record, writer
from koboldfs.urls import check_template, new_secret

#: Where the rows of deleted files of removed namespaces wait
#: (L{koboldfs.metadata.buckets}): "~" is in no namespace name
#: (L{koboldfs.names.check_namespace}), and it is never listed.
GRAVEYARD = "~removed"

NAMESPACE_COLUMNS = tuple(namespaces.c[f.name] for f in fields(NamespaceInfo))
_GET_NAMESPACE = select(*NAMESPACE_COLUMNS).where(namespaces.c.name == bindparam("b_name"))
_INSERT_NAMESPACE = (
    insert(namespaces)
    .values(name=bindparam("b_name"), created=bindparam("b_now"))
    .returning(*NAMESPACE_COLUMNS)
)
_LIST_NAMESPACES = select(*NAMESPACE_COLUMNS)


@reader
def get_namespace(name: str) -> Unit[NamespaceInfo | None]:
    """
    The namespace called C{name}, or None.
    """
    out = yield Query(_GET_NAMESPACE, {"b_name": name})
    if not out.rows:
        return None
    return record(NamespaceInfo, NAMESPACE_COLUMNS, out.rows[0])


@writer
def ensure_namespace(name: str, now: float) -> Unit[NamespaceInfo]:
    """
    The namespace called C{name}, created at C{now} if missing.  Two servers
    creating it at once collide on its unique name; the retry finds it.
    """
    found = yield from get_namespace(name)
    if found is not None:
        return found
    out = yield Query(_INSERT_NAMESPACE, {"b_name": name, "b_now": now})
    return record(NamespaceInfo, NAMESPACE_COLUMNS, out.rows[0])


@reader
def list_namespaces() -> Unit[list[NamespaceInfo]]:
    """
    Every namespace with its settings, by name (sorted here: the database's
    collation may not be code-point order).
    """
    out = yield Query(_LIST_NAMESPACES)
    found = [record(NamespaceInfo, NAMESPACE_COLUMNS, row) for row in out.rows]
    return sorted(
        (namespace for namespace in found if namespace.name != GRAVEYARD),
        key=lambda namespace: namespace.name,
    )


#: The settings L{set_namespace} changes: the columns after C{created}.
_NAMESPACE_SETTINGS = (
    "replicas",
    "min_copies",
    "url_template",
    "private",
    "secret",
    "public_read",
)
_NAMESPACE_ID = bindparam("b_namespace_id")
_UPDATE_NAMESPACE = (
    update(namespaces)
    .where(namespaces.c.id == _NAMESPACE_ID)
    .values(**{c: bindparam(f"b_{c}") for c in _NAMESPACE_SETTINGS})
)
_HAS_FILES = select(files.c.id).where(files.c.namespace_id == _NAMESPACE_ID).limit(1)


def _check_settings(settings: Mapping[str, Any]) -> None:
    """
    @raise ValueError: a setting L{set_namespace} does not know, or a value
        that is not of its kind.
    """
    unknown = set(settings) - set(_NAMESPACE_SETTINGS)
    if unknown:
        raise ValueError(
            f"unknown namespace setting(s) {', '.join(sorted(unknown))}: "
            f"use {', '.join(_NAMESPACE_SETTINGS)}"
        )
    for name in ("replicas", "min_copies"):
        value = settings.get(name)
        if value is not None and (type(value) is not int or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, not {value!r}")
    for name in ("private", "public_read"):
        if name in settings and not isinstance(settings[name], bool):
            raise ValueError(f"{name} must be True or False, not {settings[name]!r}")
    secret = settings.get("secret")
    if secret is not None and (not isinstance(secret, str) or len(secret) < 16):
        raise ValueError("a namespace secret is a string of at least 16 characters")
    if settings.get("url_template") is not None:
        check_template(settings["url_template"])


@writer
def set_namespace(name: str, now: float, settings: Mapping[str, Any]) -> Unit[NamespaceInfo]:
    """
    Change C{settings} of namespace C{name}, created at C{now} if missing;
    return it as stored.  Making it private gives it a secret if it has
    none.

    @raise ValueError: a bad setting, or a change of C{private} once the
        namespace has files: their paths on disk say whether they are
        private (see L{koboldfs.storage.relpath_for}).
    """
    _check_settings(settings)
    if settings.get("private") and name in (".", ".."):
        raise ValueError(f"namespace {name!r} cannot be private: it names no directory")
    current = yield from ensure_namespace(name, now)
    new = replace(current, **settings)
    if new.private and new.secret is None:
        new = replace(new, secret=new_secret())
    if new.private != current.private:
        out = yield Query(_HAS_FILES, {"b_namespace_id": current.id})
        if out.rows:
            raise ValueError(
                f"namespace {name!r} has files: it can no longer be made "
                f"{'private' if new.private else 'public'}"
            )
    params = {f"b_{c}": getattr(new, c) for c in _NAMESPACE_SETTINGS}
    yield Query(_UPDATE_NAMESPACE, {"b_namespace_id": current.id, **params})
    return new
