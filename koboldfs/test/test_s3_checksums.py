"""
Tests for L{koboldfs.s3.checksums}: published check values, agreement
with botocore's own checksums (which use awscrt when installed, as
here), incremental hashing, and the body verifier's refusals.
"""

from __future__ import annotations

import base64
import hashlib
import random

from botocore import httpchecksum
from twisted.trial.unittest import SynchronousTestCase

from koboldfs.s3 import errors
from koboldfs.s3.checksums import (
    Algorithm,
    BodyVerifier,
    checksum,
    content_md5,
    multipart_etag,
)
from koboldfs.s3.headers import Headers

#: The CRC catalogue's check values: the CRC of b"123456789".
CHECK = {
    Algorithm.CRC32: 0xCBF43926,
    Algorithm.CRC32C: 0xE3069283,
    Algorithm.CRC64NVME: 0xAE8B14860A799888,
}

BOTOCORE = {
    Algorithm.CRC32: httpchecksum.CrtCrc32Checksum,
    Algorithm.CRC32C: httpchecksum.CrtCrc32cChecksum,
    Algorithm.CRC64NVME: httpchecksum.CrtCrc64NvmeChecksum,
    Algorithm.SHA1: httpchecksum.Sha1Checksum,
    Algorithm.SHA256: httpchecksum.Sha256Checksum,
}


class ChecksumTests(SynchronousTestCase):
    def test_check_values(self) -> None:
        for algorithm, value in CHECK.items():
            raw = base64.b64decode(checksum(algorithm, b"123456789"))
            self.assertEqual(int.from_bytes(raw, "big"), value, algorithm)
            self.assertEqual(len(raw), algorithm.digest_size)
        self.assertEqual(base64.b64decode(checksum(Algorithm.SHA256, b"123456789")),
                         hashlib.sha256(b"123456789").digest())

    def test_botocore_agrees(self) -> None:
        """
        The values botocore puts in x-amz-checksum-* for random bodies,
        fed in random pieces.
        """
        rng = random.Random(15)
        for size in (0, 1, 7, 4096, 100_003):
            data = rng.randbytes(size)
            for algorithm, cls in BOTOCORE.items():
                theirs = cls()
                theirs.update(data)
                ours = algorithm.hasher()
                i = 0
                while i < size:
                    n = rng.randrange(1, 5000)
                    ours.update(data[i:i + n])
                    i += n
                self.assertEqual(base64.b64encode(ours.digest()).decode(), theirs.b64digest(),
                                 (algorithm, size))

    def test_header_names(self) -> None:
        self.assertEqual(Algorithm.CRC64NVME.header, "x-amz-checksum-crc64nvme")
        self.assertIs(Algorithm.from_header("X-Amz-Checksum-CRC32C"), Algorithm.CRC32C)
        self.assertIsNone(Algorithm.from_header("x-amz-checksum-md5"))

    def test_md5_forms(self) -> None:
        self.assertEqual(content_md5(b""), "1B2M2Y8AsgTpgAmY7PhCfg==")
        md5s = [hashlib.md5(b"a").digest(), hashlib.md5(b"b").digest()]
        self.assertEqual(multipart_etag(md5s), hashlib.md5(b"".join(md5s)).hexdigest() + "-2")


class BodyVerifierTests(SynchronousTestCase):
    body = b"the quick brown fox" * 1000

    def feed(self, verifier: BodyVerifier) -> None:
        for i in range(0, len(self.body), 777):
            verifier.update(self.body[i:i + 777])

    def test_everything_matches(self) -> None:
        verifier = BodyVerifier(
            content_md5=content_md5(self.body),
            content_sha256=hashlib.sha256(self.body).hexdigest(),
            checksums={Algorithm.CRC32C: checksum(Algorithm.CRC32C, self.body)},
        )
        self.feed(verifier)
        digests = verifier.finish()
        self.assertEqual(digests.size, len(self.body))
        self.assertEqual(digests.md5, hashlib.md5(self.body).hexdigest())
        self.assertEqual(digests.sha256, hashlib.sha256(self.body).hexdigest())
        self.assertEqual(digests.checksums,
                         {Algorithm.CRC32C: checksum(Algorithm.CRC32C, self.body)})

    def test_md5_only_by_default(self) -> None:
        verifier = BodyVerifier()
        self.feed(verifier)
        digests = verifier.finish()
        self.assertIsNone(digests.sha256)
        self.assertEqual(digests.md5, hashlib.md5(self.body).hexdigest())

    def test_mismatches(self) -> None:
        other = b"another body"
        cases = [
            (BodyVerifier(content_md5=content_md5(other)), errors.BadDigest),
            (BodyVerifier(content_sha256=hashlib.sha256(other).hexdigest()),
             errors.XAmzContentSHA256Mismatch),
            (BodyVerifier(checksums={Algorithm.SHA1: checksum(Algorithm.SHA1, other)}),
             errors.BadDigest),
            (BodyVerifier(checksums={Algorithm.SHA256: checksum(Algorithm.SHA256, other)}),
             errors.BadDigest),
            (BodyVerifier(checksums={Algorithm.CRC32: checksum(Algorithm.CRC32, other)}),
             errors.BadDigest),
        ]
        for verifier, error in cases:
            self.feed(verifier)
            self.assertRaises(error, verifier.finish)

    def test_malformed_values(self) -> None:
        for bad in ("", "abc", "!!!!", base64.b64encode(b"x" * 15).decode()):
            self.assertRaises(errors.InvalidDigest, BodyVerifier, content_md5=bad)
        for bad in ("", "AAAA", base64.b64encode(b"x" * 5).decode(), "not base64"):
            self.assertRaises(errors.InvalidRequest, BodyVerifier,
                              checksums={Algorithm.CRC32: bad})

    def test_trailer(self) -> None:
        verifier = BodyVerifier(trailer=Algorithm.CRC32)
        self.feed(verifier)
        self.assertRaises(errors.InvalidRequest, verifier.finish, {})
        self.assertRaises(errors.InvalidRequest, verifier.finish,
                          {"x-amz-checksum-crc32": "bad"})
        good = checksum(Algorithm.CRC32, self.body)
        self.assertEqual(verifier.finish({"x-amz-checksum-crc32": good}).checksums,
                         {Algorithm.CRC32: good})

    def test_for_request(self) -> None:
        crc = checksum(Algorithm.CRC32, self.body)
        verifier = BodyVerifier.for_request(
            Headers([("x-amz-checksum-crc32", crc), ("Content-MD5", content_md5(self.body))]),
            hashlib.sha256(self.body).hexdigest(),
        )
        self.feed(verifier)
        self.assertEqual(verifier.finish().checksums, {Algorithm.CRC32: crc})
        for headers in [
            [("x-amz-checksum-crc32", crc), ("x-amz-checksum-sha1", "x")],
            [("x-amz-checksum-crc32", crc), ("x-amz-trailer", "x-amz-checksum-crc32c")],
            [("x-amz-trailer", "x-amz-meta-a")],
        ]:
            self.assertRaises(errors.InvalidRequest, BodyVerifier.for_request, Headers(headers))
