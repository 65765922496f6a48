"""
A Hypothesis-driven fuzzer of the S3 codec's parsing, run like the binary
decoder's (test_fuzz.py): each example draws an input (shrinkable) and a
seeded random source, then feeds the input and many mutations of it, in
random pieces, so a CI run tries about 55,000 inputs in well under a
minute.  For a long run:

    KOBOLDFS_FUZZ_SCALE=100 python -m twisted.trial koboldfs.test.test_s3_fuzz

What must hold, whatever arrives: nothing but an L{S3Error} comes out of
aws-chunked decoding, request parsing, signature verification, header
evaluation or XML parsing; the decoder never holds more than one line
and refuses every input after an error; valid input decodes to what was
encoded however it is cut.
"""

from __future__ import annotations

import hashlib
import os
import random
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from koboldfs.s3 import xml as s3xml
from koboldfs.s3.checksums import Algorithm, BodyVerifier, checksum
from koboldfs.s3.chunked import MAX_LINE, ChunkedDecoder
from koboldfs.s3.errors import S3Error
from koboldfs.s3.headers import Headers
from koboldfs.s3.request import (
    check_conditions,
    list_params,
    object_headers,
    parse_copy_range,
    parse_copy_source,
    parse_range,
    parse_request,
    part_number,
    payload_length,
    response_overrides,
)
from koboldfs.s3.sigv4 import ChunkSigner, PayloadMode, Scope, Verifier, signing_key
from koboldfs.test.test_s3_sigv4 import parts, secrets, sign, signed_at

SCALE = max(1, int(os.environ.get("KOBOLDFS_FUZZ_SCALE", "1")))

#: Examples, and inputs per example, of each fuzzer.
CHUNKED_EXAMPLES, CHUNKED_MUTATIONS = 150, 150
REQUEST_EXAMPLES, REQUEST_MUTATIONS = 150, 100
XML_EXAMPLES, XML_MUTATIONS = 100, 100
CHUNKED_INPUTS = CHUNKED_EXAMPLES * CHUNKED_MUTATIONS
REQUEST_INPUTS = REQUEST_EXAMPLES * REQUEST_MUTATIONS
XML_INPUTS = XML_EXAMPLES * XML_MUTATIONS

_FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))

SIGNER = ChunkSigner(signing_key("secret", "20261207", "us-east-1", "s3"), "20261207T000000Z",
                     Scope("20261207", "us-east-1", "s3"), "0" * 64)
TRAILER = "x-amz-checksum-crc32"


def mutate(rng: random.Random, data: bytes) -> bytes:
    """
    One random damage: flip, cut, insert, duplicate, or put a framing
    token (CRLF, a hex size, a separator) somewhere.
    """
    if not data:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(12)))
    out = bytearray(data)
    at = rng.randrange(len(out))
    kind = rng.randrange(6)
    if kind == 0:
        out[at] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del out[at:]
    elif kind == 2:
        out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
    elif kind == 3:
        out[at:at] = out[at:min(len(out), at + rng.randrange(1, 64))]
    elif kind == 4:
        token = rng.choice([b"\r\n", b"\n", b"\r", b";", b":", b"=", b"%", b"&", b"/", b"<",
                            b"ffffffffffffffff", b"0\r\n\r\n", b"%zz", b"%00", b"\xff"])
        out[at:at] = token
    else:
        out[at] = rng.randrange(256)
    return bytes(out)


def pieces(rng: random.Random, data: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        n = rng.choice((1, 2, 5, 64, 4096, len(data)))
        out.append(data[i:i + n])
        i += n
    return out


@st.composite
def chunked_bodies(draw: st.DrawFn) -> tuple[bytes, bytes, bool, bool]:
    """
    A valid aws-chunked body: (encoded, payload, signed chunks, trailer).
    """
    payload = draw(st.binary(max_size=300))
    signed, trailer = draw(st.booleans()), draw(st.booleans())
    sizes = draw(st.lists(st.integers(1, 120), max_size=8))
    chunks, i = [], 0
    for size in sizes:
        if i >= len(payload):
            break
        chunks.append(payload[i:i + size])
        i += size
    if i < len(payload):
        chunks.append(payload[i:])
    body, previous = bytearray(), SIGNER.seed
    for chunk in chunks + [b""]:
        line = b"%x" % len(chunk)
        if signed:
            previous = SIGNER.chunk(previous, hashlib.sha256(chunk).hexdigest())
            line += b";chunk-signature=" + previous.encode()
        body += line + b"\r\n" + chunk + (b"\r\n" if chunk else b"")
    if trailer:
        body += f"{TRAILER}:{checksum(Algorithm.CRC32, payload)}\r\n".encode()
    body += b"\r\n"
    return bytes(body), payload, signed, trailer


class ChunkedFuzzTests(SynchronousTestCase):
    @settings(_FUZZ, max_examples=CHUNKED_EXAMPLES * SCALE)
    @given(chunked_bodies(), st.randoms(use_true_random=False))
    def test_decoder(self, body: tuple[bytes, bytes, bool, bool], rng: random.Random) -> None:
        """
        Valid bodies decode to their payload however they are cut;
        damaged ones decode (to exactly the declared length) or raise
        L{S3Error}, and the decoder never holds more than a line.
        """
        encoded, payload, signed, trailer = body
        for i in range(CHUNKED_MUTATIONS):
            data = encoded if i == 0 else mutate(rng, encoded)
            decoder = ChunkedDecoder(len(payload), signer=SIGNER if signed else None,
                                     trailers=frozenset({TRAILER}) if trailer else frozenset())
            out = []
            try:
                for piece in pieces(rng, data):
                    out += decoder.feed(piece)
                    self.assertLessEqual(decoder.buffered, MAX_LINE)
                decoded = decoder.finish()
                checker = BodyVerifier(trailer=Algorithm.CRC32 if trailer else None)
                checker.update(b"".join(out))
                checker.finish(decoded.trailers)
            except S3Error:
                self.assertEqual(decoder.buffered, 0)
                self.assertRaises(S3Error, decoder.feed, b"0\r\n\r\n")
                self.assertNotEqual(i, 0)
                continue
            self.assertEqual(decoded.size, len(payload))
            self.assertEqual(len(b"".join(out)), len(payload))
            if i == 0 or signed or trailer:
                # Signed chunks, or a trailing CRC, catch any change.
                self.assertEqual(b"".join(out), payload)


texts = st.sampled_from(["", "a", "bkt", "%", "%zz", "%ff", "é", "\x00", "a/b", " ", "+",
                         "*", "\r\n", "x" * 1100]) | st.text(max_size=12)
header_names = st.sampled_from([
    "authorization", "x-amz-date", "x-amz-content-sha256", "x-amz-decoded-content-length",
    "content-length", "content-md5", "x-amz-trailer", "x-amz-checksum-crc32",
    "x-amz-checksum-sha256", "x-amz-copy-source", "x-amz-metadata-directive", "range",
    "if-match", "if-none-match", "if-modified-since", "if-unmodified-since", "date",
    "content-encoding", "x-amz-meta-a", "host", "x-amz-copy-source-if-match",
]) | st.text(max_size=8)
header_values = st.sampled_from([
    "AWS4-HMAC-SHA256 Credential=AKIDKOBOLDTEST/20261207/us-east-1/s3/aws4_request, "
    "SignedHeaders=host;x-amz-date, Signature=" + "0" * 64,
    "AWS AKIDKOBOLDTEST:abc=", "20261207T000000Z", "UNSIGNED-PAYLOAD",
    "STREAMING-AWS4-HMAC-SHA256-PAYLOAD", "bytes=0-", "bytes=-5", "bytes=9999999999999-",
    '"etag"', "*", "Mon, 07 Dec 2026 16:49:07 GMT", "1B2M2Y8AsgTpgAmY7PhCfg==", "bkt/k",
    "/bkt/k?versionId=1", "aws-chunked", "-1", "99999999999999999999",
]) | texts


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, str, str, list[tuple[str, str]]]:
    method = draw(st.sampled_from(["GET", "PUT", "POST", "DELETE", "HEAD", "OPTIONS", "x"]))
    host = draw(st.sampled_from(["127.0.0.1:9000", "bkt.s3.example.com", "[::1]", ""]) | texts)
    path = "/" + "/".join(draw(st.lists(texts, max_size=4)))
    params = draw(st.lists(st.tuples(st.sampled_from([
        "uploads", "uploadId", "partNumber", "delete", "location", "list-type", "versions",
        "prefix", "max-keys", "encoding-type", "fetch-owner", "response-content-type",
        "X-Amz-Algorithm", "X-Amz-Signature", "X-Amz-Expires", "AWSAccessKeyId", "Signature",
        "Expires", "acl",
    ]) | texts, texts), max_size=5))
    query = "&".join(f"{name}={value}" if value else name for name, value in params)
    headers = draw(st.lists(st.tuples(header_names, header_values), max_size=8))
    return method, host, path, query, headers


def exercise(method: str, host: str, path: str, query: str,
             pairs: list[tuple[str, str]], rng: random.Random) -> None:
    """
    Everything the adapter will call on a request's metadata.
    """
    headers = Headers(pairs)
    verifier = Verifier(secrets, lambda: 1796601600.0 + rng.randrange(-2000, 2000), "us-east-1")
    for step in (
        lambda: verifier.verify(method, path, query, headers, virtual_bucket="bkt"),
        lambda: parse_request(method, host, path, query, headers, domain="s3.example.com"),
        lambda: parse_range(headers.get("range"), rng.randrange(0, 100)),
        lambda: parse_copy_range(headers.get("range"), rng.randrange(0, 100)),
        lambda: check_conditions(headers, rng.choice([None, "etag"]), 1796601600.0,
                                 write=rng.random() < 0.5),
        lambda: check_conditions(headers, "etag", 0.0, prefix="x-amz-copy-source-"),
        lambda: object_headers(headers),
        lambda: payload_length(headers, rng.choice(list(PayloadMode))),
        lambda: BodyVerifier.for_request(headers),
        lambda: parse_copy_source(headers.get("x-amz-copy-source") or path),
    ):
        try:
            step()
        except S3Error:
            pass
    try:
        request = parse_request(method, host, path, query, headers)
    except S3Error:
        return
    for step in (lambda: list_params(request.params), lambda: part_number(request.params),
                 lambda: response_overrides(request.params, anonymous=rng.random() < 0.5)):
        try:
            step()
        except S3Error:
            pass


def _latin1(data: bytes) -> str:
    return data.decode("latin-1")


class RequestFuzzTests(SynchronousTestCase):
    @settings(_FUZZ, max_examples=REQUEST_EXAMPLES * SCALE)
    @given(requests(), st.randoms(use_true_random=False))
    def test_metadata(self, request: tuple[str, str, str, str, list[tuple[str, str]]],
                      rng: random.Random) -> None:
        """
        Random methods, hosts, paths, queries and headers, and mutations
        of their bytes: only S3 errors come out.
        """
        method, host, path_text, query_text, header_texts = request
        # Mutated as bytes, seen as latin-1 text: what the adapter passes.
        path, query = path_text.encode("utf-8"), query_text.encode("utf-8")
        headers = [(name, value.encode("utf-8")) for name, value in header_texts]
        for i in range(REQUEST_MUTATIONS):
            if i:
                which = rng.randrange(3)
                if which == 0:
                    path = mutate(rng, path)
                elif which == 1:
                    query = mutate(rng, query)
                elif headers:
                    j = rng.randrange(len(headers))
                    headers[j] = (headers[j][0], mutate(rng, headers[j][1]))
            exercise(method, host, _latin1(path), _latin1(query),
                     [(name, _latin1(value)) for name, value in headers], rng)

    # botocore signs at the real time, but every field it writes has a
    # fixed length, so the draws from the random source do not vary.
    @settings(_FUZZ, max_examples=REQUEST_EXAMPLES * SCALE)
    @given(st.sampled_from(["GET", "PUT"]), st.booleans(), st.randoms(use_true_random=False))
    def test_signed(self, method: str, presign: bool, rng: random.Random) -> None:
        """
        A request botocore signed, its Authorization header or query
        string damaged: refused with an S3 error, never accepted changed.
        """
        key = quote(rng.choice(["k", "a b/c+d", "é"]))
        request = sign(method, f"http://h/bkt/{key}?partNumber=1&uploadId=u",
                       b"" if presign else b"x", presign=60 if presign else None)
        method, path, query, headers = parts(request)
        now = signed_at(request)
        pairs = [(n, headers.get(n) or "") for n in headers]
        verifier = Verifier(secrets, lambda: now, "us-east-1")
        for _ in range(REQUEST_MUTATIONS // 2):
            q, hs = query, list(pairs)
            if presign:
                q = _latin1(mutate(rng, query.encode()))
            else:
                j = next(i for i, (n, _) in enumerate(hs) if n == "authorization")
                hs[j] = ("authorization", _latin1(mutate(rng, hs[j][1].encode())))
            try:
                result = verifier.verify(method, path, q, Headers(hs))
            except S3Error:
                continue
            if result is None:
                # The signing parameters were cut off the query: anonymous.
                self.assertTrue(presign)
                self.assertNotIn("X-Amz-Signature=", q)
            else:
                # What still verifies is the request as signed (a change of
                # insignificant text, such as spaces or parameter order).
                self.assertEqual(result.access_key, "AKIDKOBOLDTEST")


@st.composite
def xml_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["complete", "delete", "create"]))
    if kind == "complete":
        numbers = draw(st.lists(st.integers(-1, 10001), max_size=5))
        body = "<CompleteMultipartUpload>" + "".join(
            f"<Part><PartNumber>{n}</PartNumber><ETag>\"e{n}\"</ETag></Part>" for n in numbers
        ) + "</CompleteMultipartUpload>"
    elif kind == "delete":
        keys = draw(st.lists(st.text(max_size=8), max_size=5))
        body = "<Delete><Quiet>true</Quiet>" + "".join(
            f"<Object><Key>{s3xml._escape(k)}</Key></Object>" for k in keys) + "</Delete>"
    else:
        body = ("<CreateBucketConfiguration><LocationConstraint>"
                f"{s3xml._escape(draw(st.text(max_size=10)))}"
                "</LocationConstraint></CreateBucketConfiguration>")
    if draw(st.booleans()):
        body = body.replace(">", f' xmlns="{s3xml.NAMESPACE}">', 1)
    if draw(st.integers(0, 4)) == 0:
        body = '<!DOCTYPE x [<!ENTITY e "&#60;">]>' + body
    return kind, body.encode("utf-8", "surrogatepass")


class XMLFuzzTests(SynchronousTestCase):
    @settings(_FUZZ, max_examples=XML_EXAMPLES * SCALE)
    @given(xml_bodies(), st.randoms(use_true_random=False))
    def test_parsers(self, drawn: tuple[str, bytes], rng: random.Random) -> None:
        kind, body = drawn
        parse = {"complete": s3xml.parse_complete_multipart_upload,
                 "delete": s3xml.parse_delete, "create": s3xml.parse_create_bucket}[kind]
        for i in range(XML_MUTATIONS):
            data = body if i == 0 else mutate(rng, body)
            try:
                parse(data, 4096)
            except S3Error:
                pass
