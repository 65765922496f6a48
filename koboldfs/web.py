"""
Read-only HTTP: the URLs that C{get_url} hands out.

A URL names a stored file by its path under the data directory
(C{/files/ab/cd/<fid><ext>}, or C{/private/<ns>/ab/cd/<fid><ext>}), which is
also what an external web server whose root is the data directory serves
(docs/http.md).  This server answers only for such paths, and only for a
file the metadata has as live and as held here: nothing else under the
data directory (temp uploads, quarantine, the embedded database, a deleted
file's bytes) is ever read, and no request path becomes a file system path.

A thin adapter over the server core (L{koboldfs.interfaces.INode}): the
core finds the file and gives the body source of our copy, read in the
thread pool and paced by the client (a slow one pauses the reads, and no
file is ever held whole in memory).  A full read is checked against the
file's SHA-256 before its last chunk goes out: on a mismatch the connection
is aborted (the client sees a short body, never a complete wrong one) and
the copy is quarantined.  What is HTTP's is here: paths, Range,
conditional requests, caching headers, redirects to a live peer.
"""

from __future__ import annotations

import mimetypes
import re
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IProtocolNegotiationFactory, IPushProducer
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from koboldfs.errors import CorruptReplica
from koboldfs.interfaces import FileInfo, IBodySink, INode, NamespaceInfo

log = Logger()

#: Stored files never change: caches may keep them for a year unasked.
PUBLIC_CACHE = b"public, max-age=31536000, immutable"

# Exactly the paths storage.relpath_for makes; group 1 is that path, group
# 2 the fid.  Raw request paths: a %-escape or a dot segment never matches.
_PATH = re.compile(
    rb"/((?:files|private/(?!\.\.?/)[A-Za-z0-9._-]{1,64})"
    rb"/[0-9a-f]{2}/[0-9a-f]{2}/([0-9a-f]{32})(?:\.[a-z0-9]{1,10})?)"
)
_RANGE = re.compile(rb"bytes=([0-9]*)-([0-9]*)")


class Unsatisfiable(Exception):
    """
    A Range that selects no byte of the file: answered with 416.
    """


def parse_range(header: bytes | None, size: int) -> tuple[int, int] | None:
    """
    The single byte range C{(first, last)} (inclusive) that a Range header
    asks of a C{size}-byte file, or None to send the whole file: no header,
    one that is malformed, or several ranges (which a server may ignore).

    @raise Unsatisfiable: the range starts past the end, or is empty.
    """
    if header is None:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if first:
        start = int(first)
        end = int(last) if last else size - 1
        if last and end < start:
            return None
        if start >= size:
            raise Unsatisfiable()
        return start, min(end, size - 1)
    if not last:
        return None
    suffix = int(last)
    if suffix == 0 or size == 0:
        raise Unsatisfiable()
    return max(0, size - suffix), size - 1


def _etag_matches(header: bytes, etag: bytes) -> bool:
    """
    Whether an If-None-Match list names C{etag} (weak comparison).
    """
    tags = [tag.strip() for tag in header.split(b",")]
    return b"*" in tags or any(tag.removeprefix(b"W/") == etag for tag in tags)


@implementer(IPushProducer, IBodySink)
class ResponseSink:
    """
    A response body the core's body source writes into, paced by the
    client: the connection pauses and resumes it, and a write returns a
    Deferred while it is paused.
    """

    frame = None

    def __init__(self, request: Request) -> None:
        self._request = request
        self.paused = False
        self.stopped = False
        self._waiting: defer.Deferred[None] | None = None
        request.notifyFinish().addErrback(lambda _: self.stopProducing())

    @property
    def gone(self) -> bool:
        return self.stopped

    def begin(self) -> None:
        pass  # the headers are set

    def write(self, data: bytes) -> defer.Deferred[None]:
        self._request.write(data)
        return self.wait()

    def abort(self) -> None:
        self._request.transport.abortConnection()

    def wait(self) -> defer.Deferred[None]:
        if not self.paused or self.stopped:
            return defer.succeed(None)
        self._waiting = defer.Deferred()
        return self._waiting

    def _wake(self) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(None)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._wake()

    def stopProducing(self) -> None:
        self.stopped = True
        self._wake()


class FileResource(Resource):
    """
    Serves GET and HEAD of the files this server holds; everything else is
    404 (other methods: 405, or 501 for those Twisted does not know).
    """

    isLeaf = True

    def __init__(self, node: INode) -> None:
        super().__init__()
        self.node = node

    def render_GET(self, request: Request) -> Any:
        d = defer.ensureDeferred(self._serve(request))
        d.addErrback(self._failed, request)
        return NOT_DONE_YET

    render_HEAD = render_GET

    def _failed(self, failure: Any, request: Request) -> None:
        log.failure(
            "HTTP {method} {path} failed", failure, method=request.method, path=request.path
        )
        if request.startedWriting and not _gone(request):
            request.transport.abortConnection()
        else:
            _end(request, http.INTERNAL_SERVER_ERROR)

    async def _lookup(self, request: Request) -> tuple[FileInfo, NamespaceInfo] | None:
        """
        The live file that the request's path names exactly, and its
        namespace; None for any other path.
        """
        match = _PATH.fullmatch(request.path)
        if match is None:
            return None
        found: tuple[FileInfo, NamespaceInfo] | None = await self.node.lookup_stored(
            match.group(2).decode(), match.group(1).decode()
        )
        return found

    async def _serve(self, request: Request) -> None:
        found = await self._lookup(request)
        if found is None:
            _end(request, http.NOT_FOUND)
            return
        info, namespace = found
        expires = _arg(request, b"e")
        if not self.node.url_allowed(info, namespace, expires, _arg(request, b"s")):
            _end(request, http.FORBIDDEN)
            return
        if namespace.private:
            now = self.node.clock.seconds()
            cache = b"private, max-age=%d" % (int(expires) - int(now))  # type: ignore[arg-type]
        else:
            cache = PUBLIC_CACHE
        etag = f'"{info.sha256}"'.encode()
        modified = http.datetimeToString(int(info.created))
        request.setHeader(b"etag", etag)
        request.setHeader(b"last-modified", modified)
        request.setHeader(b"cache-control", cache)
        if _not_modified(request, etag, int(info.created)):
            _end(request, http.NOT_MODIFIED)
            return
        if self.node.name not in info.replicas:
            self._elsewhere(request, info, namespace)
            return
        await self._send(request, info, namespace, etag, modified)

    async def _send(
        self,
        request: Request,
        info: FileInfo,
        namespace: NamespaceInfo,
        etag: bytes,
        modified: bytes,
    ) -> None:
        size = info.size
        try:
            wanted = _wanted_range(request, size, etag, modified)
        except Unsatisfiable:
            request.setHeader(b"content-range", b"bytes */%d" % size)
            _end(request, http.REQUESTED_RANGE_NOT_SATISFIABLE)
            return
        first, last = wanted or (0, size - 1)
        length = last - first + 1
        # Headers go before the first byte: a copy of one chunk is not
        # read whole first (a bad one is cut short, never a whole 200).
        body = await self.node.open_local(info, first, length, small_whole=False)
        if body is None:
            self._elsewhere(request, info, namespace)
            return
        if wanted:
            request.setResponseCode(http.PARTIAL_CONTENT)
            request.setHeader(b"content-range", b"bytes %d-%d/%d" % (first, last, size))
        request.setHeader(b"accept-ranges", b"bytes")
        request.setHeader(b"content-type", _content_type(info.path))
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"content-length", b"%d" % length)
        if request.method == b"HEAD" or _gone(request):
            await body.close()
            if not _gone(request):
                request.finish()
            return
        sink = ResponseSink(request)
        request.registerProducer(sink, True)
        try:
            await body.send(sink)
        except CorruptReplica:
            return  # cut already: better than a complete wrong body
        finally:
            if not _gone(request):
                request.unregisterProducer()
        if not sink.stopped:
            request.finish()

    def _elsewhere(self, request: Request, info: FileInfo, namespace: NamespaceInfo) -> None:
        """
        We hold no good copy: send the client to a live server that does,
        with a URL as valid as the one it came with.
        """
        peers = self.node.peers_holding(info)
        if not set(info.replicas) - {self.node.name}:
            # Ours was the last copy, or there is none: not an outage.
            request.setHeader(b"cache-control", b"no-store")
            request.setHeader(b"x-koboldfs-error", b"DATA_LOST")
            _end(request, http.GONE)
            return
        if not peers:
            _end(request, http.SERVICE_UNAVAILABLE)
            return
        expires = _arg(request, b"e")
        url = self.node.url_for(info, namespace, peers[0], int(expires) if expires else 0)
        request.setHeader(b"location", url.encode())
        request.setHeader(b"cache-control", b"no-store")
        _end(request, http.TEMPORARY_REDIRECT)


def _arg(request: Request, name: bytes) -> str | None:
    values = request.args.get(name)
    return values[0].decode("ascii", "replace") if values else None


def _gone(request: Request) -> bool:
    """
    Whether the client has disconnected (Twisted then drops the channel).
    """
    return request.channel is None


def _end(request: Request, code: int) -> None:
    """
    Answer with status C{code} and no body, unless the client is gone.
    """
    if _gone(request) or request.finished:
        return
    request.setResponseCode(code)
    if code != http.NOT_MODIFIED:
        # A 304's Content-Length would have to be the file's.
        request.setHeader(b"content-length", b"0")
    request.finish()


def _not_modified(request: Request, etag: bytes, created: int) -> bool:
    """
    Whether the client's copy is current: If-None-Match, or failing that
    If-Modified-Since.
    """
    tags = request.getHeader(b"if-none-match")
    if tags is not None:
        return _etag_matches(tags, etag)
    since = request.getHeader(b"if-modified-since")
    if since is None:
        return False
    try:
        return http.stringToDatetime(since) >= created
    except ValueError:
        return False


def _wanted_range(
    request: Request, size: int, etag: bytes, modified: bytes
) -> tuple[int, int] | None:
    """
    The range to send, or None for the whole file; an If-Range that does
    not match this file's validators asks for the whole file.
    """
    condition = request.getHeader(b"if-range")
    if condition is not None and condition.strip() not in (etag, modified):
        return None
    return parse_range(request.getHeader(b"range"), size)


def _content_type(path: str) -> bytes:
    guessed, _ = mimetypes.guess_type(path, strict=False)
    return (guessed or "application/octet-stream").encode()


class _Guard(ProtocolWrapper):
    """
    Holds an HTTP connection to the server's limits: counted with the binary
    protocol's connections (L{Node.admit}), refused with 503 past them; no
    request line and headers within C{--handshake-timeout} of connecting,
    or within C{--frame-timeout} of a request's first byte, and it is
    dropped (Twisted's own timeout restarts on every byte, so a client
    trickling a byte a second would be kept forever).
    """

    _deadline: Any = None
    _tail = b""
    _admitted: str | None = None

    def __init__(self, factory: WrappingFactory, wrapped: Any, node: INode) -> None:
        super().__init__(factory, wrapped)
        self.node = node

    def makeConnection(self, transport: Any) -> None:
        address = getattr(transport.getPeer(), "host", None) or "local"
        refused = self.node.admit(address)
        if refused is not None:
            self.transport = transport
            self.connected = True
            reason = refused.encode("utf-8", "replace")
            transport.write(
                b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\n"
                b"content-type: text/plain\r\ncontent-length: %d\r\n\r\n%s" % (len(reason), reason)
            )
            transport.loseConnection()
            return
        self._admitted = address
        self._arm(self.node.config.handshake_timeout)
        super().makeConnection(transport)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.node.clock.callLater(seconds, self._tooSlow)

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _tooSlow(self) -> None:
        self._deadline = None
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._admitted is None:
            return
        if self._deadline is None:
            # A new request begins: its head must arrive in time.
            self._arm(self.node.config.frame_timeout)
            self._tail = b""
        seen = self._tail + data
        if b"\r\n\r\n" in seen:
            self._disarm()
        self._tail = seen[-3:]
        super().dataReceived(data)

    def connectionLost(self, reason: Any) -> None:
        self._disarm()
        if self._admitted is None:
            return
        self.node.leave(self._admitted)
        self._admitted = None
        super().connectionLost(reason)


@implementer(IProtocolNegotiationFactory)
class _GuardedFactory(WrappingFactory):
    """
    Says over TLS (ALPN) that it speaks HTTP/1.1: a factory that says
    nothing makes Twisted fail the handshake of every client that asks
    (curl, browsers, boto3) with an internal error alert.
    """

    def acceptableProtocols(self) -> list[bytes]:
        return [b"http/1.1"]


def guarded(node: INode, site: Site) -> WrappingFactory:
    """
    C{site} held to the server's connection limits and timeouts.
    """
    factory = _GuardedFactory(site)
    factory.protocol = lambda wrapping, wrapped: _Guard(wrapping, wrapped, node)
    return factory


class ServerResource(FileResource):
    """
    The files, and at three paths that no file URL can take (those all
    start C{/files/} or C{/private/}): the status page C{/}, its data
    C{/status.json}, and the Prometheus metrics C{/metrics}.
    """

    def __init__(self, node: INode, status: Any = None, metrics: Any = None) -> None:
        super().__init__(node)
        self.status = status
        self.metrics = metrics

    def render_GET(self, request: Request) -> Any:
        path = request.path
        if path == b"/" and self.status is not None:
            return _page(request, b"text/html; charset=utf-8", self.status.html())
        if path == b"/status.json" and self.status is not None:
            return _page(request, b"application/json", self.status.json())
        if path == b"/metrics" and self.metrics is not None:
            from prometheus_client import CONTENT_TYPE_LATEST

            return _page(request, CONTENT_TYPE_LATEST.encode(), self.metrics.exposition())
        return super().render_GET(request)

    render_HEAD = render_GET


def _page(request: Request, content_type: bytes, body: bytes) -> bytes:
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


class _Site(Site):
    """
    A Site whose finished requests go to the server's metrics and
    structured log (L{koboldfs.metrics}), not to a combined access log.
    """

    def __init__(self, resource: Any, metrics: Any, reactor: Any) -> None:
        super().__init__(resource, reactor=reactor)
        self.metrics = metrics

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        if self.metrics is not None and channel is not None:
            gauge = self.metrics.connections.labels("http")
            gauge.inc()
            lost = channel.connectionLost

            def connectionLost(reason: Any) -> None:
                gauge.dec()
                lost(reason)

            channel.connectionLost = connectionLost
        return channel

    def getResourceFor(self, request: Request) -> Any:
        request.koboldfs_started = self.reactor.seconds()  # type: ignore[attr-defined]
        return super().getResourceFor(request)

    def log(self, request: Request) -> None:
        if self.metrics is not None:
            self.metrics.http(request, getattr(request, "koboldfs_started", None))


def make_site(node: INode, status: Any = None, metrics: Any = None) -> Site:
    """
    The HTTP site of a server: its files, and given C{status} and
    C{metrics}, its status page and metrics.
    """
    resource = ServerResource(node, status, metrics)
    return _Site(resource, metrics, reactor=node.clock)
