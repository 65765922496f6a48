"""
S3's XML: bounded, safe parsing of the request bodies clients send, and
rendering of the responses as AWS writes them.

Parsing goes through defusedxml, which refuses DTDs, entity declarations
and external references (no billion laughs, no external entities), and
only after the body's size is checked: every body is at most the limit
given (L{MAX_BODY} by default), and the caller collects at most that
many bytes (L{check_length} on C{Content-Length} first).  Namespaces
are accepted or not (boto3 sends S3's, others none).

Rendering follows AWS's example responses: S3's namespace on the root,
element order, timestamps as C{2026-12-07T16:49:07.000Z}, ETags in
quotes (escaped as C{&quot;}).  With C{encoding-type=url}, keys and
prefixes are percent-encoded (L{url_encode}); without it, characters XML
1.0 cannot carry are written as character references, as S3 does.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

import defusedxml  # type: ignore[import-untyped]
import defusedxml.ElementTree as SafeET  # type: ignore[import-untyped]

from koboldfs.s3.errors import (
    InvalidArgument,
    InvalidPartOrder,
    MalformedXML,
    MaxMessageLengthExceeded,
    MissingRequestBodyError,
)
from koboldfs.s3.headers import format_iso8601
from koboldfs.s3.uri import is_decimal

NAMESPACE = "http://s3.amazonaws.com/doc/2006-03-01/"
DECLARATION = '<?xml version="1.0" encoding="UTF-8"?>\n'
#: The largest request body parsed: 10,000 parts or 1,000 keys fit well.
MAX_BODY = 8 * 1024 * 1024
MAX_PARTS = 10000
MAX_DELETE_KEYS = 1000


# -- parsing ------------------------------------------------------------------


def check_length(length: int | None, limit: int = MAX_BODY) -> None:
    """
    Refuse a body whose C{Content-Length} is over C{limit} before reading it.
    """
    if length is not None and length > limit:
        raise MaxMessageLengthExceeded(f"Your request was too big: at most {limit} bytes")


def _parse(body: bytes, root: str, limit: int) -> ET.Element:
    if len(body) > limit:
        raise MaxMessageLengthExceeded(f"Your request was too big: at most {limit} bytes")
    if not body.strip():
        raise MissingRequestBodyError()
    try:
        element = SafeET.fromstring(body, forbid_dtd=True, forbid_entities=True,
                                    forbid_external=True)
    except (ET.ParseError, defusedxml.DefusedXmlException, ValueError):
        raise MalformedXML() from None
    if _local(element.tag) != root:
        raise MalformedXML(f"The XML you provided was not a {root} document")
    return element


def _local(tag: str) -> str:
    """
    An element's name without its namespace (C{{ns}Name} -> C{Name}).
    """
    return tag.rsplit("}", 1)[-1]


def _children(element: ET.Element, name: str) -> list[ET.Element]:
    return [child for child in element if _local(child.tag) == name]


def _text(element: ET.Element, name: str, required: bool = True) -> str | None:
    found = _children(element, name)
    if len(found) > 1:
        raise MalformedXML(f"More than one {name}")
    if not found:
        if required:
            raise MalformedXML(f"Missing {name}")
        return None
    if len(found[0]):
        raise MalformedXML(f"{name} has child elements")
    return found[0].text or ""


@dataclass(frozen=True)
class CompletedPart:
    """
    A part named in CompleteMultipartUpload.

    @ivar etag: as the client sent it, quotes removed.
    @ivar checksums: C{ChecksumCRC32} etc. -> base64 value, when sent.
    """

    number: int
    etag: str
    checksums: dict[str, str] = field(default_factory=dict)


_CHECKSUM_ELEMENTS = ("ChecksumCRC32", "ChecksumCRC32C", "ChecksumCRC64NVME", "ChecksumSHA1",
                      "ChecksumSHA256")


def parse_complete_multipart_upload(body: bytes, limit: int = MAX_BODY) -> list[CompletedPart]:
    """
    The parts of a CompleteMultipartUpload body, in order.

    @raise MalformedXML: not such a document, no part, a part number that
        is not a number, more than 10,000 parts.
    @raise InvalidArgument: a part number out of 1..10000.
    @raise InvalidPartOrder: part numbers not strictly ascending.
    """
    root = _parse(body, "CompleteMultipartUpload", limit)
    parts = _children(root, "Part")
    if not parts or len(parts) > MAX_PARTS:
        raise MalformedXML(f"CompleteMultipartUpload needs 1 to {MAX_PARTS} parts")
    out: list[CompletedPart] = []
    for element in parts:
        number_text = (_text(element, "PartNumber") or "").strip()
        if not is_decimal(number_text, 9):
            raise MalformedXML("PartNumber is not a number")
        number = int(number_text)
        if not 1 <= number <= MAX_PARTS:
            raise InvalidArgument("Part number must be an integer between 1 and 10000, inclusive",
                                  ArgumentName="partNumber", ArgumentValue=number)
        if out and number <= out[-1].number:
            raise InvalidPartOrder()
        etag = (_text(element, "ETag") or "").strip().strip('"')
        checksums = {}
        for name in _CHECKSUM_ELEMENTS:
            value = _text(element, name, required=False)
            if value is not None:
                checksums[name] = value.strip()
        out.append(CompletedPart(number, etag, checksums))
    return out


@dataclass(frozen=True)
class DeleteRequest:
    """
    A DeleteObjects body: the keys (with a version id or None) and
    whether only errors are reported (C{Quiet}).
    """

    objects: list[tuple[str, str | None]]
    quiet: bool


def parse_delete(body: bytes, limit: int = MAX_BODY) -> DeleteRequest:
    """
    The keys of a DeleteObjects (C{POST ?delete}) body.

    @raise MalformedXML: not such a document, no key or more than 1,000,
        a Quiet that is not a boolean.
    """
    root = _parse(body, "Delete", limit)
    quiet_text = _text(root, "Quiet", required=False)
    quiet = False
    if quiet_text is not None:
        value = quiet_text.strip().lower()
        if value not in ("true", "false"):
            raise MalformedXML("Quiet must be true or false")
        quiet = value == "true"
    elements = _children(root, "Object")
    if not elements or len(elements) > MAX_DELETE_KEYS:
        raise MalformedXML(f"Delete needs 1 to {MAX_DELETE_KEYS} objects")
    objects = []
    for element in elements:
        key = _text(element, "Key")
        assert key is not None
        objects.append((key, _text(element, "VersionId", required=False)))
    return DeleteRequest(objects, quiet)


def parse_create_bucket(body: bytes, limit: int = 64 * 1024) -> str | None:
    """
    The C{LocationConstraint} of a CreateBucket body; None for an empty
    body or no constraint.
    """
    if not body.strip():
        return None
    root = _parse(body, "CreateBucketConfiguration", limit)
    value = _text(root, "LocationConstraint", required=False)
    return value.strip() or None if value is not None else None


# -- rendering ----------------------------------------------------------------

#: Characters XML 1.0 cannot carry, and CR (which parsers would turn into LF).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0d\x0e-\x1f\ufffe\uffff]|[\ud800-\udfff]")


def _escape(text: str) -> str:
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = text.replace('"', "&quot;")
    return _NOT_XML.sub(lambda m: f"&#x{ord(m.group()):X};", text)


def url_encode(value: str) -> str:
    """
    A key or prefix as C{encoding-type=url} sends it (clients decode it
    with C{unquote_plus}, so C{+} must be encoded, as it is here).
    """
    return quote(value.encode("utf-8", "surrogateescape"), safe="/")


class _Writer:
    def __init__(self, root: str) -> None:
        self.root = root
        self.parts = [DECLARATION, f'<{root} xmlns="{NAMESPACE}">']

    def add(self, name: str, value: object) -> None:
        if value is None:
            return
        if isinstance(value, bool):
            value = "true" if value else "false"
        self.parts.append(f"<{name}>{_escape(str(value))}</{name}>")

    def open(self, name: str) -> None:
        self.parts.append(f"<{name}>")

    def close(self, name: str) -> None:
        self.parts.append(f"</{name}>")

    def done(self) -> bytes:
        self.parts.append(f"</{self.root}>")
        return "".join(self.parts).encode("utf-8", "surrogateescape")


def quote_etag(etag: str) -> str:
    """
    An ETag as headers and XML carry it: in double quotes.
    """
    return etag if etag.startswith('"') else f'"{etag}"'


@dataclass(frozen=True)
class Owner:
    id: str
    display_name: str


def _owner(w: _Writer, owner: Owner | None, name: str = "Owner") -> None:
    if owner is not None:
        w.open(name)
        w.add("ID", owner.id)
        w.add("DisplayName", owner.display_name)
        w.close(name)


@dataclass(frozen=True)
class Bucket:
    name: str
    created: float


def list_buckets(owner: Owner, buckets: Iterable[Bucket]) -> bytes:
    """
    ListAllMyBucketsResult.
    """
    w = _Writer("ListAllMyBucketsResult")
    _owner(w, owner)
    w.open("Buckets")
    for bucket in buckets:
        w.open("Bucket")
        w.add("Name", bucket.name)
        w.add("CreationDate", format_iso8601(bucket.created))
        w.close("Bucket")
    w.close("Buckets")
    return w.done()


@dataclass(frozen=True)
class ObjectEntry:
    """
    An object in a listing.

    @ivar etag: unquoted.
    @ivar modified: POSIX seconds.
    """

    key: str
    modified: float
    etag: str
    size: int
    storage_class: str = "STANDARD"
    owner: Owner | None = None
    checksum_algorithm: str | None = None


@dataclass
class Listing:
    """
    One page of a bucket listing, as the store produced it, and the
    request's parameters echoed back.

    @ivar url: C{encoding-type=url} was asked for.
    """

    bucket: str
    prefix: str = ""
    delimiter: str | None = None
    max_keys: int = 1000
    truncated: bool = False
    objects: Sequence[ObjectEntry] = ()
    common_prefixes: Sequence[str] = ()
    url: bool = False


def _key(listing: Listing, value: str | None) -> str | None:
    if value is None:
        return None
    return url_encode(value) if listing.url else value


def _contents(w: _Writer, listing: Listing, fetch_owner: bool) -> None:
    for entry in listing.objects:
        w.open("Contents")
        w.add("Key", _key(listing, entry.key))
        w.add("LastModified", format_iso8601(entry.modified))
        w.add("ETag", quote_etag(entry.etag))
        w.add("ChecksumAlgorithm", entry.checksum_algorithm)
        w.add("Size", entry.size)
        if fetch_owner:
            _owner(w, entry.owner)
        w.add("StorageClass", entry.storage_class)
        w.close("Contents")
    _common_prefixes(w, listing)


def _common_prefixes(w: _Writer, listing: Listing) -> None:
    for prefix in listing.common_prefixes:
        w.open("CommonPrefixes")
        w.add("Prefix", _key(listing, prefix))
        w.close("CommonPrefixes")


def list_objects_v2(
    listing: Listing,
    *,
    continuation_token: str | None = None,
    next_continuation_token: str | None = None,
    start_after: str | None = None,
    fetch_owner: bool = False,
) -> bytes:
    """
    ListBucketResult of ListObjectsV2 (C{?list-type=2}).  C{Owner} is
    in each C{Contents} only with C{fetch-owner=true}.
    """
    w = _Writer("ListBucketResult")
    w.add("Name", listing.bucket)
    w.add("Prefix", _key(listing, listing.prefix))
    w.add("ContinuationToken", continuation_token)
    w.add("NextContinuationToken", next_continuation_token)
    w.add("StartAfter", _key(listing, start_after))
    w.add("KeyCount", len(listing.objects) + len(listing.common_prefixes))
    w.add("MaxKeys", listing.max_keys)
    w.add("Delimiter", _key(listing, listing.delimiter))
    w.add("EncodingType", "url" if listing.url else None)
    w.add("IsTruncated", listing.truncated)
    _contents(w, listing, fetch_owner)
    return w.done()


def list_objects_v1(
    listing: Listing, *, marker: str = "", next_marker: str | None = None
) -> bytes:
    """
    ListBucketResult of ListObjects (version 1, C{marker}); C{NextMarker}
    as S3 sends it, only when truncated with a delimiter (clients
    otherwise continue from the last key).
    """
    w = _Writer("ListBucketResult")
    w.add("Name", listing.bucket)
    w.add("Prefix", _key(listing, listing.prefix))
    w.add("Marker", _key(listing, marker))
    if listing.truncated and listing.delimiter:
        w.add("NextMarker", _key(listing, next_marker))
    w.add("MaxKeys", listing.max_keys)
    w.add("Delimiter", _key(listing, listing.delimiter))
    w.add("EncodingType", "url" if listing.url else None)
    w.add("IsTruncated", listing.truncated)
    _contents(w, listing, fetch_owner=True)
    return w.done()


def list_object_versions(
    listing: Listing,
    *,
    key_marker: str = "",
    version_id_marker: str = "",
    next_key_marker: str | None = None,
    next_version_id_marker: str | None = None,
) -> bytes:
    """
    ListVersionsResult for an unversioned bucket: every object is its own
    latest version, whose id is C{null}.
    """
    w = _Writer("ListVersionsResult")
    w.add("Name", listing.bucket)
    w.add("Prefix", _key(listing, listing.prefix))
    w.add("KeyMarker", _key(listing, key_marker))
    w.add("VersionIdMarker", version_id_marker)
    if listing.truncated:
        w.add("NextKeyMarker", _key(listing, next_key_marker))
        w.add("NextVersionIdMarker", next_version_id_marker)
    w.add("MaxKeys", listing.max_keys)
    w.add("Delimiter", _key(listing, listing.delimiter))
    w.add("EncodingType", "url" if listing.url else None)
    w.add("IsTruncated", listing.truncated)
    for entry in listing.objects:
        w.open("Version")
        w.add("Key", _key(listing, entry.key))
        w.add("VersionId", "null")
        w.add("IsLatest", True)
        w.add("LastModified", format_iso8601(entry.modified))
        w.add("ETag", quote_etag(entry.etag))
        w.add("Size", entry.size)
        _owner(w, entry.owner)
        w.add("StorageClass", entry.storage_class)
        w.close("Version")
    _common_prefixes(w, listing)
    return w.done()


def initiate_multipart_upload(bucket: str, key: str, upload_id: str) -> bytes:
    """
    InitiateMultipartUploadResult.
    """
    w = _Writer("InitiateMultipartUploadResult")
    w.add("Bucket", bucket)
    w.add("Key", key)
    w.add("UploadId", upload_id)
    return w.done()


def complete_multipart_upload(
    location: str, bucket: str, key: str, etag: str, checksums: dict[str, str] | None = None
) -> bytes:
    """
    CompleteMultipartUploadResult (C{checksums}: C{ChecksumCRC32} etc.).
    """
    w = _Writer("CompleteMultipartUploadResult")
    w.add("Location", location)
    w.add("Bucket", bucket)
    w.add("Key", key)
    w.add("ETag", quote_etag(etag))
    for name, value in (checksums or {}).items():
        w.add(name, value)
    return w.done()


@dataclass(frozen=True)
class PartEntry:
    number: int
    modified: float
    etag: str
    size: int
    checksums: dict[str, str] = field(default_factory=dict)


def list_parts(
    bucket: str,
    key: str,
    upload_id: str,
    parts: Sequence[PartEntry],
    *,
    owner: Owner,
    part_number_marker: int = 0,
    next_part_number_marker: int | None = None,
    max_parts: int = 1000,
    truncated: bool = False,
    storage_class: str = "STANDARD",
) -> bytes:
    """
    ListPartsResult.
    """
    w = _Writer("ListPartsResult")
    w.add("Bucket", bucket)
    w.add("Key", key)
    w.add("UploadId", upload_id)
    _owner(w, owner, "Initiator")
    _owner(w, owner)
    w.add("StorageClass", storage_class)
    w.add("PartNumberMarker", part_number_marker)
    w.add("NextPartNumberMarker",
          next_part_number_marker if next_part_number_marker is not None
          else (parts[-1].number if parts else 0))
    w.add("MaxParts", max_parts)
    w.add("IsTruncated", truncated)
    for part in parts:
        w.open("Part")
        w.add("PartNumber", part.number)
        w.add("LastModified", format_iso8601(part.modified))
        w.add("ETag", quote_etag(part.etag))
        w.add("Size", part.size)
        for name, value in part.checksums.items():
            w.add(name, value)
        w.close("Part")
    return w.done()


@dataclass(frozen=True)
class UploadEntry:
    key: str
    upload_id: str
    initiated: float
    storage_class: str = "STANDARD"


def list_multipart_uploads(
    bucket: str,
    uploads: Sequence[UploadEntry],
    *,
    owner: Owner,
    prefix: str | None = None,
    delimiter: str | None = None,
    key_marker: str = "",
    upload_id_marker: str = "",
    next_key_marker: str | None = None,
    next_upload_id_marker: str | None = None,
    max_uploads: int = 1000,
    truncated: bool = False,
    common_prefixes: Sequence[str] = (),
    url: bool = False,
) -> bytes:
    """
    ListMultipartUploadsResult.
    """
    def enc(value: str | None) -> str | None:
        return url_encode(value) if url and value is not None else value

    w = _Writer("ListMultipartUploadsResult")
    w.add("Bucket", bucket)
    w.add("KeyMarker", enc(key_marker))
    w.add("UploadIdMarker", upload_id_marker)
    w.add("NextKeyMarker", enc(next_key_marker if next_key_marker is not None
                               else (uploads[-1].key if uploads else "")))
    w.add("NextUploadIdMarker", next_upload_id_marker if next_upload_id_marker is not None
          else (uploads[-1].upload_id if uploads else ""))
    w.add("Prefix", enc(prefix))
    w.add("Delimiter", enc(delimiter))
    w.add("MaxUploads", max_uploads)
    w.add("EncodingType", "url" if url else None)
    w.add("IsTruncated", truncated)
    for upload in uploads:
        w.open("Upload")
        w.add("Key", enc(upload.key))
        w.add("UploadId", upload.upload_id)
        _owner(w, owner, "Initiator")
        _owner(w, owner)
        w.add("StorageClass", upload.storage_class)
        w.add("Initiated", format_iso8601(upload.initiated))
        w.close("Upload")
    for common in common_prefixes:
        w.open("CommonPrefixes")
        w.add("Prefix", enc(common))
        w.close("CommonPrefixes")
    return w.done()


def copy_object(etag: str, modified: float, checksums: dict[str, str] | None = None) -> bytes:
    """
    CopyObjectResult.
    """
    return _copy("CopyObjectResult", etag, modified, checksums)


def copy_part(etag: str, modified: float, checksums: dict[str, str] | None = None) -> bytes:
    """
    CopyPartResult (UploadPartCopy).
    """
    return _copy("CopyPartResult", etag, modified, checksums)


def _copy(root: str, etag: str, modified: float, checksums: dict[str, str] | None) -> bytes:
    w = _Writer(root)
    w.add("LastModified", format_iso8601(modified))
    w.add("ETag", quote_etag(etag))
    for name, value in (checksums or {}).items():
        w.add(name, value)
    return w.done()


@dataclass(frozen=True)
class DeleteError:
    key: str
    code: str
    message: str
    version_id: str | None = None


def delete_result(
    deleted: Iterable[tuple[str, str | None]],
    errors: Iterable[DeleteError] = (),
    *,
    quiet: bool = False,
) -> bytes:
    """
    DeleteResult: each key deleted (unless C{quiet}: then only the
    errors), with its version id when the request named one.
    """
    w = _Writer("DeleteResult")
    if not quiet:
        for key, version_id in deleted:
            w.open("Deleted")
            w.add("Key", key)
            w.add("VersionId", version_id)
            w.close("Deleted")
    for error in errors:
        w.open("Error")
        w.add("Key", error.key)
        w.add("VersionId", error.version_id)
        w.add("Code", error.code)
        w.add("Message", error.message)
        w.close("Error")
    return w.done()


def location_constraint(region: str) -> bytes:
    """
    GetBucketLocation's answer: empty for us-east-1, as S3 answers.
    """
    if region == "us-east-1":
        return f'{DECLARATION}<LocationConstraint xmlns="{NAMESPACE}"/>'.encode()
    return (f'{DECLARATION}<LocationConstraint xmlns="{NAMESPACE}">{_escape(region)}'
            "</LocationConstraint>").encode()
