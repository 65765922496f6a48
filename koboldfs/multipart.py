"""
Multipart uploads, and copies, in the core (docs/s3-store.md): what the S3
front end calls through L{koboldfs.node.Node}.

A part is put like any file (forwarded to peers as its namespace wants,
its MD5 computed as it arrives) and recorded as a part
(L{koboldfs.metadata.multipart}).  Completing an upload assembles the
object into a new ordinary file: the parts' bytes are streamed, each from
this server's copy or relayed from a peer holding one, into a put of the
whole, under the same flow control as a client's upload (the disk and the
peers taking copies pause the reading), so memory stays bounded whatever
the size.  A copy (S3's CopyObject, and UploadPartCopy) is the same
stream from one source.  The finished object is a file like any other:
replication, scrubbing, get_url and the binary client know nothing of
parts.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any, Iterable, Mapping

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from koboldfs.attributes import check_attributes
from koboldfs.errors import ErrorCode, MultipartError, ServerError
from koboldfs.interfaces import Extras, FileInfo, IBodySink, INode, PartInfo, UploadInfo
from koboldfs.names import check_key, check_namespace
from koboldfs.periodic import Periodic

#: A L{koboldfs.node.PutStream} (not imported: the core imports this).
PutStream = Any

log = Logger()

#: S3's bounds: part numbers, and the least size of every part but the last.
MAX_PARTS = 10_000
MIN_PART_SIZE = 5 * 1024 * 1024
#: Uploads aborted per sweep query.
SWEEP_BATCH = 100


def new_upload_id() -> str:
    """
    A fresh upload id: 128 random bits, in hex.
    """
    return secrets.token_hex(16)


def check_part_number(number: object) -> int:
    """
    @raise MultipartError: C{InvalidArgument} unless 1 to L{MAX_PARTS}.
    """
    if type(number) is not int or not 1 <= number <= MAX_PARTS:
        raise MultipartError(
            "InvalidArgument", f"part numbers are 1 to {MAX_PARTS}, not {number!r}"
        )
    return number


def multipart_md5(md5s: Iterable[str]) -> str:
    """
    S3's MD5 of a multipart object: the MD5 of its parts' binary MD5s.
    """
    return hashlib.md5(
        b"".join(bytes.fromhex(md5) for md5 in md5s), usedforsecurity=False
    ).hexdigest()


@implementer(IBodySink, IPushProducer)
class _Pipe:
    """
    Bytes read from stored files (a body's sink) written into a put
    (whose producer this is): a write waits while the put is paused, so
    at most the put's buffer and one chunk are in memory.
    """

    frame = None

    def __init__(self) -> None:
        self.stream: PutStream | None = None
        self.gone = False
        self._paused = False
        self._waiting: defer.Deferred[None] | None = None

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(None)

    def stopProducing(self) -> None:
        self.gone = True
        self.resumeProducing()

    def begin(self) -> None:
        pass

    def write(self, data: bytes) -> defer.Deferred[None] | None:
        assert self.stream is not None
        self.stream.write(data)
        if self._paused and self._waiting is None:
            self._waiting = defer.Deferred()
        return self._waiting

    def abort(self) -> None:
        self.gone = True


class Multipart:
    """
    The core's multipart uploads and copies, for one L{koboldfs.node.Node}.
    """

    def __init__(self, node: INode) -> None:
        self.node = node

    async def create(self, ns: str, key: str, attributes: Mapping[str, str] | None) -> UploadInfo:
        upload_id = new_upload_id()
        return await self.node.store.create_upload(
            upload_id, check_namespace(ns), check_key(key), check_attributes(attributes)
        )

    def upload_part(
        self,
        upload: UploadInfo,
        number: int,
        size: int | None,
        producer: IPushProducer,
        failed: Any,
    ) -> PutStream:
        check_part_number(number)
        stream = self.node.put(
            upload.namespace, upload.key, size, producer, failed=failed, md5=True
        )
        stream.put.part = (upload.upload_id, number)
        return stream

    async def copy_part(
        self, upload: UploadInfo, number: int, source: FileInfo, first: int, length: int | None
    ) -> PartInfo:
        check_part_number(number)
        pipe = _Pipe()
        stream = self.upload_part(upload, number, _size(source, first, length), pipe, None)
        info = await self._fill(stream, pipe, [(source, first, length)], None, Extras())
        return PartInfo(number, info)

    async def copy(
        self,
        source: FileInfo,
        ns: str,
        key: str,
        attributes: Mapping[str, str] | None,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> FileInfo:
        extras = Extras(
            attributes=check_attributes(source.attributes if attributes is None else attributes),
            if_absent=if_absent,
            if_match=if_match,
        )
        pipe = _Pipe()
        stream = self.node.put(ns, key, source.size, pipe, md5=True)
        # The source's MD5, when it has one, checks the copy as it is made.
        check = source.md5 if source.parts is None else None
        return await self._fill(stream, pipe, [(source, 0, None)], check, extras)

    async def complete(self, upload_id: str, requested: list[tuple[int, str]]) -> FileInfo:
        node = self.node
        upload = await node.store.find_upload(upload_id)
        if upload is None:
            raise MultipartError("NoSuchUpload", f"no multipart upload {upload_id}")
        have = {
            part.number: part for part in await node.store.upload_parts(upload_id, 0, MAX_PARTS)
        }
        chosen = _chosen(requested, have)
        pipe = _Pipe()
        size = sum(part.size for part in chosen)
        stream = node.put(upload.namespace, upload.key, size, pipe)
        stream.put.completes = (upload_id, tuple((part.number, part.file.id) for part in chosen))
        sizes = {part.size for part in chosen[:-1]}
        extras = Extras(
            md5=multipart_md5(part.file.md5 or "" for part in chosen),
            parts=len(chosen),
            part_size=chosen[0].size if len(sizes) <= 1 else None,
        )
        return await self._fill(
            stream, pipe, [(part.file, 0, None) for part in chosen], None, extras
        )

    async def abort(self, upload_id: str) -> int:
        return await self.node.store.abort_upload(
            upload_id, self.node.clock.seconds()
        )

    async def _fill(
        self,
        stream: PutStream,
        pipe: _Pipe,
        sources: list[tuple[FileInfo, int, int | None]],
        md5: str | None,
        extras: Extras,
    ) -> FileInfo:
        """
        Stream C{sources} (file, first byte, length) into C{stream} and
        finish it with C{extras}; give the put up if any read fails.
        """
        pipe.stream = stream
        try:
            for info, first, length in sources:
                body = await self.node.get(info, first=first, length=length, exact=True)
                await body.send(pipe)
                if pipe.gone:
                    raise ServerError(ErrorCode.UNAVAILABLE, f"reading {info.key!r} failed")
        except BaseException:
            stream.abort()
            raise
        return await stream.finish_with(None, md5, extras)

    async def sweep(self) -> int:
        """
        Abort the uploads older than the server's C{s3_upload_timeout};
        return how many.
        """
        node = self.node
        now = node.clock.seconds()
        expired = await node.store.expire_uploads(
            now - node.config.s3_upload_timeout, now, SWEEP_BATCH
        )
        if expired:
            log.info(
                "{name} aborted {n} abandoned multipart uploads", name=node.name, n=len(expired)
            )
        return len(expired)


def _size(source: FileInfo, first: int, length: int | None) -> int:
    if not 0 <= first <= source.size or (length is not None and length < 0):
        raise MultipartError("InvalidArgument", f"no bytes {first}+{length} in {source.size}")
    return source.size - first if length is None else min(length, source.size - first)


def _chosen(requested: list[tuple[int, str]], have: dict[int, PartInfo]) -> list[PartInfo]:
    """
    The parts a completion names, checked as S3 checks them.

    @raise MultipartError: none named (C{MalformedXML}), numbers not
        ascending (C{InvalidPartOrder}), a part missing or of another ETag
        (C{InvalidPart}), a part but the last under 5 MiB
        (C{EntityTooSmall}).
    """
    if not requested:
        raise MultipartError("MalformedXML", "a completion names at least one part")
    chosen = []
    previous = 0
    for number, etag in requested:
        if number <= previous:
            raise MultipartError("InvalidPartOrder", "parts must be listed in ascending order")
        previous = number
        part = have.get(number)
        if part is None or part.etag != etag.strip('"').lower():
            raise MultipartError("InvalidPart", f"part {number} was not uploaded with that ETag")
        chosen.append(part)
    for part in chosen[:-1]:
        if part.size < MIN_PART_SIZE:
            raise MultipartError(
                "EntityTooSmall",
                f"part {part.number} is {part.size} bytes: all but the last are 5 MiB or more",
            )
    return chosen


class UploadSweeper(Periodic):
    """
    Runs L{Multipart.sweep} every C{interval} seconds, as a service.
    """

    def __init__(self, multipart: Multipart, clock: Any, interval: float) -> None:
        super().__init__(
            "collecting abandoned multipart uploads",
            multipart.sweep,
            interval,
            clock,
            now=False,
            default=0,
        )


def upload_sweep_interval(timeout: float) -> float:
    """
    How often to look for abandoned uploads: a tenth of the timeout, at
    most hourly, at least every second.
    """
    return max(1.0, min(timeout / 10, 3600.0))
