"""
The S3 front end: S3's REST API over HTTP(S), a thin adapter from the
L{koboldfs.s3} codec to the server core (L{koboldfs.interfaces.INode}).

Buckets are namespaces and objects are files: an object put here is a
KoboldFS file like any other (durable on the namespace's C{min_copies}
hosts when the put is answered, replicated, scrubbed, served by
C{get_url}), and any file is an object.

A request is handled as it arrives, not once its body is in (as
twisted.web would): when its head is complete (L{S3HTTPRequest.gotLength})
the signature is checked, the operation found and authorized, and for an
upload the put begun in the core; the body then streams through the
aws-chunked decoder and the digests (hashed in threads, in order) into
the put, paced by the disk and the peers taking copies.  Nothing is
published until every digest the request carries has matched
(C{ChunkedDecoder.finish}, then C{BodyVerifier.finish}).  A client that
sent C{Expect: 100-continue} is told to send its body only once all
that has passed; refused, it gets the error at once and the connection
closes.  See docs/s3.md.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.web.http_headers import Headers as HTTPHeaders
from twisted.web.server import Request, Site

from koboldfs.attributes import AttributesTooLarge, check_attributes
from koboldfs.errors import ErrorCode, KoboldError, MultipartError
from koboldfs.forwarding import Gate
from koboldfs.interfaces import (
    FileInfo,
    INode,
    IS3Credentials,
    NamespaceInfo,
    S3Credential,
    UploadInfo,
)
from koboldfs.s3 import xml as s3xml
from koboldfs.s3.checksums import BodyVerifier, Digests
from koboldfs.s3.chunked import ChunkedDecoder
from koboldfs.s3.errors import (
    AccessDenied,
    BucketAlreadyOwnedByYou,
    BucketNotEmpty,
    EntityTooLarge,
    IncompleteBody,
    InternalError,
    InvalidArgument,
    InvalidBucketName,
    InvalidLocationConstraint,
    InvalidRequest,
    MaxMessageLengthExceeded,
    MetadataTooLarge,
    NoSuchBucket,
    NoSuchKey,
    NoSuchUpload,
    NotImplementedS3,
    PreconditionFailed,
    S3Error,
    ServiceUnavailable,
    SlowDown,
    error_class,
)
from koboldfs.s3.headers import Headers, format_http_date
from koboldfs.s3.request import (
    S3Request as Operation,
)
from koboldfs.s3.request import (
    check_conditions,
    content_range,
    int_param,
    list_params,
    metadata_directive,
    object_headers,
    parse_copy_range,
    parse_copy_source,
    parse_range,
    parse_request,
    part_number,
    payload_length,
    response_overrides,
)
from koboldfs.s3.sigv4 import Authenticated, Verifier
from koboldfs.names import is_bucket_name
from koboldfs.s3access import access_key_of
from koboldfs.web import ResponseSink

log = Logger()

#: The owner every listing names: KoboldFS has no accounts.
OWNER = s3xml.Owner("koboldfs", "koboldfs")
#: Bodies of up to this many bytes are decoded and hashed on the reactor
#: (a thread job costs more); larger batches go to a thread.
INLINE = 256 * 1024
#: Body bytes gathered into one thread job.
BATCH = 1024 * 1024
#: Body bytes queued for hashing at most before the client is paused.
QUEUED = 4 * BATCH
#: Operations whose body is an object's bytes, streamed into the core.
UPLOADS = frozenset({"PutObject", "UploadPart"})
#: The XML bodies (DeleteObjects, CreateBucket ...) are read whole, up to this.
MAX_XML = s3xml.MAX_BODY
#: The largest key sorted last: listing past a common prefix skips it.
_LAST = "\U0010ffff"


def _request_id() -> str:
    return binascii.hexlify(os.urandom(8)).decode().upper()


def s3_error(error: KoboldError, key: str | None = None) -> S3Error:
    """
    The S3 error a core refusal is sent as.
    """
    code, message = error.code, str(error)
    if isinstance(error, MultipartError):
        return error_class(error.s3_code)(message)
    if isinstance(error, AttributesTooLarge):
        return MetadataTooLarge(message)
    if code == ErrorCode.PRECONDITION:
        return PreconditionFailed(message)
    if code == ErrorCode.NOT_FOUND:
        return NoSuchKey(Key=key) if key is not None else NoSuchKey()
    if code == ErrorCode.BAD_NAMESPACE:
        return InvalidBucketName(message)
    if code == ErrorCode.BAD_KEY:
        return InvalidArgument(message)
    if code == ErrorCode.TOO_LARGE:
        return EntityTooLarge(message)
    if code == ErrorCode.BUSY:
        return SlowDown(message)
    if code in (ErrorCode.UNAVAILABLE, ErrorCode.READONLY, ErrorCode.NO_SPACE,
                ErrorCode.TIMEOUT, ErrorCode.CORRUPT):
        return ServiceUnavailable(message)
    if code in (ErrorCode.FORBIDDEN, ErrorCode.AUTH_REQUIRED):
        return AccessDenied(message)
    if code == ErrorCode.SIZE_MISMATCH:
        return IncompleteBody(message)
    if code == ErrorCode.BAD_REQUEST:
        return InvalidArgument(message)
    return InternalError()


def etag_of(info: FileInfo) -> str:
    """
    An object's ETag, unquoted (L{FileInfo.etag}: docs/s3.md).
    """
    return info.etag


#: The attribute a checksum of the object is stored as: C{checksum-crc32} ...
CHECKSUM_PREFIX = "checksum-"


def _checksum_attributes(digests: Digests) -> dict[str, str]:
    return {CHECKSUM_PREFIX + a.header[len("x-amz-checksum-"):]: value
            for a, value in digests.checksums.items()}


def _attributes(headers: Headers) -> dict[str, str]:
    """
    What a PutObject (CreateMultipartUpload, CopyObject with REPLACE)
    stores with the object: its standard headers and user metadata.

    @raise S3Error: too much user metadata.
    """
    attributes = object_headers(headers)
    try:
        check_attributes(attributes)
    except AttributesTooLarge as e:
        raise MetadataTooLarge(str(e)) from None
    except KoboldError as e:
        raise InvalidArgument(str(e)) from None
    return attributes


class _Collect:
    """
    Where a small (XML) body goes: kept whole, bounded.
    """

    def __init__(self, limit: int) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._limit = limit

    def write(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._limit:
            raise MaxMessageLengthExceeded(
                f"Your request was too big: the most taken here is {self._limit} bytes"
            )
        self._parts.append(data)

    def value(self) -> bytes:
        return b"".join(self._parts)


class _BodyIn:
    """
    A request body on its way in: aws-chunked framing removed, every
    digest updated, the payload written into C{sink} (a put's stream, or
    L{_Collect}), in order.  Decoding and hashing run in a thread for
    batches over L{INLINE} bytes, one job at a time; the client is
    paused while more than L{QUEUED} bytes wait for them.

    The first error (a bad chunk, a refusal of the sink) is kept: what
    follows is dropped, and L{end} raises it.
    """

    def __init__(
        self,
        reactor: Any,
        gate: Gate,
        sink: Any,
        verifier: BodyVerifier,
        decoder: ChunkedDecoder | None,
        declared: int | None,
    ) -> None:
        self._reactor = reactor
        self._gate = gate
        self._sink = sink
        self._verifier = verifier
        self._decoder = decoder
        self._declared = declared
        self._batch: list[bytes] = []
        self._batched = 0
        self._queued = 0
        self._work: defer.Deferred[None] = defer.succeed(None)
        self.error: BaseException | None = None
        #: Body bytes received, framing included.
        self.received = 0

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        if self.error is not None:
            return
        self._batch.append(data)
        self._batched += len(data)
        if self._batched >= BATCH:
            self._flush()

    def _flush(self) -> None:
        if not self._batch:
            return
        batch, size = self._batch, self._batched
        self._batch, self._batched = [], 0
        self._queued += size
        if self._queued > QUEUED:
            self._gate.pause("hashing")

        def run(_: None) -> Any:
            if self.error is not None:
                return None
            if size <= INLINE:
                return self._digest(batch)
            pool = self._reactor.getThreadPool()
            return threads.deferToThreadPool(self._reactor, pool, self._digest, batch)

        def done(pieces: list[bytes] | None) -> None:
            self._queued -= size
            if self._queued <= QUEUED:
                self._gate.resume("hashing")
            if pieces is not None and self.error is None:
                for piece in pieces:
                    self._sink.write(piece)

        self._work.addCallback(run).addCallback(done).addErrback(self._failed)

    def _digest(self, batch: list[bytes]) -> list[bytes]:
        """
        Decode and hash, in a worker thread (or inline for little).
        """
        out: list[bytes] = []
        decoder, verifier = self._decoder, self._verifier
        for data in batch:
            pieces = decoder.feed(data) if decoder is not None else [data]
            for piece in pieces:
                verifier.update(piece)
            out += pieces
        return out

    def _failed(self, failure: Any) -> None:
        self._queued = 0
        self._gate.resume("hashing")
        if self.error is None:
            self.error = failure.value

    async def end(self) -> tuple[Digests, dict[str, str]]:
        """
        The body is in: fire with its verified digests and trailers once
        everything was written, or raise the first error.
        """
        self._flush()
        await self._work
        if self.error is not None:
            raise self.error
        trailers: dict[str, str] = {}
        if self._decoder is not None:
            trailers = self._decoder.finish().trailers
        elif self._declared is not None and self._verifier.size != self._declared:
            raise IncompleteBody(
                f"You did not provide the number of bytes specified by the Content-Length "
                f"HTTP header: {self._verifier.size} of {self._declared}"
            )
        return self._verifier.finish(trailers), trailers


@dataclass
class Call:
    """
    One request, as far as it was understood: the raw parts, who signed
    it, what it asks, its bucket.
    """

    request_id: str
    method: str
    path: str
    query: str
    headers: Headers
    auth: Authenticated | None = None
    credential: S3Credential | None = None
    op: Operation | None = None
    namespace: NamespaceInfo | None = None
    body: _BodyIn | None = None
    stream: Any = None
    collected: _Collect | None = None
    upload: UploadInfo | None = None
    attributes: dict[str, str] | None = None


class _Headers(HTTPHeaders):
    """
    Response headers that keep user metadata's names as stored, in lower
    case, as S3 sends them: clients (botocore) take the names after
    C{x-amz-meta-} as they come, and Twisted capitalizes every name.
    """

    def setRawHeaders(self, name: str | bytes, values: Any) -> None:
        raw = name.encode("latin-1") if isinstance(name, str) else name
        if raw.lower().startswith(b"x-amz-meta-"):
            self._rawHeaders[raw.lower()] = [
                v.encode("utf-8") if isinstance(v, str) else v for v in values
            ]
            return
        super().setRawHeaders(name, values)


class S3HTTPRequest(Request):
    """
    A twisted.web request handled as it arrives (see the module's
    docstring): L{gotLength} when the head is in, L{handleContentChunk}
    for the body, L{process} at its end.
    """

    site: S3Site
    _call: Call | None = None
    _ready: defer.Deferred[None] | None = None
    _held: list[bytes] | None = None
    _gate: Gate | None = None
    _expecting = False
    _refused = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.responseHeaders = _Headers()

    def gotLength(self, length: int | None) -> None:
        # Nothing is spooled: the body goes where the operation says.
        self.content = io.BytesIO()  # type: ignore[assignment]
        channel: Any = self.channel
        site: S3Site = channel.site
        self.started = site.front.node.clock.seconds()
        self._gate = Gate(channel.transport)
        expect = self.requestHeaders.getRawHeaders(b"expect")
        if expect and expect[0].lower() == b"100-continue" and channel._version == b"HTTP/1.1":
            # Answered by us once the request passed its checks, not by
            # the channel at once.
            self.requestHeaders.removeHeader(b"expect")
            self._expecting = length != 0
        self._held = []
        self._gate.pause("setup")
        raw = channel._command.decode("latin-1"), channel._path.decode("latin-1")
        self._ready = defer.ensureDeferred(site.front.begin(self, raw[0], raw[1], length))
        self._ready.addBoth(self._begun)

    def _begun(self, result: Any) -> None:
        held, self._held = self._held, None
        call = self._call
        if isinstance(result, defer.Failure) or call is None:
            error = result.value if isinstance(result, defer.Failure) else InternalError()
            if not isinstance(error, S3Error):
                log.failure("S3 request failed", result)
                error = InternalError()
            if self._expecting and not self._received:
                self._refuse(error)
                return
            self._early_error = error
        elif self._expecting and not self._received:
            self._transport().write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self._gate is not None:
            self._gate.resume("setup")
        for data in held or ():
            self._feed(data)

    _received = False
    _early_error: S3Error | None = None
    #: When its head was in (for the request log).
    started: float | None = None

    def _refuse(self, error: S3Error) -> None:
        """
        Answer a client waiting to send its body with the error, and close:
        the body it would still send is not read.
        """
        self._refused = True
        call = self._call
        request_id = call.request_id if call is not None else _request_id()
        body = error.body(request_id)
        head = [f"HTTP/1.1 {error.status} {_REASONS.get(error.status, 'Error')}",
                "connection: close", "content-type: application/xml",
                f"content-length: {len(body)}", f"x-amz-request-id: {request_id}", "", ""]
        transport = self._transport()
        transport.write("\r\n".join(head).encode("latin-1") + body)
        transport.loseConnection()

    def _transport(self) -> Any:
        channel: Any = self.channel
        return channel.transport

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        if self._held is not None:
            self._held.append(data)
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        call = self._call
        if call is not None and call.body is not None and self._early_error is None:
            call.body.feed(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._received = True
        if self._refused:
            return
        super().requestReceived(command, path, version)

    def process(self) -> None:
        # All of the body is in (or there was none).
        channel: Any = self.channel
        self.site = channel.site
        self.setHeader(b"server", b"KoboldFS")
        d = defer.ensureDeferred(self._respond())
        d.addErrback(lambda f: log.failure("S3 response failed", f))

    async def _respond(self) -> None:
        front = self.site.front
        assert self._ready is not None
        if self._gate is not None:
            # The body is in: nothing more to pace (the channel resumes
            # reading when the response is done).
            self._gate.close()
        try:
            await self._ready
        except Exception:
            pass  # kept in _early_error
        call = self._call
        try:
            if self._early_error is not None:
                raise self._early_error
            assert call is not None
            await front.answer(self, call)
        except S3Error as e:
            self._send_error(e)
        except KoboldError as e:
            self._send_error(s3_error(e, call.op.key if call and call.op else None))
        except Exception:
            log.failure("S3 {method} {path} failed", method=self.method, path=self.path)
            self._send_error(InternalError())
        finally:
            if call is not None and call.stream is not None:
                call.stream.abort()  # nothing once finished

    def _send_error(self, error: S3Error) -> None:
        if self.finished or self.channel is None:
            return
        if self.startedWriting:
            self._transport().abortConnection()
            return
        request_id = self._call.request_id if self._call is not None else _request_id()
        self.setResponseCode(error.status)
        self.setHeader(b"x-amz-request-id", request_id.encode())
        body = error.body(request_id)
        if body:
            self.setHeader(b"content-type", b"application/xml")
        if error.status != 304:
            self.setHeader(b"content-length", b"%d" % len(body))
        if body and self.method != b"HEAD":
            self.write(body)
        self.finish()

    def send(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        """
        Answer with C{body}, whole (an XML document, or nothing).
        """
        if self.channel is None:
            return
        self.setResponseCode(status)
        for name, value in headers.items():
            self.setHeader(name.encode("latin-1"), value.encode("latin-1", "replace"))
        if body:
            self.setHeader(b"content-type", headers.get("Content-Type", "application/xml"))
        self.setHeader(b"content-length", b"%d" % len(body))
        if body and self.method != b"HEAD":
            self.write(body)
        self.finish()

    def connectionLost(self, reason: Any) -> None:
        call = self._call
        if call is not None:
            if call.body is not None and call.body.error is None:
                call.body.error = IncompleteBody("The client went away")
            if call.stream is not None:
                call.stream.abort()
        super().connectionLost(reason)


_REASONS = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            409: "Conflict", 411: "Length Required", 412: "Precondition Failed",
            416: "Requested Range Not Satisfiable", 500: "Internal Server Error",
            501: "Not Implemented", 503: "Service Unavailable"}

#: What each operation needs: a read (False) or write (True) grant on its
#: bucket; None: a cluster-wide write grant (bucket administration).
_NEEDS: dict[str, bool | None] = {
    "GetObject": False, "HeadObject": False, "ListObjects": False, "ListObjectsV2": False,
    "ListObjectVersions": False, "HeadBucket": False, "GetBucketLocation": False,
    "PutObject": True, "DeleteObject": True, "DeleteObjects": True, "CreateBucket": True,
    "CopyObject": True, "DeleteBucket": None, "CreateMultipartUpload": True,
    "UploadPart": True, "UploadPartCopy": True, "CompleteMultipartUpload": True,
    "AbortMultipartUpload": True, "ListParts": False, "ListMultipartUploads": False,
}
#: Operations that need their bucket to exist before the body comes.
_IN_BUCKET = frozenset({"PutObject", "UploadPart", "CopyObject", "CreateMultipartUpload",
                        "UploadPartCopy"})
_ANONYMOUS = frozenset({"GetObject", "HeadObject"})


class S3Front:
    """
    The operations: what each request asks of the core, and the answer.

    @param credentials: where access keys are found.
    @param region: the region signatures are scoped to (C{--s3-region}).
    @param domain: the domain of virtual-hosted style (C{--s3-domain}).
    """

    def __init__(
        self,
        node: INode,
        credentials: IS3Credentials,
        region: str = "us-east-1",
        domain: str | None = None,
    ) -> None:
        self.node = node
        self.credentials = credentials
        self.region = region
        self.domain = domain

    # -- the head of a request

    async def begin(
        self, request: S3HTTPRequest, method: str, uri: str, length: int | None
    ) -> None:
        """
        The head is in: authenticate, parse, authorize, and get ready
        for the body.
        """
        path, _, query = uri.partition("?")
        headers = Headers.from_lists(request.requestHeaders.getAllRawHeaders())
        call = Call(_request_id(), method, path, query, headers)
        request._call = call
        credential = None
        access_key = access_key_of(headers, query)
        if access_key is not None:
            credential = await self.credentials.lookup(access_key)

        def secret_for(key: str) -> str | None:
            return credential.secret if credential is not None and key == access_key else None

        op = parse_request(method, headers.get("host"), path, query, headers,
                           domain=self.domain)
        call.op = op
        verifier = Verifier(secret_for, self.node.clock.seconds, self.region)
        call.auth = verifier.verify(method, path, query, headers,
                                    virtual_bucket=op.bucket if op.virtual_hosted else None)
        call.credential = credential if call.auth is not None else None
        if op.bucket is not None:
            call.namespace = await self.node.store.namespace(op.bucket)
        self._authorize(call)
        if op.operation in _IN_BUCKET and call.namespace is None:
            raise NoSuchBucket(BucketName=op.bucket)
        if "uploadId" in op.params and op.operation != "ListMultipartUploads":
            call.upload = await self._find_upload(op)
        if length == 0 and not headers.get("x-amz-decoded-content-length"):
            if op.operation not in UPLOADS:
                return
        await self._prepare_body(request, call, length)

    def _authorize(self, call: Call) -> None:
        op = call.op
        assert op is not None
        if call.auth is None:
            public = call.namespace is not None and call.namespace.public_read
            if op.operation in _ANONYMOUS and public:
                return
            raise AccessDenied("Anonymous access is not allowed here: sign your requests")
        credential = call.credential
        assert credential is not None
        if op.operation == "ListBuckets":
            return  # lists only what it may see
        need = _NEEDS.get(op.operation)
        if op.operation not in _NEEDS:
            raise NotImplementedS3(f"{op.operation} is not implemented")
        if need is None:
            allowed = credential.allows(None, True)
        else:
            allowed = credential.allows(op.bucket, need)
        if not allowed:
            raise AccessDenied()

    async def _prepare_body(self, request: S3HTTPRequest, call: Call, length: int | None) -> None:
        op, headers, auth = call.op, call.headers, call.auth
        assert op is not None and request._gate is not None
        mode = auth.payload if auth is not None else None
        streaming = mode is not None and mode.streaming
        declared = payload_length(headers, mode) if mode is not None else length or 0
        if op.operation == "PutObject":
            call.attributes = _attributes(headers)
            await self._check_write_conditions(call)
        verifier = BodyVerifier.for_request(
            headers, auth.content_sha256 if auth is not None else None, sha256=True
        )
        decoder = (ChunkedDecoder.for_request(auth, headers, declared)
                   if streaming and auth is not None else None)
        sink: Any
        if op.operation == "PutObject":
            assert op.bucket is not None and op.key is not None
            stream = self.node.put(op.bucket, op.key, declared, request._gate.side("core"),
                                   failed=lambda e: _stop(call, e), md5=True)
            call.stream = sink = stream
        elif op.operation == "UploadPart":
            assert call.upload is not None
            stream = self.node.upload_part(call.upload, part_number(op.params), declared,
                                           request._gate.side("core"),
                                           failed=lambda e: _stop(call, e))
            call.stream = sink = stream
        else:
            call.collected = sink = _Collect(MAX_XML)
        call.body = _BodyIn(self.node.clock, request._gate, sink, verifier, decoder,
                            None if streaming else declared)

    async def _check_write_conditions(self, call: Call) -> None:
        headers, op = call.headers, call.op
        assert op is not None and op.bucket is not None and op.key is not None
        if headers.get("if-match") is None and headers.get("if-none-match") is None:
            return
        existing = await self._lookup(op.bucket, op.key, missing_ok=True)
        check_conditions(headers, etag_of(existing) if existing else None,
                         existing.created if existing else None, write=True)

    async def _find_upload(self, op: Operation) -> UploadInfo:
        upload: UploadInfo | None = await self.node.store.find_upload(op.params["uploadId"])
        if upload is None or (upload.namespace, upload.key) != (op.bucket, op.key):
            raise NoSuchUpload(UploadId=op.params["uploadId"][:128])
        return upload

    async def _lookup(self, bucket: str, key: str, missing_ok: bool = False) -> FileInfo | None:
        try:
            info: FileInfo = await self.node.lookup(bucket, key)
        except KoboldError as e:
            if e.code == ErrorCode.NOT_FOUND:
                if missing_ok:
                    return None
                raise NoSuchKey(Key=key, resource=f"/{bucket}/{key}") from None
            raise
        return info

    # -- the answer

    async def answer(self, request: S3HTTPRequest, call: Call) -> None:
        op = call.op
        assert op is not None
        digests = None
        if call.body is not None:
            digests, _ = await call.body.end()
        handler: Callable[..., Any] = getattr(self, "_" + op.operation)
        await handler(request, call, digests)

    def _need_bucket(self, call: Call) -> NamespaceInfo:
        op = call.op
        assert op is not None
        if call.namespace is None:
            raise NoSuchBucket(BucketName=op.bucket, resource=f"/{op.bucket}")
        return call.namespace

    def _body(self, call: Call) -> bytes:
        return call.collected.value() if call.collected is not None else b""

    async def _ListBuckets(self, request: S3HTTPRequest, call: Call, _: Any) -> None:
        credential = call.credential
        assert credential is not None
        namespaces = await self.node.store.namespaces()
        buckets = [s3xml.Bucket(n.name, n.created) for n in namespaces
                   if is_bucket_name(n.name) and credential.allows(n.name, False)]
        request.send(200, {}, s3xml.list_buckets(OWNER, buckets))

    async def _CreateBucket(self, request: S3HTTPRequest, call: Call, _: Any) -> None:
        op = call.op
        assert op is not None and op.bucket is not None
        region = s3xml.parse_create_bucket(self._body(call)) if self._body(call) else None
        if region not in (None, "", self.region):
            raise InvalidLocationConstraint(
                f"The specified location-constraint is not valid: this is {self.region}",
                LocationConstraint=region,
            )
        if call.namespace is not None:
            raise BucketAlreadyOwnedByYou(BucketName=op.bucket)
        await self.node.store.namespace(op.bucket, create=True)
        request.send(200, {"Location": f"/{op.bucket}"})

    async def _HeadBucket(self, request: S3HTTPRequest, call: Call, _: Any) -> None:
        self._need_bucket(call)
        request.send(200, {"x-amz-bucket-region": self.region})

    async def _GetBucketLocation(self, request: S3HTTPRequest, call: Call, _: Any) -> None:
        self._need_bucket(call)
        request.send(200, {}, s3xml.location_constraint(self.region))

    async def _DeleteBucket(self, request: S3HTTPRequest, call: Call, _: Any) -> None:
        namespace = self._need_bucket(call)
        result = await self.node.store.delete_namespace(namespace.name)
        if result == "not-empty":
            raise BucketNotEmpty(BucketName=namespace.name)
        if result == "missing":
            raise NoSuchBucket(BucketName=namespace.name)
        request.send(204, {})

    # objects

    def _object_headers(self, info: FileInfo) -> dict[str, str]:
        attributes = info.attributes or {}
        out = {"ETag": s3xml.quote_etag(etag_of(info)),
               "Last-Modified": format_http_date(info.created),
               "Accept-Ranges": "bytes",
               "Content-Type": attributes.get("content-type") or "binary/octet-stream"}
        for name, value in attributes.items():
            if name.startswith("x-amz-meta-") or name in (
                "content-encoding", "content-disposition", "content-language",
                "cache-control", "expires",
            ):
                out[name] = value
        if info.parts:
            out["x-amz-mp-parts-count"] = str(info.parts)
        return out

    async def _PutObject(self, request: S3HTTPRequest, call: Call, digests: Digests) -> None:
        stream = call.stream
        assert stream is not None
        if_match = call.headers.get("if-match")
        info = await stream.finish(
            digests.sha256,
            md5=digests.md5,
            attributes={**(call.attributes or {}), **_checksum_attributes(digests)},
            if_absent=(call.headers.get("if-none-match") or "").strip() == "*",
            if_match=if_match.strip().strip('"') if if_match else None,
        )
        call.stream = None
        headers = {"ETag": s3xml.quote_etag(info.etag)}
        for algorithm, value in digests.checksums.items():
            headers[algorithm.header] = value
        request.send(200, headers)

    async def _GetObject(self, request: S3HTTPRequest, call: Call, _: Any) -> None:
        op = call.op
        assert op is not None and op.bucket is not None and op.key is not None
        self._need_bucket(call)
        info = await self._lookup(op.bucket, op.key)
        assert info is not None
        headers = self._object_headers(info)
        try:
            check_conditions(call.headers, etag_of(info), info.created)
        except S3Error as e:
            if e.status == 304:
                for name in ("ETag", "Last-Modified"):
                    request.setHeader(name.encode(), headers[name].encode())
            raise
        part = int_param(op.params, "partNumber", 0, 0, 10000)
        if part > 1 or (part and info.parts and info.parts > 1):
            raise NotImplementedS3("GetObject of one part of a multipart object is not "
                                   "implemented: ask for its bytes with a Range")
        span = parse_range(call.headers.get("range"), info.size) if not part else None
        headers.update(response_overrides(op.params, anonymous=call.auth is None))
        first, length, status = 0, info.size, 200
        if span is not None:
            first, length, status = span[0], span[1] - span[0] + 1, 206
            headers["Content-Range"] = content_range(span[0], span[1], info.size)
        elif (call.headers.get("x-amz-checksum-mode") or "").upper() == "ENABLED":
            # Only for the whole object, which the stored checksum is of.
            for name, value in (info.attributes or {}).items():
                if name.startswith(CHECKSUM_PREFIX):
                    headers["x-amz-checksum-" + name[len(CHECKSUM_PREFIX):]] = value
        headers["x-amz-request-id"] = call.request_id
        for name, value in headers.items():
            request.setHeader(name.encode("latin-1"), value.encode("latin-1", "replace"))
        request.setHeader(b"content-length", b"%d" % length)
        request.setResponseCode(status)
        if request.method == b"HEAD" or length == 0:
            request.finish()
            return
        body = await self.node.get(info, first=first, length=length)
        if request.channel is None:
            await body.close()
            return
        sink = ResponseSink(request)
        request.registerProducer(sink, True)
        try:
            await body.send(sink)
        finally:
            if request.channel is not None:
                request.unregisterProducer()
        if not sink.stopped:
            request.finish()

    _HeadObject = _GetObject

    async def _DeleteObject(self, request: S3HTTPRequest, call: Call, _: Any) -> None:
        op = call.op
        assert op is not None and op.bucket is not None and op.key is not None
        self._need_bucket(call)
        await self._delete(op.bucket, op.key)
        request.send(204, {})

    async def _delete(self, bucket: str, key: str) -> None:
        try:
            await self.node.delete(bucket, key)
        except KoboldError as e:
            if e.code != ErrorCode.NOT_FOUND:
                raise

    async def _DeleteObjects(self, request: S3HTTPRequest, call: Call, _: Any) -> None:
        op = call.op
        assert op is not None and op.bucket is not None
        self._need_bucket(call)
        delete = s3xml.parse_delete(self._body(call))
        deleted, errors = [], []
        for key, version_id in delete.objects:
            try:
                if version_id not in (None, "null"):
                    raise NoSuchKey("No such version")
                await self._delete(op.bucket, key)
            except KoboldError as e:
                error = s3_error(e, key)
                errors.append(s3xml.DeleteError(key, error.code, error.message, version_id))
            except S3Error as e:
                errors.append(s3xml.DeleteError(key, e.code, e.message, version_id))
            else:
                deleted.append((key, version_id))
        request.send(200, {}, s3xml.delete_result(deleted, errors, quiet=delete.quiet))

    # listings

    async def _entries(
        self, bucket: str, prefix: str, delimiter: str | None, after: str | None, limit: int
    ) -> tuple[list[s3xml.ObjectEntry], list[str], bool, str | None]:
        """
        Up to C{limit} objects and common prefixes after C{after}; whether
        more follow, and the last one given (where the next page starts).
        """
        entries: list[s3xml.ObjectEntry] = []
        prefixes: list[str] = []
        last: str | None = None
        truncated = False
        cursor = after
        while True:
            page = await self.node.list_files(bucket, prefix, cursor, 1000)
            for info in page:
                key = cursor = info.key
                if prefixes and key.startswith(prefixes[-1]):
                    continue
                rest = key[len(prefix):]
                common = None
                if delimiter and delimiter in rest:
                    common = prefix + rest[: rest.index(delimiter) + len(delimiter)]
                    if after is not None and common <= after:
                        continue
                if len(entries) + len(prefixes) >= limit:
                    truncated = True
                    break
                if common is not None:
                    prefixes.append(common)
                    last = common
                else:
                    entries.append(s3xml.ObjectEntry(key, info.created, etag_of(info),
                                                     info.size, owner=OWNER))
                    last = key
            else:
                if len(page) < 1000:
                    break
                continue
            break
        return entries, prefixes, truncated, last

    async def _ListObjectsV2(self, request: S3HTTPRequest, call: Call, _: Any) -> None:
        op = call.op
        assert op is not None and op.bucket is not None
        self._need_bucket(call)
        p = list_params(op.params)
        after = p.start_after or None
        if p.continuation_token is not None:
            after = _untoken(p.continuation_token)
        entries, prefixes, truncated, last = await self._entries(
            op.bucket, p.prefix, p.delimiter, after, p.max_keys)
        listing = s3xml.Listing(op.bucket, p.prefix, p.delimiter, p.max_keys, truncated,
                                entries, prefixes, p.url)
        request.send(200, {}, s3xml.list_objects_v2(
            listing, continuation_token=p.continuation_token,
            next_continuation_token=_token(last) if truncated and last else None,
            start_after=p.start_after, fetch_owner=p.fetch_owner))

    async def _ListObjects(self, request: S3HTTPRequest, call: Call, _: Any) -> None:
        op = call.op
        assert op is not None and op.bucket is not None
        self._need_bucket(call)
        p = list_params(op.params)
        entries, prefixes, truncated, last = await self._entries(
            op.bucket, p.prefix, p.delimiter, p.marker or None, p.max_keys)
        listing = s3xml.Listing(op.bucket, p.prefix, p.delimiter, p.max_keys, truncated,
                                entries, prefixes, p.url)
        request.send(200, {}, s3xml.list_objects_v1(listing, marker=p.marker, next_marker=last))

    async def _ListObjectVersions(self, request: S3HTTPRequest, call: Call, _: Any) -> None:
        op = call.op
        assert op is not None and op.bucket is not None
        self._need_bucket(call)
        p = list_params({k: v for k, v in op.params.items() if k != "versions"})
        marker = op.params.get("key-marker", "")
        entries, prefixes, truncated, last = await self._entries(
            op.bucket, p.prefix, p.delimiter, marker or None, p.max_keys)
        listing = s3xml.Listing(op.bucket, p.prefix, p.delimiter, p.max_keys, truncated,
                                entries, prefixes, p.url)
        request.send(200, {}, s3xml.list_object_versions(
            listing, key_marker=marker, version_id_marker=op.params.get("version-id-marker", ""),
            next_key_marker=last, next_version_id_marker="null" if truncated else None))


    # copies

    async def _copy_source(self, call: Call) -> FileInfo:
        """
        The object C{x-amz-copy-source} names, readable by the caller,
        its conditions (C{x-amz-copy-source-if-*}) holding.
        """
        source = parse_copy_source(call.headers.get("x-amz-copy-source") or "")
        if source.version_id not in (None, "null"):
            raise NoSuchKey("No such version", Key=source.key)
        credential = call.credential
        assert credential is not None
        if not credential.allows(source.bucket, False):
            raise AccessDenied()
        if await self.node.store.namespace(source.bucket) is None:
            raise NoSuchBucket(BucketName=source.bucket)
        info = await self._lookup(source.bucket, source.key)
        assert info is not None
        check_conditions(call.headers, etag_of(info), info.created,
                         prefix="x-amz-copy-source-")
        return info

    async def _CopyObject(self, request: S3HTTPRequest, call: Call, _: Any) -> None:
        op = call.op
        assert op is not None and op.bucket is not None and op.key is not None
        source = await self._copy_source(call)
        replace = metadata_directive(call.headers) == "REPLACE"
        if (source.namespace, source.key) == (op.bucket, op.key) and not replace:
            raise InvalidRequest(
                "This copy request is illegal because it is trying to copy an object to itself "
                "without changing the object's metadata, storage class, website redirect "
                "location or encryption attributes."
            )
        attributes = None
        if replace:
            kept = {k: v for k, v in (source.attributes or {}).items()
                    if k.startswith(CHECKSUM_PREFIX)}
            attributes = {**kept, **_attributes(call.headers)}
        await self._check_write_conditions(call)
        if_match = call.headers.get("if-match")
        info = await self.node.copy(
            source, op.bucket, op.key, attributes,
            if_absent=(call.headers.get("if-none-match") or "").strip() == "*",
            if_match=if_match.strip().strip('"') if if_match else None,
        )
        request.send(200, {}, s3xml.copy_object(etag_of(info), info.created))

    # multipart uploads

    async def _CreateMultipartUpload(self, request: S3HTTPRequest, call: Call, _: Any) -> None:
        op = call.op
        assert op is not None and op.bucket is not None and op.key is not None
        upload = await self.node.create_upload(op.bucket, op.key, _attributes(call.headers))
        request.send(200, {}, s3xml.initiate_multipart_upload(op.bucket, op.key,
                                                              upload.upload_id))

    async def _UploadPart(self, request: S3HTTPRequest, call: Call, digests: Digests) -> None:
        stream = call.stream
        assert stream is not None
        part = await stream.finish(digests.sha256, md5=digests.md5)
        call.stream = None
        headers = {"ETag": s3xml.quote_etag(part.md5 or digests.md5)}
        for algorithm, value in digests.checksums.items():
            headers[algorithm.header] = value
        request.send(200, headers)

    async def _UploadPartCopy(self, request: S3HTTPRequest, call: Call, _: Any) -> None:
        op = call.op
        assert op is not None and call.upload is not None
        source = await self._copy_source(call)
        span = parse_copy_range(call.headers.get("x-amz-copy-source-range"), source.size)
        first, length = (span[0], span[1] - span[0] + 1) if span else (0, None)
        part = await self.node.copy_part(call.upload, part_number(op.params), source,
                                         first, length)
        request.send(200, {}, s3xml.copy_part(part.etag, part.file.created))

    async def _CompleteMultipartUpload(self, request: S3HTTPRequest, call: Call, _: Any) -> None:
        op = call.op
        assert op is not None and op.bucket is not None and op.key is not None
        assert call.upload is not None
        parts = s3xml.parse_complete_multipart_upload(self._body(call))
        info = await self.node.complete_upload(
            call.upload.upload_id, [(p.number, p.etag.strip('"')) for p in parts])
        location = f"/{op.bucket}/{op.key}"
        request.send(200, {}, s3xml.complete_multipart_upload(location, op.bucket, op.key,
                                                              etag_of(info)))

    async def _AbortMultipartUpload(self, request: S3HTTPRequest, call: Call, _: Any) -> None:
        assert call.upload is not None
        await self.node.abort_upload(call.upload.upload_id)
        request.send(204, {})

    async def _ListParts(self, request: S3HTTPRequest, call: Call, _: Any) -> None:
        op = call.op
        assert op is not None and op.bucket is not None and op.key is not None
        assert call.upload is not None
        marker = int_param(op.params, "part-number-marker", 0, 0, 10000)
        most = min(int_param(op.params, "max-parts", 1000, 0), 1000)
        parts = await self.node.store.upload_parts(call.upload.upload_id, marker, most + 1)
        truncated = len(parts) > most
        parts = parts[:most]
        entries = [s3xml.PartEntry(p.number, p.file.created, p.etag, p.size) for p in parts]
        request.send(200, {}, s3xml.list_parts(
            op.bucket, op.key, call.upload.upload_id, entries, owner=OWNER,
            part_number_marker=marker, max_parts=most, truncated=truncated))

    async def _ListMultipartUploads(self, request: S3HTTPRequest, call: Call, _: Any) -> None:
        op = call.op
        assert op is not None and op.bucket is not None
        self._need_bucket(call)
        prefix = op.params.get("prefix", "")
        key_marker = op.params.get("key-marker", "")
        id_marker = op.params.get("upload-id-marker", "")
        most = min(int_param(op.params, "max-uploads", 1000, 0), 1000)
        after = (key_marker, id_marker) if key_marker else None
        uploads = await self.node.store.uploads(op.bucket, prefix, after, most + 1)
        truncated = len(uploads) > most
        uploads = uploads[:most]
        entries = [s3xml.UploadEntry(u.key, u.upload_id, u.created) for u in uploads]
        request.send(200, {}, s3xml.list_multipart_uploads(
            op.bucket, entries, owner=OWNER, prefix=prefix or None, key_marker=key_marker,
            upload_id_marker=id_marker, max_uploads=most, truncated=truncated,
            url="encoding-type" in op.params))


def _stop(call: Call, error: KoboldError) -> None:
    """
    The put failed while its body still arrived (a peer taking a copy
    failed): the rest of the body is dropped, the error answered.
    """
    call.stream = None
    if call.body is not None and call.body.error is None:
        call.body.error = error


def _token(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode("utf-8", "surrogatepass")).decode("ascii")


def _untoken(token: str) -> str:
    try:
        raw = base64.b64decode(token.encode("ascii"), altchars=b"-_", validate=True)
        return raw.decode("utf-8")
    except (ValueError, UnicodeError, binascii.Error):
        raise InvalidArgument("The continuation token provided is incorrect",
                              ArgumentName="continuation-token") from None


class S3Site(Site):
    """
    The S3 endpoint's site: every request an L{S3HTTPRequest} answered
    by L{front}; idle connections closed after C{--idle-timeout}.
    """

    requestFactory = S3HTTPRequest

    def __init__(self, front: S3Front, metrics: Any = None) -> None:
        super().__init__(None, reactor=front.node.clock,
                         timeout=front.node.config.idle_timeout)
        self.front = front
        self.metrics = metrics

    def log(self, request: Any) -> None:
        if self.metrics is None:
            return
        call = getattr(request, "_call", None)
        op = call.op if call is not None else None
        code = request.code
        sent = int(getattr(request, "sentLength", 0) or 0)
        received = call.body.received if call is not None and call.body is not None else 0
        started = getattr(request, "started", None)
        self.metrics.record(
            "s3",
            op.operation if op is not None else "unknown",
            op.bucket if op is not None else None,
            op.key if op is not None else None,
            max(sent, received),
            self.reactor.seconds() - started if started is not None else 0.0,
            "ok" if code < 400 else f"s3_{code}",
            bytes_in=received,
            bytes_out=sent,
        )


def make_s3_site(
    node: INode,
    credentials: IS3Credentials,
    region: str = "us-east-1",
    domain: str | None = None,
    metrics: Any = None,
) -> S3Site:
    """
    The S3 site of a server.
    """
    return S3Site(S3Front(node, credentials, region, domain), metrics)
