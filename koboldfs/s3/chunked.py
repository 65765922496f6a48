"""
An incremental decoder of aws-chunked bodies (C{Content-Encoding:
aws-chunked}), the framing of the C{STREAMING-*} payload modes:

    <hex size>[;chunk-signature=<sig>]\\r\\n<size bytes>\\r\\n  ...
    0[;chunk-signature=<sig>]\\r\\n
    [<trailer name>:<value>\\r\\n ...]
    [x-amz-trailer-signature:<sig>\\r\\n]
    \\r\\n

(the HTTP layer has already removed any C{Transfer-Encoding: chunked}
framing around it).  Feed it bytes as they arrive; it returns the
payload.  It holds at most one chunk line or trailer line (bounded):
chunk data passes straight through, so the payload of a chunk is handed
out before that chunk's signature, which follows it, is checked.  The
caller must therefore treat the payload as provisional until L{finish}
returns: any exception means the whole body is to be discarded.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from koboldfs.s3.errors import (
    IncompleteBody,
    InvalidRequest,
    MalformedTrailerError,
    S3Error,
    SignatureDoesNotMatch,
)
from koboldfs.s3.headers import Headers, trailer_names
from koboldfs.s3.sigv4 import Authenticated, ChunkSigner, PayloadMode

#: The longest chunk line or trailer line taken.
MAX_LINE = 4096
#: The most bytes of trailers taken, all lines together.
MAX_TRAILERS = 16384
TRAILER_SIGNATURE = "x-amz-trailer-signature"

_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(;.*)?\Z", re.S)
_SIGNATURE_EXT = re.compile(rb";chunk-signature=([0-9a-f]{64})\Z")
_TRAILER = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*(.*?)[ \t]*\Z", re.S)


@dataclass
class Decoded:
    """
    What a complete aws-chunked body carried besides its payload.

    @ivar size: payload bytes decoded (equal to the declared length).
    @ivar chunks: data chunks, the final empty one not counted.
    @ivar trailers: the trailing headers (lowercase names), the trailer
        signature excluded.
    @ivar signed: whether chunk signatures were checked (all matched).
    """

    size: int
    chunks: int
    trailers: dict[str, str] = field(default_factory=dict)
    signed: bool = False


class ChunkedDecoder:
    """
    Decodes one aws-chunked body.

    @param decoded_length: C{x-amz-decoded-content-length}: the body must
        decode to exactly this many bytes.
    @param signer: for the signed modes, what checks the chain of chunk
        signatures (L{koboldfs.s3.sigv4.Authenticated.chunks}); None for
        unsigned chunks.
    @param trailers: the names declared in C{x-amz-trailer}: the only
        trailers taken, and each must come.
    @param signed_trailer: whether the trailers carry
        C{x-amz-trailer-signature} (C{STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER}).
    """

    def __init__(
        self,
        decoded_length: int,
        *,
        signer: ChunkSigner | None = None,
        trailers: frozenset[str] = frozenset(),
        signed_trailer: bool = False,
    ) -> None:
        if signed_trailer and signer is None:
            raise ValueError("a signed trailer needs a signer")
        self._declared = decoded_length
        self._signer = signer
        self._expected_trailers = frozenset(name.lower() for name in trailers)
        self._signed_trailer = signed_trailer
        self._previous = signer.seed if signer is not None else ""
        self._line = bytearray()
        self._state = "size"
        self._remaining = 0  # of the current chunk's data
        self._crlf = b""  # of the CRLF after a chunk's data, seen so far
        self._chunk_hash = hashlib.sha256()
        self._chunk_signature = ""
        self._decoded = 0
        self._chunks = 0
        self._trailers: dict[str, str] = {}
        self._trailer_bytes = bytearray()  # canonical form, for the trailer signature
        self._trailer_signature: str | None = None
        self._trailer_size = 0
        self._error: S3Error | None = None

    @classmethod
    def for_request(cls, auth: Authenticated, headers: Headers, length: int) -> ChunkedDecoder:
        """
        The decoder of a request's aws-chunked body: its chunk signer, the
        trailers its C{x-amz-trailer} declares, signed or not as its
        payload mode says.

        @param length: its C{x-amz-decoded-content-length}
            (L{koboldfs.s3.request.payload_length}).
        """
        return cls(
            length,
            signer=auth.chunks,
            trailers=frozenset(trailer_names(headers)),
            signed_trailer=auth.payload is PayloadMode.STREAMING_SIGNED_TRAILER,
        )

    @property
    def buffered(self) -> int:
        """
        Bytes held (a partial line), never more than L{MAX_LINE}.
        """
        return len(self._line)

    @property
    def done(self) -> bool:
        """
        Whether the whole body, trailers included, has been read.
        """
        return self._state == "done"

    def feed(self, data: bytes) -> list[bytes]:
        """
        Take more of the encoded body; return the payload bytes it held.

        @raise S3Error: malformed framing (L{InvalidRequest}), a body longer
            or shorter than declared (L{InvalidRequest}, L{IncompleteBody}),
            a chunk signature that does not chain
            (L{SignatureDoesNotMatch}), bad or undeclared trailers
            (L{MalformedTrailerError}); raised again by every later call.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._feed(data)
        except S3Error as e:
            self._error = e
            self._line.clear()
            raise

    def finish(self) -> Decoded:
        """
        The body has ended: return what it carried.

        @raise IncompleteBody: it ended before its final chunk and trailers.
        """
        if self._error is not None:
            raise self._error
        if self._state != "done":
            self._error = IncompleteBody(
                f"the aws-chunked body ended early, after {self._decoded} of "
                f"{self._declared} bytes"
            )
            self._line.clear()
            raise self._error
        return Decoded(self._decoded, self._chunks, dict(self._trailers),
                       signed=self._signer is not None)

    # -- the state machine

    def _feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        view = memoryview(data)
        i, n = 0, len(data)
        while i < n:
            state = self._state
            if state == "data":
                take = min(self._remaining, n - i)
                piece = bytes(view[i:i + take])
                if self._signer is not None:
                    self._chunk_hash.update(piece)
                out.append(piece)
                self._remaining -= take
                i += take
                if self._remaining == 0:
                    self._state = "crlf"
            elif state == "crlf":
                want = 2 - len(self._crlf)
                self._crlf += bytes(view[i:i + want])
                i += min(want, n - i)
                if len(self._crlf) == 2:
                    if self._crlf != b"\r\n":
                        raise InvalidRequest("aws-chunked: a chunk's data is not followed by CRLF")
                    self._crlf = b""
                    self._end_chunk()
            elif state == "done":
                raise InvalidRequest("aws-chunked: data after the end of the body")
            else:
                end = data.find(b"\n", i)
                stop = n if end < 0 else end + 1
                if len(self._line) + (stop - i) > MAX_LINE:
                    raise InvalidRequest(f"aws-chunked: a line longer than {MAX_LINE} bytes")
                self._line += view[i:stop]
                i = stop
                if end >= 0:
                    line = bytes(self._line)
                    self._line.clear()
                    if not line.endswith(b"\r\n"):
                        raise InvalidRequest("aws-chunked: a line not ended by CRLF")
                    if state == "size":
                        self._size_line(line[:-2])
                    else:
                        self._trailer_line(line[:-2])
        return out

    def _size_line(self, line: bytes) -> None:
        m = _SIZE.match(line)
        if not m:
            raise InvalidRequest("aws-chunked: a chunk size is not hexadecimal")
        size = int(m.group(1), 16)
        extension = m.group(2) or b""
        if self._signer is not None:
            sig = _SIGNATURE_EXT.match(extension)
            if not sig:
                raise InvalidRequest("aws-chunked: a chunk without its chunk-signature")
            self._chunk_signature = sig.group(1).decode("ascii")
        if size > self._declared - self._decoded:
            raise InvalidRequest(
                "aws-chunked: the body is longer than x-amz-decoded-content-length "
                f"({self._declared})"
            )
        self._decoded += size
        if size:
            self._remaining = size
            self._state = "data"
            return
        if self._decoded != self._declared:
            raise IncompleteBody(
                f"the aws-chunked body decodes to {self._decoded} bytes, not the "
                f"{self._declared} of x-amz-decoded-content-length"
            )
        self._check_chunk_signature()
        self._state = "trailer"

    def _end_chunk(self) -> None:
        self._chunks += 1
        self._check_chunk_signature()
        self._state = "size"

    def _check_chunk_signature(self) -> None:
        if self._signer is None:
            return
        expected = self._signer.chunk(self._previous, self._chunk_hash.hexdigest())
        if not self._signer.same(expected, self._chunk_signature):
            raise SignatureDoesNotMatch(
                "The chunk signature does not match: the chunk was changed, reordered "
                "or the chain broken",
                SignatureProvided=self._chunk_signature,
            )
        self._previous = expected
        self._chunk_hash = hashlib.sha256()

    def _trailer_line(self, line: bytes) -> None:
        self._trailer_size += len(line) + 2
        if self._trailer_size > MAX_TRAILERS:
            raise MalformedTrailerError(f"the trailers are longer than {MAX_TRAILERS} bytes")
        if line == b"":
            self._end_trailers()
            return
        m = _TRAILER.match(line)
        if not m or self._trailer_signature is not None:
            raise MalformedTrailerError()
        name = m.group(1).decode("ascii").lower()
        value = m.group(2).decode("latin-1")
        if name == TRAILER_SIGNATURE and self._signed_trailer:
            self._trailer_signature = value
            return
        if name not in self._expected_trailers:
            raise MalformedTrailerError(
                f"the trailer {name[:64]} was not declared in x-amz-trailer"
            )
        if name in self._trailers:
            raise MalformedTrailerError(f"the trailer {name[:64]} is sent twice")
        self._trailers[name] = value
        self._trailer_bytes += f"{name}:{value}\n".encode("latin-1")

    def _end_trailers(self) -> None:
        missing = sorted(self._expected_trailers - set(self._trailers))
        if missing:
            raise MalformedTrailerError(
                f"the trailers declared in x-amz-trailer did not come: {', '.join(missing)}"
            )
        if self._signed_trailer:
            assert self._signer is not None
            if self._trailer_signature is None:
                raise MalformedTrailerError("the trailers are not signed (x-amz-trailer-signature)")
            expected = self._signer.trailer(self._previous, bytes(self._trailer_bytes))
            if not self._signer.same(expected, self._trailer_signature):
                raise SignatureDoesNotMatch(
                    "The trailer signature does not match",
                    SignatureProvided=self._trailer_signature[:128],
                )
        self._state = "done"
