"""
Tests for L{koboldfs.s3.chunked}: AWS's published signed streaming body,
the unsigned-with-trailer form boto3 sends over HTTPS, and hostile
framing, fed in every cut.
"""

from __future__ import annotations

import hashlib

from twisted.trial.unittest import SynchronousTestCase

from koboldfs.s3 import errors
from koboldfs.s3.checksums import Algorithm, BodyVerifier, checksum
from koboldfs.s3.chunked import MAX_LINE, MAX_TRAILERS, ChunkedDecoder, Decoded
from koboldfs.s3.headers import Headers
from koboldfs.s3.sigv4 import (
    Authenticated,
    AuthScheme,
    ChunkSigner,
    PayloadMode,
    Scope,
    signing_key,
)
from koboldfs.test.test_s3_sigv4 import (
    AWS_CHUNKS,
    AWS_SECRET,
    AWS_SEED,
    AWS_TRAILER,
    aws_streaming_headers,
    aws_verifier,
)

PAYLOAD = b"a" * 66560


def aws_body(chunks: tuple[str, ...] = AWS_CHUNKS, tail: bytes = b"\r\n") -> bytes:
    """
    AWS's example body: 64 KiB, 1 KiB and the final chunk, signed.
    """
    return (
        b"10000;chunk-signature=" + chunks[0].encode() + b"\r\n" + b"a" * 65536 + b"\r\n"
        + b"400;chunk-signature=" + chunks[1].encode() + b"\r\n" + b"a" * 1024 + b"\r\n"
        + b"0;chunk-signature=" + chunks[2].encode() + b"\r\n" + tail
    )


def aws_signer() -> ChunkSigner:
    result = aws_verifier().verify("PUT", "/examplebucket/chunkObject.txt", "",
                                   aws_streaming_headers())
    assert result is not None and result.chunks is not None
    return result.chunks


def cuts(data: bytes) -> list[list[bytes]]:
    """
    C{data} cut in the ways TCP might deliver it.
    """
    out = [[data], [data[i:i + 1] for i in range(len(data))] if len(data) < 2000 else []]
    for size in (2, 3, 7, 100, 4096, 65537):
        out.append([data[i:i + size] for i in range(0, len(data), size)])
    return [c for c in out if c]


def decode(decoder: ChunkedDecoder, pieces: list[bytes], test: SynchronousTestCase) -> bytes:
    out = []
    for piece in pieces:
        out.extend(decoder.feed(piece))
        test.assertLessEqual(decoder.buffered, MAX_LINE)
    return b"".join(out)


def unsigned_body(payload: bytes, size: int, trailers: bytes) -> bytes:
    chunks = [payload[i:i + size] for i in range(0, len(payload), size)]
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
    return body + b"0\r\n" + trailers + b"\r\n"


class SignedChunksTests(SynchronousTestCase):
    def test_aws_example(self) -> None:
        """
        AWS's example decodes to its 66,560 bytes however it is cut, every
        chunk signature checked.
        """
        body = aws_body()
        self.assertEqual(len(body), 66824)  # its Content-Length
        for pieces in cuts(body):
            decoder = ChunkedDecoder(66560, signer=aws_signer())
            self.assertEqual(decode(decoder, pieces, self), PAYLOAD)
            self.assertTrue(decoder.done)
            self.assertEqual(decoder.finish(), Decoded(66560, 2, {}, signed=True))

    def test_for_request(self) -> None:
        """
        The decoder of a verified request takes its signer, its declared
        trailers and whether they are signed from the request.
        """
        auth = aws_verifier().verify("PUT", "/examplebucket/chunkObject.txt", "",
                                     aws_streaming_headers())
        assert auth is not None
        decoder = ChunkedDecoder.for_request(auth, aws_streaming_headers(), 66560)
        self.assertEqual(b"".join(decoder.feed(aws_body())), PAYLOAD)
        self.assertTrue(decoder.finish().signed)
        trailing = Authenticated("k", AuthScheme.HEADER, PayloadMode.STREAMING_SIGNED_TRAILER,
                                 chunks=aws_signer())
        decoder = ChunkedDecoder.for_request(
            trailing, Headers([("x-amz-trailer", "First, second,THIRD")]), 66560)
        tail = (b"first:1st\r\nsecond:2nd\r\nthird:3rd\r\nx-amz-trailer-signature:"
                + AWS_TRAILER.encode() + b"\r\n\r\n")
        decoder.feed(aws_body(tail=tail))
        self.assertEqual(len(decoder.finish().trailers), 3)

    def test_changed_byte(self) -> None:
        body = bytearray(aws_body())
        body[65536 + 200] ^= 1  # in the second chunk
        decoder = ChunkedDecoder(66560, signer=aws_signer())
        self.assertRaises(errors.SignatureDoesNotMatch, decoder.feed, bytes(body))
        # The error sticks: nothing more is taken.
        self.assertRaises(errors.SignatureDoesNotMatch, decoder.feed, b"")
        self.assertRaises(errors.SignatureDoesNotMatch, decoder.finish)
        self.assertEqual(decoder.buffered, 0)

    def test_chain_broken(self) -> None:
        """
        Each chunk's signature must follow from the one before: a valid
        signature in the wrong place (replayed, reordered) is refused, and
        so is the seed itself.
        """
        for chunks in [(AWS_CHUNKS[1], AWS_CHUNKS[0], AWS_CHUNKS[2]),
                       (AWS_SEED, AWS_CHUNKS[1], AWS_CHUNKS[2]),
                       (AWS_CHUNKS[0], AWS_CHUNKS[1], AWS_CHUNKS[1])]:
            decoder = ChunkedDecoder(66560, signer=aws_signer())
            self.assertRaises(errors.SignatureDoesNotMatch, decoder.feed, aws_body(chunks))

    def test_other_seed(self) -> None:
        signer = aws_signer()
        other = ChunkSigner(signing_key(AWS_SECRET, "20130524", "us-east-1", "s3"),
                            "20130524T000000Z", Scope("20130524", "us-east-1", "s3"), "0" * 64)
        self.assertEqual(signer.seed, AWS_SEED)
        self.assertRaises(errors.SignatureDoesNotMatch,
                          ChunkedDecoder(66560, signer=other).feed, aws_body())

    def test_signature_required(self) -> None:
        for line in (b"400\r\n", b"400;chunk-signature=abc\r\n",
                     b"400;chunk-signature=" + b"A" * 64 + b"\r\n"):
            decoder = ChunkedDecoder(1024, signer=aws_signer())
            self.assertRaises(errors.InvalidRequest, decoder.feed, line)

    def test_signed_trailer(self) -> None:
        """
        aws-crt's trailer vector: the trailers' signature chains from the
        final chunk's.
        """
        trailers = b"first:1st\r\nsecond:2nd\r\nthird:3rd\r\n"
        body = aws_body(tail=trailers + b"x-amz-trailer-signature:" + AWS_TRAILER.encode()
                        + b"\r\n\r\n")
        for pieces in cuts(body):
            decoder = ChunkedDecoder(66560, signer=aws_signer(),
                                     trailers=frozenset({"first", "second", "third"}),
                                     signed_trailer=True)
            self.assertEqual(decode(decoder, pieces, self), PAYLOAD)
            self.assertEqual(decoder.finish().trailers,
                             {"first": "1st", "second": "2nd", "third": "3rd"})
        for bad in (trailers.replace(b"2nd", b"2ND") + b"x-amz-trailer-signature:"
                    + AWS_TRAILER.encode() + b"\r\n\r\n",
                    trailers + b"x-amz-trailer-signature:" + b"0" * 64 + b"\r\n\r\n"):
            decoder = ChunkedDecoder(66560, signer=aws_signer(),
                                     trailers=frozenset({"first", "second", "third"}),
                                     signed_trailer=True)
            self.assertRaises(errors.SignatureDoesNotMatch, decoder.feed, aws_body(tail=bad))
        decoder = ChunkedDecoder(66560, signer=aws_signer(),
                                 trailers=frozenset({"first", "second", "third"}),
                                 signed_trailer=True)
        self.assertRaises(errors.MalformedTrailerError, decoder.feed,
                          aws_body(tail=trailers + b"\r\n"))


class UnsignedTrailerTests(SynchronousTestCase):
    """
    STREAMING-UNSIGNED-PAYLOAD-TRAILER, boto3's form over HTTPS.
    """

    def test_boto3_form(self) -> None:
        """
        The body boto3 sent for put_object of 5 bytes (docs/s3-wire.md),
        checked against its trailing CRC32.
        """
        body = b"5\r\nhello\r\n0\r\nx-amz-checksum-crc32:NhCmhg==\r\n\r\n"
        headers = Headers([("x-amz-trailer", "x-amz-checksum-crc32"),
                           ("x-amz-decoded-content-length", "5")])
        for pieces in cuts(body):
            decoder = ChunkedDecoder(5, trailers=frozenset({"x-amz-checksum-crc32"}))
            verifier = BodyVerifier.for_request(headers)
            payload = decode(decoder, pieces, self)
            verifier.update(payload)
            decoded = decoder.finish()
            self.assertEqual(payload, b"hello")
            self.assertFalse(decoded.signed)
            digests = verifier.finish(decoded.trailers)
            self.assertEqual(digests.checksums, {Algorithm.CRC32: "NhCmhg=="})
            self.assertEqual(digests.md5, hashlib.md5(b"hello").hexdigest())

    def test_wrong_trailing_checksum(self) -> None:
        body = b"5\r\nhellO\r\n0\r\nx-amz-checksum-crc32:NhCmhg==\r\n\r\n"
        decoder = ChunkedDecoder(5, trailers=frozenset({"x-amz-checksum-crc32"}))
        verifier = BodyVerifier(trailer=Algorithm.CRC32)
        for piece in decoder.feed(body):
            verifier.update(piece)
        self.assertRaises(errors.BadDigest, verifier.finish, decoder.finish().trailers)

    def test_many_chunks(self) -> None:
        payload = bytes(range(256)) * 300
        trailer = b"x-amz-checksum-crc64nvme:" + checksum(Algorithm.CRC64NVME, payload).encode()
        body = unsigned_body(payload, 1000, trailer + b"\r\n")
        for pieces in cuts(body):
            decoder = ChunkedDecoder(len(payload), trailers=frozenset({"x-amz-checksum-crc64nvme"}))
            self.assertEqual(decode(decoder, pieces, self), payload)
            self.assertEqual(decoder.finish().chunks, 77)

    def test_no_trailer(self) -> None:
        decoder = ChunkedDecoder(0)
        self.assertEqual(decoder.feed(b"0\r\n\r\n"), [])
        self.assertEqual(decoder.finish(), Decoded(0, 0, {}))


class HostileFramingTests(SynchronousTestCase):
    """
    Whatever arrives, the decoder raises the S3 error that fits, holds no
    more than a line, and takes nothing after an error.
    """

    def refused(self, error: type[errors.S3Error], body: bytes, declared: int = 5,
                trailers: frozenset[str] = frozenset()) -> None:
        for pieces in cuts(body):
            decoder = ChunkedDecoder(declared, trailers=trailers)
            try:
                for piece in pieces:
                    decoder.feed(piece)
                    self.assertLessEqual(decoder.buffered, MAX_LINE)
                decoder.finish()
            except error:
                self.assertEqual(decoder.buffered, 0)
                self.assertRaises(error, decoder.feed, b"0\r\n")
            else:
                self.fail(f"{body[:60]!r} was taken")

    def test_bad_sizes(self) -> None:
        for line in (b"zz", b"-5", b"0x5", b" 5", b"", b"5 ", b"12345678901234567",
                     "５".encode()):
            self.refused(errors.InvalidRequest, line + b"\r\nhello\r\n0\r\n\r\n")

    def test_huge_size(self) -> None:
        """
        A size past what was declared is refused at once: no buffering,
        no waiting for petabytes.
        """
        self.refused(errors.InvalidRequest, b"ffffffffffffffff\r\n")
        self.refused(errors.InvalidRequest, b"6\r\nhello!\r\n0\r\n\r\n")

    def test_shorter_than_declared(self) -> None:
        self.refused(errors.IncompleteBody, b"4\r\nhell\r\n0\r\n\r\n")
        self.refused(errors.IncompleteBody, b"5\r\nhello\r\n")
        self.refused(errors.IncompleteBody, b"5\r\nhel")
        self.refused(errors.IncompleteBody, b"")

    def test_longer_than_declared(self) -> None:
        self.refused(errors.InvalidRequest, b"5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n")
        self.refused(errors.InvalidRequest, b"5\r\nhello\r\n0\r\n\r\nmore")

    def test_missing_crlf(self) -> None:
        for body in (b"5\r\nhelloXX0\r\n\r\n", b"5\nhello\r\n0\r\n\r\n",
                     b"5\r\nhello\n0\r\n\r\n", b"5\r\nhello\r\n0\n\n"):
            self.refused(errors.InvalidRequest, body)

    def test_endless_line(self) -> None:
        self.refused(errors.InvalidRequest, b"5" * (MAX_LINE + 1))
        self.refused(errors.InvalidRequest, b"5;" + b"x" * MAX_LINE + b"\r\n")

    def test_trailers(self) -> None:
        end = b"5\r\nhello\r\n0\r\n"
        good = b"x-amz-checksum-crc32:NhCmhg==\r\n"
        for body in (end + b"x-amz-checksum-sha256:abc=\r\n" + good + b"\r\n",
                     end + good + good + b"\r\n",
                     end + b"\r\n",
                     end + b"not a header\r\n\r\n",
                     end + b"x-amz-trailer-signature:" + b"0" * 64 + b"\r\n" + good + b"\r\n",
                     end + b"x-amz-checksum-crc32:" + b"A" * MAX_TRAILERS + b"\r\n\r\n"):
            self.refused((errors.MalformedTrailerError, errors.InvalidRequest),  # type: ignore[arg-type]
                         body, trailers=frozenset({"x-amz-checksum-crc32"}))
        decoder = ChunkedDecoder(5, trailers=frozenset({"x-amz-checksum-crc32"}))
        decoder.feed(end + good)
        self.assertFalse(decoder.done)
        self.assertRaises(errors.IncompleteBody, decoder.finish)

    def test_signer_required_for_signed_trailer(self) -> None:
        self.assertRaises(ValueError, ChunkedDecoder, 1, signed_trailer=True)
