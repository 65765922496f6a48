"""
An incoming request as an S3 operation, and the request headers that
shape a response: Range, conditional requests, C{response-*}
overrides, user metadata, copy sources.

L{parse_request} takes the method, the Host header, the raw path and
query; it finds the bucket (path-style always, virtual-hosted style
when a domain is configured), the key, and the operation name (as AWS's
API reference names them).  Sub-resources KoboldFS does not implement
raise L{NotImplementedS3}.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from koboldfs.names import MAX_KEY_BYTES, is_bucket_name
from koboldfs.s3.errors import (
    InvalidArgument,
    InvalidBucketName,
    InvalidRange,
    InvalidRequest,
    KeyTooLongError,
    MetadataTooLarge,
    MethodNotAllowed,
    MissingContentLength,
    NoSuchKey,
    NotImplementedS3,
    NotModified,
    PreconditionFailed,
    S3Error,
)
from koboldfs.s3.headers import Headers, parse_http_date
from koboldfs.s3.sigv4 import PayloadMode
from koboldfs.s3.uri import decode_text, is_decimal, parse_query

MIN_PART_SIZE = 5 * 1024 * 1024
MAX_PART_SIZE = 5 * 1024**3
MAX_PART_NUMBER = 10000
#: User metadata (names and values of x-amz-meta-*) is at most 2 KB, as on AWS.
MAX_USER_METADATA = 2048

#: Sub-resources of a bucket or object that KoboldFS does not implement.
UNSUPPORTED = frozenset(
    """accelerate acl analytics attributes cors encryption intelligent-tiering
    inventory legal-hold lifecycle logging metadataTable metrics notification
    object-lock ownershipControls policy policyStatus publicAccessBlock
    replication requestPayment restore retention select session tagging
    torrent versioning website""".split()
)

LIST_PARAMS = ("prefix", "delimiter", "max-keys", "marker", "continuation-token",
               "start-after", "encoding-type", "fetch-owner", "list-type")


@dataclass(frozen=True)
class S3Request:
    """
    What a request asks for.

    @ivar operation: the operation's name in AWS's API reference
        (C{"PutObject"}, C{"ListObjectsV2"}, ...).
    @ivar bucket: the bucket, or None for ListBuckets.
    @ivar key: the object key (decoded), or None for bucket operations.
    @ivar params: the query parameters, decoded (each given once).
    @ivar virtual_hosted: the bucket came from the Host header.
    """

    operation: str
    bucket: str | None
    key: str | None
    params: dict[str, str]
    virtual_hosted: bool = False


def check_bucket_name(name: str) -> str:
    """
    C{name} if it is a valid bucket name.

    @raise InvalidBucketName: it is not.
    """
    if not is_bucket_name(name):
        raise InvalidBucketName(BucketName=name[:255])
    return name


def check_key(key: str) -> str:
    """
    C{key} if it is a valid object key: 1 to 1024 bytes of UTF-8.

    @raise KeyTooLongError: longer.
    @raise InvalidArgument: empty.
    """
    if not key:
        raise InvalidArgument("An object key must not be empty")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise KeyTooLongError(Size=len(key.encode("utf-8", "surrogatepass")),
                              MaxSizeAllowed=MAX_KEY_BYTES)
    return key


def _host_bucket(host: str | None, domain: str | None) -> str | None:
    """
    The bucket named by a virtual-hosted Host header (C{bucket.DOMAIN}),
    or None when the request is path-style.
    """
    if domain is None or not host:
        return None
    name = host.strip().lower()
    if name.startswith("["):
        return None  # an IPv6 literal
    name = name.rsplit(":", 1)[0] if ":" in name else name
    name = name.rstrip(".")
    suffix = "." + domain.lower().strip(".")
    if name.endswith(suffix) and len(name) > len(suffix):
        return name[: -len(suffix)]
    return None


def parse_request(
    method: str,
    host: str | None,
    raw_path: str,
    raw_query: str,
    headers: Headers,
    *,
    domain: str | None = None,
) -> S3Request:
    """
    The operation a request asks for.

    @param host: the Host header.
    @param raw_path: the path as received (percent-encoded), as latin-1
        text of the bytes (so raw UTF-8 decodes right).
    @param domain: the S3 domain for virtual-hosted style (C{--s3-domain}).
    @raise S3Error: an invalid bucket or key, a bad query, an operation
        that does not exist (L{MethodNotAllowed}) or is not implemented.
    """
    if not raw_path.startswith("/"):
        raise InvalidArgument("The request path must begin with /")
    params: dict[str, str] = {}
    for name, value in parse_query(raw_query):
        if name in params:
            raise InvalidArgument(f"the query parameter {name[:64]} is given more than once",
                                  ArgumentName=name[:64])
        params[name] = value
    virtual = _host_bucket(host, domain)
    path = raw_path[1:]
    if virtual is not None:
        bucket: str | None = virtual
        key_raw = path
    else:
        bucket_raw, sep, key_raw = path.partition("/")
        bucket = decode_text(bucket_raw, "bucket name") if bucket_raw else None
    key = decode_text(key_raw, "key") if key_raw else None
    if bucket is not None:
        check_bucket_name(bucket)
    if key is not None:
        check_key(key)
    operation = _operation(method, bucket, key, params, headers)
    return S3Request(operation, bucket, key, params, virtual is not None)


def _operation(
    method: str, bucket: str | None, key: str | None, params: dict[str, str], headers: Headers
) -> str:
    unsupported = sorted(UNSUPPORTED & set(params))
    if method not in ("GET", "HEAD", "PUT", "POST", "DELETE"):
        if method == "OPTIONS":
            raise NotImplementedS3("CORS (OPTIONS requests) is not implemented")
        raise MethodNotAllowed(Method=method[:20], ResourceType="OBJECT" if key else "BUCKET")
    if bucket is None:
        if method == "GET":
            return "ListBuckets"
        raise MethodNotAllowed(Method=method, ResourceType="SERVICE")
    if unsupported:
        raise NotImplementedS3(
            f"The ?{unsupported[0]} sub-resource is not implemented", Resource=unsupported[0]
        )
    if key is None:
        if method == "GET":
            if "location" in params:
                return "GetBucketLocation"
            if "uploads" in params:
                return "ListMultipartUploads"
            if "versions" in params:
                return "ListObjectVersions"
            if "list-type" in params:
                if params["list-type"] != "2":
                    raise InvalidArgument("Invalid List Type specified in Request",
                                          ArgumentName="list-type")
                return "ListObjectsV2"
            return "ListObjects"
        if method == "HEAD":
            return "HeadBucket"
        if method == "PUT":
            return "CreateBucket"
        if method == "DELETE":
            return "DeleteBucket"
        if "delete" in params:
            return "DeleteObjects"
        raise NotImplementedS3("POST to a bucket (browser uploads) is not implemented")
    if method in ("GET", "HEAD"):
        if "uploadId" in params and method == "GET":
            return "ListParts"
        return "GetObject" if method == "GET" else "HeadObject"
    if method == "PUT":
        copy = "x-amz-copy-source" in headers
        if "partNumber" in params or "uploadId" in params:
            if "partNumber" not in params or "uploadId" not in params:
                raise InvalidRequest("UploadPart needs both partNumber and uploadId")
            return "UploadPartCopy" if copy else "UploadPart"
        return "CopyObject" if copy else "PutObject"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in params else "DeleteObject"
    if "uploads" in params:
        return "CreateMultipartUpload"
    if "uploadId" in params:
        return "CompleteMultipartUpload"
    raise NotImplementedS3("POST to an object is not implemented")


# -- request parameters --------------------------------------------------------


def int_param(
    params: dict[str, str], name: str, default: int, low: int = 0, high: int = 2**31 - 1
) -> int:
    """
    An integer query parameter in C{low..high}, C{default} when absent.

    @raise InvalidArgument: not such an integer.
    """
    value = params.get(name)
    if value is None:
        return default
    if not is_decimal(value, 10) or not low <= int(value) <= high:
        raise InvalidArgument(
            f"Provided {name} not an integer or within integer range {low}..{high}",
            ArgumentName=name, ArgumentValue=value[:64],
        )
    return int(value)


def part_number(params: dict[str, str]) -> int:
    """
    The C{partNumber} of UploadPart and GetObject: 1 to 10,000.
    """
    return int_param(params, "partNumber", 0, 1, MAX_PART_NUMBER)


@dataclass(frozen=True)
class ListParams:
    """
    The parameters of ListObjects and ListObjectsV2.

    @ivar max_keys: at most 1000 (S3 returns at most that many anyway).
    @ivar after: list keys after this one: C{marker} (v1), the
        C{continuation-token} or C{start-after} (v2), as given.
    """

    prefix: str
    delimiter: str | None
    max_keys: int
    marker: str
    continuation_token: str | None
    start_after: str | None
    url: bool
    fetch_owner: bool


def list_params(params: dict[str, str]) -> ListParams:
    """
    ListObjects' parameters, checked.

    @raise InvalidArgument: a bad max-keys, encoding-type or fetch-owner.
    """
    encoding = params.get("encoding-type")
    if encoding is not None and encoding.lower() != "url":
        raise InvalidArgument("Invalid Encoding Method specified in Request",
                              ArgumentName="encoding-type", ArgumentValue=encoding[:64])
    fetch_owner = params.get("fetch-owner", "false").lower()
    if fetch_owner not in ("true", "false"):
        raise InvalidArgument("Invalid fetch-owner", ArgumentName="fetch-owner")
    return ListParams(
        prefix=params.get("prefix", ""),
        delimiter=params.get("delimiter") or None,
        max_keys=min(int_param(params, "max-keys", 1000), 1000),
        marker=params.get("marker", ""),
        continuation_token=params.get("continuation-token"),
        start_after=params.get("start-after"),
        url=encoding is not None,
        fetch_owner=fetch_owner == "true",
    )


@dataclass(frozen=True)
class CopySource:
    bucket: str
    key: str
    version_id: str | None = None


def parse_copy_source(value: str) -> CopySource:
    """
    C{x-amz-copy-source}: C{[/]bucket/key[?versionId=id]}, URL-encoded
    (decoded once, after the version id is split off).

    @raise InvalidArgument: not of that form.
    """
    path, sep, query = value.strip().partition("?")
    version_id = None
    if sep:
        name, _, version = query.partition("=")
        if name != "versionId":
            raise InvalidArgument("Unsupported copy source parameter",
                                  ArgumentName="x-amz-copy-source")
        version_id = decode_text(version, "copy source version id")
    decoded = decode_text(path, "copy source").lstrip("/")
    bucket, _, key = decoded.partition("/")
    if not bucket or not key:
        raise InvalidArgument("Copy Source must mention the source bucket and key: "
                              "sourcebucket/sourcekey", ArgumentName="x-amz-copy-source")
    return CopySource(check_bucket_name(bucket), check_key(key), version_id)


def metadata_directive(headers: Headers, name: str = "x-amz-metadata-directive") -> str:
    """
    C{COPY} (the default) or C{REPLACE}, for CopyObject.
    """
    value = (headers.get(name) or "COPY").strip().upper()
    if value not in ("COPY", "REPLACE"):
        raise InvalidArgument("Unknown metadata directive.", ArgumentName=name)
    return value


_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*\Z")


def parse_range(value: str | None, size: int) -> tuple[int, int] | None:
    """
    The one byte range C{[start, end]} (inclusive) a C{Range} header asks
    of an object of C{size} bytes, or None to send it whole: no header, a
    header that does not parse, or several ranges (which S3 does not
    serve: it answers with the whole object, as here).

    @raise InvalidRange: the range starts past the end (or the object is
        empty).
    """
    if value is None:
        return None
    m = _RANGE.match(value)
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if first:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
        if last and int(last) < start:
            return None
    else:
        suffix = int(last)
        if suffix == 0:
            raise InvalidRange(RangeRequested=value.strip()[:100], ActualObjectSize=size)
        start, end = max(0, size - suffix), size - 1
    if start >= size:
        raise InvalidRange(RangeRequested=value.strip()[:100], ActualObjectSize=size)
    return start, end


_COPY_RANGE = re.compile(r"bytes=(\d{1,19})-(\d{1,19})\Z")


def parse_copy_range(value: str | None, size: int) -> tuple[int, int] | None:
    """
    UploadPartCopy's C{x-amz-copy-source-range} (C{bytes=first-last},
    both given, inclusive) over a source of C{size} bytes; None when
    absent (the whole source).

    @raise InvalidArgument: not of that form, or not within the source.
    """
    if value is None:
        return None
    m = _COPY_RANGE.match(value.strip())
    if not m:
        raise InvalidArgument("The x-amz-copy-source-range value must be of the form "
                              "bytes=first-last where first and last are the zero-based "
                              "offsets of the first and last bytes to copy",
                              ArgumentName="x-amz-copy-source-range")
    first, last = int(m.group(1)), int(m.group(2))
    if first > last or last >= size:
        raise InvalidArgument(f"Range specified is not valid for source object of size: {size}",
                              ArgumentName="x-amz-copy-source-range")
    return first, last


def content_range(start: int, end: int, size: int) -> str:
    """
    The C{Content-Range} of a partial response.
    """
    return f"bytes {start}-{end}/{size}"


def _etags(value: str) -> list[str]:
    return [tag.strip().removeprefix("W/").strip('"') for tag in value.split(",") if tag.strip()]


def _matches(value: str, etag: str | None) -> bool:
    if etag is None:
        return False
    tags = _etags(value)
    return "*" in tags or etag.strip('"') in tags


def check_conditions(
    headers: Headers,
    etag: str | None,
    modified: float | None,
    *,
    write: bool = False,
    prefix: str = "",
) -> None:
    """
    S3's conditional requests, with its precedence: C{If-Match} decides
    over C{If-Unmodified-Since}, C{If-None-Match} over
    C{If-Modified-Since}, and a 412 over a 304.

    @param etag: the object's ETag, or None when there is no object (a
        conditional write).
    @param modified: its Last-Modified, POSIX seconds.
    @param write: a PutObject or CopyObject destination: a condition that
        fails is a 412 (never a 304), and C{If-Match} without an object
        is C{NoSuchKey}.
    @param prefix: C{"x-amz-copy-source-"} for the conditions on a copy's
        source (which also only ever fail with 412).
    @raise PreconditionFailed: 412.
    @raise NotModified: 304.
    @raise NoSuchKey: C{If-Match} on a write where there is no object.
    """
    def header(name: str) -> str | None:
        return headers.get(prefix + name)

    def date(name: str) -> float | None:
        value = header(name)
        return parse_http_date(value) if value is not None else None

    # Last-Modified has whole seconds: compare at that precision.
    seconds = math.floor(modified) if modified is not None else None
    if_match, if_none_match = header("if-match"), header("if-none-match")
    unmodified_since, modified_since = date("if-unmodified-since"), date("if-modified-since")
    not_modified: type[S3Error] = PreconditionFailed if write or prefix else NotModified

    if if_match is not None:
        if etag is None and write:
            raise NoSuchKey()
        if not _matches(if_match, etag):
            raise PreconditionFailed(Condition=prefix + "If-Match")
    elif unmodified_since is not None and seconds is not None and seconds > unmodified_since:
        raise PreconditionFailed(Condition=prefix + "If-Unmodified-Since")
    if if_none_match is not None:
        if _matches(if_none_match, etag):
            if not_modified is PreconditionFailed:
                raise PreconditionFailed(Condition=prefix + "If-None-Match")
            raise NotModified()
    elif modified_since is not None and seconds is not None and not write:
        if seconds <= modified_since:
            if not_modified is PreconditionFailed:
                raise PreconditionFailed(Condition=prefix + "If-Modified-Since")
            raise NotModified()


def evaluate_conditions(
    headers: Headers, etag: str | None, modified: float | None, *, write: bool = False
) -> int:
    """
    The status L{check_conditions} leads to: 200, 304, 412 (or 404).
    """
    try:
        check_conditions(headers, etag, modified, write=write)
    except S3Error as e:
        return e.status
    return 200


#: The response-* query parameters and the headers they set.
RESPONSE_OVERRIDES = {
    "response-content-type": "Content-Type",
    "response-content-language": "Content-Language",
    "response-expires": "Expires",
    "response-cache-control": "Cache-Control",
    "response-content-disposition": "Content-Disposition",
    "response-content-encoding": "Content-Encoding",
}


def response_overrides(params: dict[str, str], *, anonymous: bool = False) -> dict[str, str]:
    """
    The response headers GetObject's C{response-*} parameters set.

    @raise InvalidRequest: on an anonymous request (S3 refuses them there).
    @raise InvalidArgument: a value with a control character (which would
        split the response's headers).
    """
    out = {}
    for name, header in RESPONSE_OVERRIDES.items():
        if name in params:
            if anonymous:
                raise InvalidRequest(
                    "Request specific response headers cannot be used for anonymous GET requests."
                )
            out[header] = _header_value(params[name], name)
    return out


def _header_value(value: str, name: str) -> str:
    if any(ord(c) < 0x20 and c != "\t" or ord(c) == 0x7F for c in value):
        raise InvalidArgument(f"Invalid {name}: control characters are not allowed",
                              ArgumentName=name)
    return value


#: The object headers S3 stores with an object and returns with it.
STORED_HEADERS = ("content-type", "content-encoding", "content-disposition",
                  "content-language", "cache-control", "expires")


def object_headers(headers: Headers) -> dict[str, str]:
    """
    The headers of a PutObject (or CreateMultipartUpload, CopyObject
    with REPLACE) to store and return with the object: the standard ones
    (C{aws-chunked} dropped from C{Content-Encoding}: it is the upload's
    framing, not the object's) and the user metadata C{x-amz-meta-*}
    (names in lower case).

    @raise S3Error: user metadata over 2 KB (C{MetadataTooLarge}).
    """
    out = {}
    for name in STORED_HEADERS:
        value = headers.get(name)
        if value is None:
            continue
        if name == "content-encoding":
            codings = [c.strip() for c in value.split(",")
                       if c.strip() and c.strip().lower() != "aws-chunked"]
            if not codings:
                continue
            value = ",".join(codings)
        out[name] = value
    size = 0
    for name in headers:
        if name.startswith("x-amz-meta-"):
            value = headers.get(name) or ""
            size += len(name) - len("x-amz-meta-") + len(value.encode("latin-1", "replace"))
            out[name] = value
    if size > MAX_USER_METADATA:
        raise MetadataTooLarge(Size=size, MaxSizeAllowed=MAX_USER_METADATA)
    return out


def payload_length(headers: Headers, mode: PayloadMode) -> int:
    """
    The payload's length: C{x-amz-decoded-content-length} for an
    aws-chunked body (which may come with C{Transfer-Encoding: chunked}
    and no C{Content-Length}: boto3 does so over HTTPS), else
    C{Content-Length}.

    @raise MissingContentLength: the length is not given.
    @raise InvalidArgument: it is not a number.
    """
    name = "x-amz-decoded-content-length" if mode.streaming else "content-length"
    value = headers.get(name)
    if value is None:
        raise MissingContentLength(
            f"You must provide the {name} HTTP header."
        )
    value = value.strip()
    if not is_decimal(value, 19):
        raise InvalidArgument(f"{name} is not a number", ArgumentName=name,
                              ArgumentValue=value[:40])
    return int(value)
