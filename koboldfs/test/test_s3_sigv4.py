"""
Tests for L{koboldfs.s3.sigv4} and L{koboldfs.s3.sigv2}: requests signed
offline by botocore's own signers are accepted, the same requests
tampered with are refused with the code AWS sends, and AWS's published
streaming example verifies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from urllib.parse import urlsplit

from botocore.auth import HmacV1Auth, HmacV1QueryAuth, S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from twisted.trial.unittest import SynchronousTestCase

from koboldfs.s3 import errors
from koboldfs.s3.headers import Headers, parse_amz_date, parse_http_date
from koboldfs.s3.sigv4 import (
    AuthScheme,
    PayloadMode,
    Verifier,
    payload_mode,
    signing_key,
)

ACCESS_KEY = "AKIDKOBOLDTEST"
SECRET = "kobold/Test+Secret/0123456789abcdefghij"
CREDENTIALS = Credentials(ACCESS_KEY, SECRET)

#: AWS's published example of a signed streaming upload (sigv4-streaming).
AWS_KEY, AWS_SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
AWS_SEED = "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9"
AWS_CHUNKS = (
    "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
    "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
    "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9",
)
#: aws-crt's test of trailing headers first:1st, second:2nd, third:3rd,
#: chained from the final chunk of the same example.
AWS_TRAILER = "df5735bd9f3295cd9386572292562fefc93ba94e80a0a1ddcbd652c4e0a75e6c"


def aws_streaming_headers() -> Headers:
    """
    The headers of AWS's example streaming PUT of 66,560 bytes of C{a}.
    """
    return Headers([
        ("Host", "s3.amazonaws.com"),
        ("x-amz-date", "20130524T000000Z"),
        ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
        ("Authorization",
         f"AWS4-HMAC-SHA256 Credential={AWS_KEY}/20130524/us-east-1/s3/aws4_request,"
         "SignedHeaders=content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;"
         f"x-amz-decoded-content-length;x-amz-storage-class,Signature={AWS_SEED}"),
        ("x-amz-content-sha256", "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"),
        ("Content-Encoding", "aws-chunked"),
        ("x-amz-decoded-content-length", "66560"),
        ("Content-Length", "66824"),
    ])


def aws_verifier() -> Verifier:
    return Verifier(lambda key: AWS_SECRET if key == AWS_KEY else None,
                    lambda: parse_amz_date("20130524T000000Z"), "us-east-1")


def secrets(key: str) -> str | None:
    return SECRET if key == ACCESS_KEY else None


def sign(
    method: str,
    url: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    *,
    presign: int | None = None,
    v2: bool = False,
    region: str = "us-east-1",
) -> AWSRequest:
    """
    A request signed by botocore as boto3 would sign it (header auth, or
    presigned for C{presign} seconds; version 2 with C{v2}).
    """
    request = AWSRequest(method, url, data=body, headers=dict(headers or {}))
    if v2:
        signer = HmacV1QueryAuth(CREDENTIALS, expires=presign) if presign else HmacV1Auth(
            CREDENTIALS)
    elif presign is not None:
        signer = S3SigV4QueryAuth(CREDENTIALS, "s3", region, expires=presign)
    else:
        signer = S3SigV4Auth(CREDENTIALS, "s3", region)
    signer.add_auth(request)
    return request


def parts(request: AWSRequest) -> tuple[str, str, str, Headers]:
    """
    Method, raw path, raw query and headers as a server receives them.
    """
    url = urlsplit(request.url)
    pairs = list(request.headers.items())
    if not any(name.lower() == "host" for name, _ in pairs):
        pairs.append(("Host", url.netloc))
    return request.method, url.path, url.query, Headers(pairs)


def signed_at(request: AWSRequest) -> float:
    """
    When botocore signed a request, from its own timestamp.
    """
    query = dict(p.split("=", 1) for p in urlsplit(request.url).query.split("&") if "=" in p)
    if "X-Amz-Date" in query:
        return parse_amz_date(query["X-Amz-Date"])
    if "Expires" in query:
        return float(query["Expires"])
    if "X-Amz-Date" in request.headers:
        return parse_amz_date(request.headers["X-Amz-Date"])
    when = parse_http_date(request.headers["Date"])
    assert when is not None
    return when


def verifier(now: float | Callable[[], float], region: str = "us-east-1") -> Verifier:
    return Verifier(secrets, now if callable(now) else (lambda: now), region)


def verify(request: AWSRequest, offset: float = 0.0, **kw: object) -> object:
    return verifier(signed_at(request) + offset).verify(*parts(request), **kw)  # type: ignore[arg-type]


#: Keys that exercise S3's encoding rules: spaces, +, ~, reserved and
#: non-ASCII characters, slashes in a row, dot segments.
KEYS = [
    "plain.txt",
    "dir/sub dir/a b+c%.txt",
    "tilde~and!bang*(paren)'quote",
    "unicodé/ключ/キー",
    "a//double///slash",
    "./dot/../segments",
    "sp ace=equals&amp;?query#hash",
]


class HeaderAuthTests(SynchronousTestCase):
    """
    The Authorization header, as boto3 and the AWS CLI sign it.
    """

    def test_botocore_requests_accepted(self) -> None:
        """
        Whatever key, query and headers botocore signs verifies, and says
        who signed and which body it promised.
        """
        from urllib.parse import quote

        body = b"hello world"
        for key in KEYS:
            url = (f"http://127.0.0.1:9000/bkt/{quote(key, safe='/~')}"
                   "?uploadId=a%2Bb%20c&partNumber=3")
            request = sign("PUT", url, body, {"x-amz-meta-note": "  two   spaces  ",
                                              "Content-Type": "text/plain"})
            result = verify(request)
            self.assertEqual(result.access_key, ACCESS_KEY, key)
            self.assertEqual(result.scheme, AuthScheme.HEADER)
            self.assertEqual(result.payload, PayloadMode.SHA256)
            self.assertEqual(result.content_sha256, hashlib.sha256(body).hexdigest())
            self.assertIsNone(result.chunks)

    def test_client_escapes_normalised(self) -> None:
        """
        A path or query that a client sent unescaped, or escaped further,
        or with lower-case hex, verifies against the canonical form signed.
        """
        request = sign("GET", "http://h/bkt/a%21b~c?prefix=x%2Fy")
        method, _, _, headers = parts(request)
        v = verifier(signed_at(request))
        self.assertEqual(v.verify(method, "/bkt/a!b~c", "prefix=x%2Fy", headers).access_key,
                         ACCESS_KEY)
        self.assertEqual(v.verify(method, "/bkt/a%21b%7ec", "prefix=x%2fy", headers).access_key,
                         ACCESS_KEY)

    def test_tampering_refused(self) -> None:
        """
        Changing the method, path, query, a signed header or the payload
        hash breaks the signature.
        """
        request = sign("PUT", "http://h/bkt/key?partNumber=1&uploadId=u", b"x",
                       {"x-amz-meta-a": "1"})
        method, path, query, headers = parts(request)
        v = verifier(signed_at(request))
        pairs = [(n, headers.get(n) or "") for n in headers]

        def changed(name: str, value: str) -> Headers:
            return Headers([(n, value if n == name else v_) for n, v_ in pairs])

        cases = [
            ("POST", path, query, headers),
            (method, "/bkt/key2", query, headers),
            (method, "/bkt/Key", query, headers),
            (method, path, "partNumber=2&uploadId=u", headers),
            (method, path, "partNumber=1&uploadId=u&extra", headers),
            (method, path, query, changed("x-amz-meta-a", "2")),
            (method, path, query, changed("host", "other")),
            (method, path, query, changed("x-amz-content-sha256", "0" * 64)),
            (method, path, query, changed("x-amz-content-sha256", "UNSIGNED-PAYLOAD")),
        ]
        for case in cases:
            self.assertRaises(errors.SignatureDoesNotMatch, v.verify, *case)

    def test_signature_mismatch_document(self) -> None:
        """
        SignatureDoesNotMatch carries what AWS shows a client to debug its
        signer: the string to sign and the canonical request (no secret).
        """
        request = sign("GET", "http://h/bkt/k")
        method, path, query, headers = parts(request)
        e = self.assertRaises(errors.SignatureDoesNotMatch,
                              verifier(signed_at(request)).verify, "HEAD", path, query, headers)
        self.assertEqual(e.extra["AWSAccessKeyId"], ACCESS_KEY)
        self.assertTrue(e.extra["CanonicalRequest"].startswith("HEAD\n/bkt/k\n"))
        self.assertTrue(e.extra["StringToSign"].startswith("AWS4-HMAC-SHA256\n"))
        self.assertNotIn(SECRET.encode(), e.body("req"))

    def test_unsigned_amz_header_refused(self) -> None:
        """
        An x-amz-* header added after signing is refused (AccessDenied),
        as S3 does, so that none can be slipped in.
        """
        request = sign("PUT", "http://h/bkt/k", b"x")
        method, path, query, headers = parts(request)
        pairs = [(n, headers.get(n) or "") for n in headers] + [("x-amz-meta-evil", "1")]
        e = self.assertRaises(errors.AccessDenied, verifier(signed_at(request)).verify,
                              method, path, query, Headers(pairs))
        self.assertEqual(e.extra["HeadersNotSigned"], "x-amz-meta-evil")

    def test_wrong_secret_and_unknown_key(self) -> None:
        request = sign("GET", "http://h/bkt/k")
        method, path, query, headers = parts(request)
        now = signed_at(request)
        other = Verifier(lambda key: "another secret", lambda: now, "us-east-1")
        self.assertRaises(errors.SignatureDoesNotMatch, other.verify, method, path, query, headers)
        nobody = Verifier(lambda key: None, lambda: now, "us-east-1")
        e = self.assertRaises(errors.InvalidAccessKeyId, nobody.verify, method, path, query,
                              headers)
        self.assertEqual(e.status, 403)

    def test_secret_looked_up_per_request(self) -> None:
        """
        The verifier asks for the secret each time: a revoked key stops
        working at once, whatever was cached.
        """
        store = {ACCESS_KEY: SECRET}
        request = sign("GET", "http://h/bkt/k")
        now = signed_at(request)
        v = Verifier(store.get, lambda: now, "us-east-1")
        self.assertEqual(v.verify(*parts(request)).access_key, ACCESS_KEY)
        del store[ACCESS_KEY]
        self.assertRaises(errors.InvalidAccessKeyId, v.verify, *parts(request))

    def test_clock_skew(self) -> None:
        """
        Up to 15 minutes either way is taken; more is RequestTimeTooSkewed,
        with the times AWS reports.
        """
        request = sign("GET", "http://h/bkt/k")
        for offset in (-900, 900, 0):
            self.assertEqual(verify(request, offset).access_key, ACCESS_KEY)
        for offset in (-901, 901, 86400):
            e = self.assertRaises(errors.RequestTimeTooSkewed, verify, request, offset)
            self.assertEqual(e.status, 403)
            self.assertEqual(e.extra["MaxAllowedSkewMilliseconds"], "900000")

    def test_wrong_region(self) -> None:
        request = sign("GET", "http://h/bkt/k", region="eu-west-1")
        e = self.assertRaises(errors.AuthorizationHeaderMalformed, verify, request)
        self.assertEqual(e.extra["Region"], "us-east-1")
        # The region configured is the one checked.
        self.assertEqual(
            verifier(signed_at(request), "eu-west-1").verify(*parts(request)).access_key,
            ACCESS_KEY,
        )

    def test_malformed_authorization(self) -> None:
        request = sign("GET", "http://h/bkt/k")
        method, path, query, headers = parts(request)
        good = headers.get("authorization") or ""
        v = verifier(signed_at(request))
        pairs = [(n, headers.get(n) or "") for n in headers if n != "authorization"]
        for bad, error in [
            ("AWS4-HMAC-SHA256", errors.AuthorizationHeaderMalformed),
            ("AWS4-HMAC-SHA256 Credential=x", errors.AuthorizationHeaderMalformed),
            (good.replace("Credential=", "Credential=a/b/"), errors.AuthorizationHeaderMalformed),
            (good.replace("/aws4_request", "/aws5_request"), errors.AuthorizationHeaderMalformed),
            (good.replace("/s3/", "/iam/"), errors.AuthorizationHeaderMalformed),
            (good.replace("SignedHeaders=", "SignedHeaders=Host;"),
             errors.AuthorizationHeaderMalformed),
            (good + ", Signature=0", errors.AuthorizationHeaderMalformed),
            (good.replace("Signature=", "Signature=é"), errors.SignatureDoesNotMatch),
            ("Bearer abc", errors.InvalidArgument),
            ("AWS4-ECDSA-P256-SHA256 Credential=x", errors.NotImplementedS3),
        ]:
            self.assertRaises(error, v.verify, method, path, query,
                              Headers(pairs + [("Authorization", bad)]))

    def test_credential_date_must_match(self) -> None:
        request = sign("GET", "http://h/bkt/k")
        method, path, query, headers = parts(request)
        amz_date = headers.get("x-amz-date") or ""
        pairs = [(n, headers.get(n) or "") for n in headers if n != "authorization"]
        bad = (headers.get("authorization") or "").replace(f"/{amz_date[:8]}/", "/20000101/")
        self.assertRaises(errors.AuthorizationHeaderMalformed, verifier(signed_at(request)).verify,
                          method, path, query, Headers(pairs + [("Authorization", bad)]))

    def test_payload_hash_required(self) -> None:
        request = sign("GET", "http://h/bkt/k")
        method, path, query, headers = parts(request)
        pairs = [(n, headers.get(n) or "") for n in headers if n != "x-amz-content-sha256"]
        self.assertRaises(errors.InvalidRequest, verifier(signed_at(request)).verify,
                          method, path, query, Headers(pairs))

    def test_payload_modes(self) -> None:
        self.assertEqual(payload_mode("a" * 64), PayloadMode.SHA256)
        for mode in PayloadMode:
            if mode is not PayloadMode.SHA256:
                self.assertEqual(payload_mode(mode.value), mode)
        self.assertTrue(PayloadMode.STREAMING_SIGNED.signed_chunks)
        self.assertFalse(PayloadMode.STREAMING_UNSIGNED_TRAILER.signed_chunks)
        self.assertTrue(PayloadMode.STREAMING_UNSIGNED_TRAILER.trailer)
        self.assertFalse(PayloadMode.UNSIGNED.streaming)
        for bad in ("A" * 64, "a" * 63, "sha256", "", PayloadMode.SHA256.value):
            self.assertRaises(errors.InvalidArgument, payload_mode, bad)
        self.assertRaises(errors.NotImplementedS3, payload_mode,
                          "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD")

    def test_unsigned_payload_over_botocore(self) -> None:
        """
        rclone's mode: UNSIGNED-PAYLOAD in the signed header.
        """
        request = AWSRequest("PUT", "http://h/bkt/k", data=b"data")
        request.context["client_config"] = Config(s3={"payload_signing_enabled": False})
        S3SigV4Auth(CREDENTIALS, "s3", "us-east-1").add_auth(request)
        self.assertEqual(request.headers["X-Amz-Content-SHA256"], "UNSIGNED-PAYLOAD")
        result = verify(request)
        self.assertEqual((result.payload, result.content_sha256), (PayloadMode.UNSIGNED, None))

    def test_anonymous(self) -> None:
        self.assertIsNone(verifier(0).verify("GET", "/bkt/k", "", Headers([("Host", "h")])))


class SigningKeyTests(SynchronousTestCase):
    def test_aws_example(self) -> None:
        """
        AWS's worked example of deriving a signing key.
        """
        self.assertEqual(
            signing_key("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20120215", "us-east-1",
                        "iam").hex(),
            "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d",
        )

    def test_cached(self) -> None:
        """
        One key per secret, day, region and service is derived once.
        """
        signing_key.cache_clear()
        for _ in range(3):
            signing_key("s", "20260101", "us-east-1", "s3")
        signing_key("s", "20260102", "us-east-1", "s3")
        info = signing_key.cache_info()
        self.assertEqual((info.hits, info.misses), (2, 2))


class PresignedTests(SynchronousTestCase):
    """
    Presigned query strings (C{X-Amz-*} parameters), as
    C{generate_presigned_url} makes them with C{signature_version="s3v4"}.
    """

    def test_accepted_until_expiry(self) -> None:
        request = sign("GET", "http://h/bkt/a%20key?response-content-type=text%2Fplain",
                       presign=600)
        for offset in (0, 600, -900):
            result = verify(request, offset)
            self.assertEqual(result.scheme, AuthScheme.PRESIGNED)
            self.assertEqual(result.payload, PayloadMode.UNSIGNED)
            self.assertEqual(result.expires, signed_at(request) + 600)
        e = self.assertRaises(errors.RequestExpired, verify, request, 601)
        self.assertEqual((e.code, e.status), ("AccessDenied", 403))
        self.assertEqual(e.message, "Request has expired")
        self.assertEqual(e.extra["X-Amz-Expires"], "600")
        self.assertIn(b"<X-Amz-Expires>600</X-Amz-Expires>", e.body("r"))
        e = self.assertRaises(errors.AccessDenied, verify, request, -901)
        self.assertEqual(e.message, "Request is not valid yet")

    def test_at_most_seven_days(self) -> None:
        self.assertEqual(verify(sign("GET", "http://h/bkt/k", presign=604800)).access_key,
                         ACCESS_KEY)
        self.assertRaises(errors.AuthorizationQueryParametersError, verify,
                          sign("GET", "http://h/bkt/k", presign=604801))

    def test_presigned_put(self) -> None:
        """
        A presigned PUT verifies whatever body a plain HTTP client sends.
        """
        request = sign("PUT", "http://h/bkt/k", presign=60)
        method, path, query, headers = parts(request)
        headers = Headers([(n, headers.get(n) or "") for n in headers]
                          + [("Content-Length", "5"),
                             ("Content-Type", "application/x-www-form-urlencoded")])
        self.assertEqual(verifier(signed_at(request)).verify(method, path, query,
                                                             headers).payload,
                         PayloadMode.UNSIGNED)

    def test_tampering_refused(self) -> None:
        request = sign("GET", "http://h/bkt/k?versionId=null", presign=60)
        method, path, query, headers = parts(request)
        v = verifier(signed_at(request))
        for case in [
            ("PUT", path, query, headers),
            (method, "/bkt/other", query, headers),
            (method, path, query.replace("versionId=null", "versionId=1"), headers),
            (method, path, query.replace("X-Amz-Expires=60", "X-Amz-Expires=61"), headers),
            (method, path, query + "&response-content-type=text%2Fhtml", headers),
        ]:
            self.assertRaises(errors.SignatureDoesNotMatch, v.verify, *case)

    def test_missing_and_bad_parameters(self) -> None:
        request = sign("GET", "http://h/bkt/k", presign=60)
        method, path, query, headers = parts(request)
        v = verifier(signed_at(request))
        params = query.split("&")
        for i in range(len(params)):
            self.assertRaises(errors.AuthorizationQueryParametersError, v.verify, method, path,
                              "&".join(params[:i] + params[i + 1:]), headers)
        for old, new in [("X-Amz-Expires=60", "X-Amz-Expires=soon"),
                         ("X-Amz-Algorithm=AWS4-HMAC-SHA256", "X-Amz-Algorithm=AWS4-HMAC-SHA1"),
                         ("X-Amz-Date=", "X-Amz-Date=2026")]:
            self.assertRaises(errors.AuthorizationQueryParametersError, v.verify, method, path,
                              query.replace(old, new), headers)
        self.assertRaises(errors.InvalidArgument, v.verify, method, path,
                          query + "&X-Amz-Expires=60", headers)

    def test_only_one_mechanism(self) -> None:
        request = sign("GET", "http://h/bkt/k", presign=60)
        method, path, query, headers = parts(request)
        both = Headers([(n, headers.get(n) or "") for n in headers]
                       + [("Authorization", "AWS4-HMAC-SHA256 x")])
        self.assertRaises(errors.InvalidArgument, verifier(signed_at(request)).verify,
                          method, path, query, both)

    def test_streaming_refused(self) -> None:
        request = sign("PUT", "http://h/bkt/k?X-Amz-Content-Sha256=STREAMING-UNSIGNED-PAYLOAD-TRAILER",
                       presign=60)
        self.assertRaises(errors.InvalidRequest, verify, request)


class SignatureV2Tests(SynchronousTestCase):
    """
    Version 2, which boto3 and the AWS CLI use for presigned URLs unless
    configured otherwise.
    """

    def test_presigned_accepted_until_expiry(self) -> None:
        request = sign("GET", "http://h/bkt/a%20b?uploads", presign=300, v2=True)
        expires = signed_at(request)
        for now in (expires - 300, expires):
            result = verifier(now).verify(*parts(request))
            self.assertEqual(result.scheme, AuthScheme.V2_PRESIGNED)
            self.assertEqual(result.expires, expires)
        self.assertRaises(errors.RequestExpired, verifier(expires + 1).verify, *parts(request))
        self.assertRaises(errors.AccessDenied, verifier(expires - 604801).verify, *parts(request))

    def test_presigned_tampering(self) -> None:
        request = sign("GET", "http://h/bkt/k?versionId=1", presign=300, v2=True)
        method, path, query, headers = parts(request)
        v = verifier(signed_at(request) - 1)
        for case in [("PUT", path, query, headers), (method, "/bkt/j", query, headers),
                     (method, path, query.replace("versionId=1", "versionId=2"), headers)]:
            self.assertRaises(errors.SignatureDoesNotMatch, v.verify, *case)

    def test_virtual_hosted(self) -> None:
        """
        Version 2 signs the bucket as part of the path even when the Host
        header names it.
        """
        request = AWSRequest("GET", "http://bkt.s3.example.com/k")
        request.auth_path = "/bkt/k"
        HmacV1QueryAuth(CREDENTIALS, expires=60).add_auth(request)
        method, path, query, headers = parts(request)
        v = verifier(signed_at(request) - 1)
        self.assertEqual(v.verify(method, path, query, headers, virtual_bucket="bkt").access_key,
                         ACCESS_KEY)
        self.assertRaises(errors.SignatureDoesNotMatch, v.verify, method, path, query, headers)

    def test_header(self) -> None:
        request = sign("PUT", "http://h/bkt/k", b"x",
                       {"Content-Type": "text/plain", "x-amz-meta-a": "b"}, v2=True)
        result = verify(request)
        self.assertEqual((result.scheme, result.payload),
                         (AuthScheme.V2_HEADER, PayloadMode.UNSIGNED))
        self.assertRaises(errors.RequestTimeTooSkewed, verify, request, 901)
        method, path, query, headers = parts(request)
        self.assertRaises(errors.SignatureDoesNotMatch, verifier(signed_at(request)).verify,
                          "DELETE", path, query, headers)


class StreamingSignatureTests(SynchronousTestCase):
    """
    The chunk and trailer signatures of AWS's published examples.
    """

    def test_seed(self) -> None:
        result = aws_verifier().verify("PUT", "/examplebucket/chunkObject.txt", "",
                                       aws_streaming_headers())
        self.assertEqual(result.payload, PayloadMode.STREAMING_SIGNED)
        self.assertIsNotNone(result.chunks)
        self.assertEqual(result.chunks.seed, AWS_SEED)

    def test_chain(self) -> None:
        result = aws_verifier().verify("PUT", "/examplebucket/chunkObject.txt", "",
                                       aws_streaming_headers())
        signer = result.chunks
        previous = signer.seed
        for data, expected in zip((b"a" * 65536, b"a" * 1024, b""), AWS_CHUNKS, strict=True):
            previous = signer.chunk(previous, hashlib.sha256(data).hexdigest())
            self.assertEqual(previous, expected)
        self.assertEqual(signer.trailer(previous, b"first:1st\nsecond:2nd\nthird:3rd\n"),
                         AWS_TRAILER)
