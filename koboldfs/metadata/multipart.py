"""
Multipart uploads (docs/s3-store.md): the units that open, list, complete,
abort and expire them, and record their parts.

A part is a file row of its own in state C{part}, held by the servers
that took it (and its copies), invisible to every reader; C{s3_parts}
maps an upload's part numbers to those rows.  Completing publishes the
object, assembled by the core into a new file, and discards the parts:
their rows turn C{deleted}, and every holder's replicator reclaims their
bytes as for any deleted file.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache
from typing import Any, Mapping

from sqlalchemy import BindParameter, Select, and_, bindparam, delete, insert, or_, select, update

from koboldfs.errors import MultipartError
from koboldfs.interfaces import Extras, FileInfo, PartInfo, UploadInfo
from koboldfs.metadata.files import (
    FILE_COLUMNS,
    discard_part,
    holders_of,
    new_file,
    publish,
)
from koboldfs.metadata.namespaces import ensure_namespace
from koboldfs.metadata.schema import files, namespaces, replicas, s3_parts, s3_uploads
from koboldfs.metadata.units import Query, Unit, reader, writer
from koboldfs.names import key_upper_bound

_UPLOAD_ID: BindParameter[str] = bindparam("b_upload_id")
_UPLOAD_COLUMNS = (
    s3_uploads.c.upload_id,
    namespaces.c.name,
    s3_uploads.c.key,
    s3_uploads.c.attributes,
    s3_uploads.c.created,
)
_UPLOADS = select(*_UPLOAD_COLUMNS, s3_uploads.c.namespace_id).join_from(
    s3_uploads, namespaces, s3_uploads.c.namespace_id == namespaces.c.id
)
_FIND_UPLOAD = _UPLOADS.where(s3_uploads.c.upload_id == _UPLOAD_ID)
_INSERT_UPLOAD = insert(s3_uploads).values(
    upload_id=_UPLOAD_ID,
    namespace_id=bindparam("b_namespace_id"),
    key=bindparam("b_key"),
    attributes=bindparam("b_attributes", type_=s3_uploads.c.attributes.type),
    created=bindparam("b_now"),
)
_PART_FILES = (
    select(s3_parts.c.number, *FILE_COLUMNS)
    .join_from(s3_parts, files, s3_parts.c.file_id == files.c.id)
    .where(s3_parts.c.upload_id == _UPLOAD_ID, s3_parts.c.number > bindparam("b_after"))
    .order_by(s3_parts.c.number)
    .limit(bindparam("b_limit"))
)
_PART_HOLDERS = (
    select(replicas.c.file_id, replicas.c.server)
    .join_from(replicas, s3_parts, s3_parts.c.file_id == replicas.c.file_id)
    .where(s3_parts.c.upload_id == _UPLOAD_ID, replicas.c.state == "ok")
)
_PART_OF = select(s3_parts.c.number, s3_parts.c.file_id).where(s3_parts.c.upload_id == _UPLOAD_ID)
_PART_NUMBER = s3_parts.c.number == bindparam("b_number")
_PART_NUMBERED = _PART_OF.where(_PART_NUMBER)
_INSERT_PART = insert(s3_parts).values(
    upload_id=_UPLOAD_ID, number=bindparam("b_number"), file_id=bindparam("b_file_id")
)
_REPLACE_PART = (
    update(s3_parts)
    .where(s3_parts.c.upload_id == _UPLOAD_ID, _PART_NUMBER)
    .values(file_id=bindparam("b_file_id"))
)
_DELETE_PARTS = delete(s3_parts).where(s3_parts.c.upload_id == _UPLOAD_ID)
_DELETE_UPLOAD = delete(s3_uploads).where(s3_uploads.c.upload_id == _UPLOAD_ID)
_EXPIRED = (
    select(s3_uploads.c.upload_id)
    .where(s3_uploads.c.created < bindparam("b_before"))
    .order_by(s3_uploads.c.created)
    .limit(bindparam("b_limit"))
)


def _upload(row: tuple) -> UploadInfo:
    upload_id, namespace, key, attributes, created = row[:5]
    return UploadInfo(upload_id, namespace, key, attributes, created)


def _found(upload_id: str) -> Unit[tuple[UploadInfo, int]]:
    """
    A step: upload C{upload_id} and its namespace's id.

    @raise MultipartError: C{NoSuchUpload}: never begun, completed,
        aborted, or expired.
    """
    out = yield Query(_FIND_UPLOAD, {"b_upload_id": upload_id})
    if not out.rows:
        raise MultipartError("NoSuchUpload", f"no multipart upload {upload_id}")
    return _upload(out.rows[0]), out.rows[0][5]


@writer
def create_upload(
    upload_id: str, namespace: str, key: str, attributes: Mapping[str, str] | None, now: float
) -> Unit[UploadInfo]:
    """
    Open upload C{upload_id} of C{key} (its namespace created if missing).
    """
    ns = yield from ensure_namespace(namespace, now)
    yield Query(
        _INSERT_UPLOAD,
        {
            "b_upload_id": upload_id,
            "b_namespace_id": ns.id,
            "b_key": key,
            "b_attributes": attributes,
            "b_now": now,
        },
    )
    return UploadInfo(upload_id, namespace, key, attributes, now)


@reader
def find_upload(upload_id: str) -> Unit[UploadInfo | None]:
    """
    Upload C{upload_id}, or None.
    """
    out = yield Query(_FIND_UPLOAD, {"b_upload_id": upload_id})
    return _upload(out.rows[0]) if out.rows else None


@cache
def _uploads_query(prefix: bool, bound: bool, after: bool) -> Select[Any]:
    """
    Uploads of namespace C{b_namespace}, by key then id, up to C{b_limit}:
    from C{b_prefix}, below C{b_bound}, after C{(b_after_key,
    b_after_id)}, as asked.
    """
    conditions = [namespaces.c.name == bindparam("b_namespace")]
    if prefix:
        conditions.append(s3_uploads.c.key >= bindparam("b_prefix"))
    if bound:
        conditions.append(s3_uploads.c.key < bindparam("b_bound"))
    if after:
        after_key: BindParameter[str] = bindparam("b_after_key")
        conditions.append(
            or_(
                s3_uploads.c.key > after_key,
                and_(
                    s3_uploads.c.key == after_key,
                    s3_uploads.c.upload_id > bindparam("b_after_id"),
                ),
            )
        )
    return (
        _UPLOADS.where(*conditions)
        .order_by(s3_uploads.c.key, s3_uploads.c.upload_id)
        .limit(bindparam("b_limit"))
    )


@reader
def list_uploads(
    namespace: str, prefix: str, after: tuple[str, str] | None, limit: int
) -> Unit[list[UploadInfo]]:
    """
    Up to C{limit} uploads of C{namespace} whose keys start with
    C{prefix}, by key and then id, after C{after} (C{(key, upload_id)}).
    """
    if limit <= 0:
        return []
    bound = key_upper_bound(prefix) if prefix else None
    query = _uploads_query(bool(prefix), bound is not None, after is not None)
    params = {
        "b_namespace": namespace,
        "b_prefix": prefix,
        "b_bound": bound,
        "b_after_key": after[0] if after else None,
        "b_after_id": after[1] if after else None,
        "b_limit": limit,
    }
    out = yield Query(query, params)
    return [_upload(row) for row in out.rows]


def _parts(upload: UploadInfo, after: int, limit: int) -> Unit[list[PartInfo]]:
    """
    A step: up to C{limit} parts of C{upload} numbered above C{after}, by
    number, each with the servers holding a good copy.
    """
    params = {"b_upload_id": upload.upload_id}
    out = yield Query(_PART_FILES, {**params, "b_after": after, "b_limit": limit})
    held = yield Query(_PART_HOLDERS, params)
    servers: dict[int, list[str]] = {}
    for file_id, server in held.rows:
        servers.setdefault(file_id, []).append(server)
    names = [column.key for column in FILE_COLUMNS]
    found = []
    for number, *row in out.rows:
        columns = dict(zip(names, row, strict=True))
        holders = tuple(sorted(servers.get(columns["id"], ())))
        info = FileInfo(namespace=upload.namespace, replicas=holders, **columns)
        found.append(PartInfo(number, info))
    return found


@reader
def upload_parts(upload_id: str, after: int, limit: int) -> Unit[list[PartInfo]]:
    """
    Up to C{limit} parts of upload C{upload_id} numbered above C{after}.

    @raise MultipartError: C{NoSuchUpload}.
    """
    upload, _ = yield from _found(upload_id)
    return (yield from _parts(upload, after, limit))


@writer
def add_part(
    upload_id: str,
    number: int,
    fid: str,
    path: str,
    size: int,
    sha256: str,
    md5: str,
    now: float,
    server: str,
    also: tuple[str, ...],
) -> Unit[PartInfo]:
    """
    Record part C{number} of upload C{upload_id}, stored as C{fid} on
    C{server} and the servers C{also}; a part of that number already
    recorded is replaced, its file discarded.

    @raise MultipartError: C{NoSuchUpload}.
    """
    upload, ns_id = yield from _found(upload_id)
    holders = holders_of(server, also)
    file_id = yield from new_file(
        "part",
        ns_id,
        upload.key,
        fid,
        path,
        size,
        sha256,
        now,
        ((name, now) for name in holders),
        md5=md5,
    )
    part = {"b_upload_id": upload_id, "b_number": number}
    out = yield Query(_PART_NUMBERED, part)
    if out.rows:
        yield from discard_part(out.rows[0][1], now)
        yield Query(_REPLACE_PART, {**part, "b_file_id": file_id})
    else:
        yield Query(_INSERT_PART, {**part, "b_file_id": file_id})
    info = FileInfo(
        id=file_id,
        fid=fid,
        namespace=upload.namespace,
        key=upload.key,
        size=size,
        sha256=sha256,
        created=now,
        path=path,
        replicas=tuple(sorted(holders)),
        md5=md5,
    )
    return PartInfo(number, info)


@reader
def find_part(upload_id: str, number: int) -> Unit[PartInfo | None]:
    """
    Part C{number} of upload C{upload_id}, or None.
    """
    out = yield Query(_FIND_UPLOAD, {"b_upload_id": upload_id})
    if not out.rows:
        return None
    parts = yield from _parts(_upload(out.rows[0]), number - 1, 1)
    return parts[0] if parts and parts[0].number == number else None


def _close(upload_id: str, now: float) -> Unit[list[int]]:
    """
    A step: the upload's parts discarded, its rows gone; return the ids
    of its parts' files.
    """
    out = yield Query(_PART_OF, {"b_upload_id": upload_id})
    for _, file_id in out.rows:
        yield from discard_part(file_id, now)
    yield Query(_DELETE_PARTS, {"b_upload_id": upload_id})
    yield Query(_DELETE_UPLOAD, {"b_upload_id": upload_id})
    return [file_id for _, file_id in out.rows]


@writer
def complete_upload(
    upload_id: str,
    chosen: tuple[tuple[int, int], ...],
    fid: str,
    path: str,
    size: int,
    sha256: str,
    now: float,
    server: str,
    also: tuple[str, ...],
    extras: Extras,
) -> Unit[FileInfo]:
    """
    Publish the object assembled from the parts C{chosen} (C{(number,
    file id)} pairs, as they were when the core read them), stored as
    C{fid}, with C{extras} (its MD5 of MD5s, its number of parts) and the
    upload's attributes; close the upload.

    @raise MultipartError: C{NoSuchUpload}; C{InvalidPart} if a chosen
        part was replaced meanwhile (the bytes assembled are not its).
    """
    upload, ns_id = yield from _found(upload_id)
    out = yield Query(_PART_OF, {"b_upload_id": upload_id})
    current = dict(out.rows)
    for number, file_id in chosen:
        if current.get(number) != file_id:
            raise MultipartError("InvalidPart", f"part {number} was replaced meanwhile")
    holders = holders_of(server, also)
    info = yield from publish(
        ns_id,
        upload.namespace,
        upload.key,
        fid,
        path,
        size,
        sha256,
        now,
        holders,
        replace(extras, attributes=upload.attributes),
    )
    yield from _close(upload_id, now)
    return info


@writer
def abort_upload(upload_id: str, now: float) -> Unit[list[int]]:
    """
    Give upload C{upload_id} up: its parts discarded; return their files'
    ids.

    @raise MultipartError: C{NoSuchUpload}.
    """
    yield from _found(upload_id)
    return (yield from _close(upload_id, now))


@writer
def expire_uploads(before: float, now: float, limit: int) -> Unit[tuple[list[str], list[int]]]:
    """
    Abort up to C{limit} uploads begun before C{before}, oldest first;
    return their ids and their parts' files' ids.
    """
    out = yield Query(_EXPIRED, {"b_before": before, "b_limit": limit})
    expired = [upload_id for (upload_id,) in out.rows]
    discarded = []
    for upload_id in expired:
        discarded += yield from _close(upload_id, now)
    return expired, discarded
