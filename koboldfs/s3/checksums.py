"""
The digests S3 requests carry, computed incrementally, and one verifier
of every digest a body promises.

C{x-amz-checksum-*} values are the base64 of the big-endian digest:
CRC32 (zlib's, ISO-HDLC), CRC32C (Castagnoli), CRC64NVME (the NVMe
CRC-64, reflected 0x9A6C9329AC4BC9B5), SHA-1 and SHA-256.  CRC32C and
CRC64NVME come from awscrt (AWS's common runtime, which botocore itself
uses for them: tens of GB/s, with the GIL released), CRC32 from zlib,
the rest from hashlib.  Every one of them releases the GIL on large
buffers, so a caller hashing a large body runs L{BodyVerifier.update}
in a thread (e.g. the thread job that writes the upload to disk) to keep
the reactor free; the objects here are not shared between threads, so
call each from one thread at a time.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import zlib
from dataclasses import dataclass, field
from typing import Protocol

from awscrt import checksums as _crt  # type: ignore[import-untyped]

from koboldfs.s3.errors import (
    BadDigest,
    InvalidDigest,
    InvalidRequest,
    XAmzContentSHA256Mismatch,
)
from koboldfs.s3.headers import Headers, trailer_names


class Hasher(Protocol):
    def update(self, data: bytes) -> None: ...

    def digest(self) -> bytes: ...


class _CRC:
    """
    A running CRC as a hasher: C{update}, then the big-endian C{digest}.
    """

    def __init__(self, function: object, width: int) -> None:
        self._function = function
        self._width = width
        self._value = 0

    def update(self, data: bytes) -> None:
        self._value = self._function(data, self._value)  # type: ignore[operator]

    def digest(self) -> bytes:
        return self._value.to_bytes(self._width, "big")


class Algorithm(enum.Enum):
    """
    The algorithms of C{x-amz-checksum-*} (the value: as in the header
    name and C{x-amz-sdk-checksum-algorithm}, upper case).
    """

    CRC32 = "CRC32"
    CRC32C = "CRC32C"
    CRC64NVME = "CRC64NVME"
    SHA1 = "SHA1"
    SHA256 = "SHA256"

    @property
    def header(self) -> str:
        """
        C{x-amz-checksum-crc32} and so on.
        """
        return "x-amz-checksum-" + self.value.lower()

    @property
    def digest_size(self) -> int:
        return _SIZES[self]

    def hasher(self) -> Hasher:
        """
        A new running digest of this algorithm.
        """
        if self is Algorithm.CRC32:
            return _CRC(zlib.crc32, 4)
        if self is Algorithm.CRC32C:
            return _CRC(_crt.crc32c, 4)
        if self is Algorithm.CRC64NVME:
            return _CRC(_crt.crc64nvme, 8)
        return hashlib.new(self.value.lower())

    @classmethod
    def from_header(cls, name: str) -> Algorithm | None:
        """
        The algorithm of an C{x-amz-checksum-*} header name, or None.
        """
        return _BY_HEADER.get(name.lower())


_SIZES = {
    Algorithm.CRC32: 4,
    Algorithm.CRC32C: 4,
    Algorithm.CRC64NVME: 8,
    Algorithm.SHA1: 20,
    Algorithm.SHA256: 32,
}
_BY_HEADER = {a.header: a for a in Algorithm}


def checksum(algorithm: Algorithm, data: bytes) -> str:
    """
    The C{x-amz-checksum-*} value of C{data} (base64 of the digest).
    """
    h = algorithm.hasher()
    h.update(data)
    return base64.b64encode(h.digest()).decode("ascii")


def content_md5(data: bytes) -> str:
    """
    The C{Content-MD5} value of C{data} (base64 of the MD5).
    """
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


def multipart_etag(part_md5s: list[bytes]) -> str:
    """
    S3's ETag of a multipart object, unquoted: the MD5 of the parts'
    binary MD5s, then C{-} and the number of parts.
    """
    return f"{hashlib.md5(b''.join(part_md5s)).hexdigest()}-{len(part_md5s)}"


def _decode_b64(value: str, size: int) -> bytes | None:
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == size else None


@dataclass
class Digests:
    """
    The digests of a body that verified.

    @ivar size: bytes hashed.
    @ivar md5: its MD5, hex (the ETag of a single-part object).
    @ivar sha256: its SHA-256, hex, when it was computed (the request
        carried one or asked for it).
    @ivar checksums: each C{x-amz-checksum-*} algorithm the request
        carried, and the base64 value (which matched).
    """

    size: int
    md5: str
    sha256: str | None = None
    checksums: dict[Algorithm, str] = field(default_factory=dict)


class BodyVerifier:
    """
    Checks a body, in one pass as it streams, against every digest its
    request carries: C{Content-MD5}, the hex C{x-amz-content-sha256},
    C{x-amz-checksum-*} in a header or (aws-chunked) a trailer; and
    computes the MD5 for the ETag.

    @param content_md5: the C{Content-MD5} header (base64), or None.
    @param content_sha256: the SHA-256 (hex) the signature promises, or None.
    @param checksums: algorithm -> the base64 value from a header.
    @param trailer: an algorithm whose value comes in a trailer (given to
        L{finish}), or None.
    @param sha256: compute the SHA-256 even if nothing asks for it.
    """

    def __init__(
        self,
        *,
        content_md5: str | None = None,
        content_sha256: str | None = None,
        checksums: dict[Algorithm, str] | None = None,
        trailer: Algorithm | None = None,
        sha256: bool = False,
    ) -> None:
        self._md5_expected: bytes | None = None
        if content_md5 is not None:
            self._md5_expected = _decode_b64(content_md5, 16)
            if self._md5_expected is None:
                raise InvalidDigest(**{"Content-MD5": content_md5[:64]})
        self._sha256_expected = content_sha256
        self._expected: dict[Algorithm, bytes] = {}
        for algorithm, value in (checksums or {}).items():
            raw = _decode_b64(value, algorithm.digest_size)
            if raw is None:
                raise InvalidRequest(f"Value for {algorithm.header} header is invalid.")
            self._expected[algorithm] = raw
        self._trailer = trailer
        self._md5 = hashlib.md5()
        self._sha256 = (
            hashlib.sha256()
            if sha256 or content_sha256 is not None or Algorithm.SHA256 in self._expected
            or trailer is Algorithm.SHA256
            else None
        )
        self._hashers: dict[Algorithm, Hasher] = {
            a: a.hasher() for a in {*self._expected, *((trailer,) if trailer else ())}
            if a is not Algorithm.SHA256
        }
        self.size = 0

    @classmethod
    def for_request(
        cls, headers: Headers, content_sha256: str | None = None, *, sha256: bool = False
    ) -> BodyVerifier:
        """
        The verifier of a request's body, from its headers and the SHA-256
        its signature promises (L{koboldfs.s3.sigv4.Authenticated.content_sha256}).

        @raise InvalidRequest: several C{x-amz-checksum-*}, a trailer that
            is not a checksum, or a malformed value.
        @raise InvalidDigest: a malformed C{Content-MD5}.
        """
        checksums = {}
        for name in headers:
            algorithm = Algorithm.from_header(name)
            if algorithm is not None:
                checksums[algorithm] = headers.get(name) or ""
        trailer = None
        declared = trailer_names(headers)
        for name in declared:
            trailer = Algorithm.from_header(name)
            if trailer is None:
                raise InvalidRequest(f"The trailer {name[:64]} is not supported")
        if len(checksums) + len(declared) > 1:
            raise InvalidRequest(
                "Expecting a single x-amz-checksum- header. Multiple checksum Types are not "
                "allowed."
            )
        return cls(
            content_md5=headers.get("content-md5"),
            content_sha256=content_sha256,
            checksums=checksums,
            trailer=trailer,
            sha256=sha256,
        )

    def update(self, data: bytes) -> None:
        """
        Hash more of the body (CPU-bound: see the module's docstring).
        """
        self.size += len(data)
        self._md5.update(data)
        if self._sha256 is not None:
            self._sha256.update(data)
        for hasher in self._hashers.values():
            hasher.update(data)

    def finish(self, trailers: dict[str, str] | None = None) -> Digests:
        """
        The body has ended: check every digest.

        @param trailers: the trailing headers of an aws-chunked body
            (L{koboldfs.s3.chunked.Decoded.trailers}).
        @raise BadDigest: C{Content-MD5} or an C{x-amz-checksum-*} does not match.
        @raise XAmzContentSHA256Mismatch: the body is not the one signed.
        @raise InvalidRequest: the declared trailer is missing or malformed.
        """
        md5 = self._md5.digest()
        if self._md5_expected is not None and md5 != self._md5_expected:
            raise BadDigest(
                ExpectedDigest=self._md5_expected.hex(),
                CalculatedDigest=base64.b64encode(md5).decode("ascii"),
            )
        sha256 = self._sha256.digest() if self._sha256 is not None else None
        if self._sha256_expected is not None and (
            sha256 is None or sha256.hex() != self._sha256_expected
        ):
            raise XAmzContentSHA256Mismatch(
                ClientComputedContentSHA256=self._sha256_expected,
                S3ComputedContentSHA256=sha256.hex() if sha256 else "",
            )
        expected = dict(self._expected)
        if self._trailer is not None:
            value = (trailers or {}).get(self._trailer.header)
            raw = _decode_b64(value, self._trailer.digest_size) if value is not None else None
            if raw is None:
                raise InvalidRequest(
                    f"Value for {self._trailer.header} trailing header is invalid."
                )
            expected[self._trailer] = raw
        computed: dict[Algorithm, str] = {}
        for algorithm, raw in expected.items():
            digest = sha256 if algorithm is Algorithm.SHA256 else self._hashers[algorithm].digest()
            assert digest is not None
            if digest != raw:
                raise BadDigest(
                    f"The {algorithm.value} you specified did not match the calculated checksum."
                )
            computed[algorithm] = base64.b64encode(digest).decode("ascii")
        return Digests(self.size, md5.hex(), sha256.hex() if sha256 else None, computed)
