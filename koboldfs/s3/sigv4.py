"""
AWS Signature Version 4 verification, for the Authorization header and
for presigned query strings, and the chunk and trailer signatures of
signed aws-chunked bodies.

L{Verifier} takes the request as received (method, raw path, raw query,
L{Headers}), looks the secret up through a callable (so the credential
store stays outside), reads the time from a callable, and returns an
L{Authenticated} or raises the S3 error AWS would.  Version 2
signatures (L{koboldfs.s3.sigv2}), which boto3 and the AWS CLI still use
for presigned URLs by default, are verified by the same call.

What the payload hash promises is not checked here (the body has not
arrived): L{Authenticated.payload} says which mode the client chose, and
the body is then checked by L{koboldfs.s3.checksums.BodyVerifier} and,
for aws-chunked bodies, L{koboldfs.s3.chunked.ChunkedDecoder}.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from koboldfs.s3 import sigv2
from koboldfs.s3.errors import (
    AccessDenied,
    AuthorizationHeaderMalformed,
    AuthorizationQueryParametersError,
    InvalidAccessKeyId,
    InvalidArgument,
    InvalidRequest,
    NotImplementedS3,
    RequestExpired,
    RequestTimeTooSkewed,
    S3Error,
    SignatureDoesNotMatch,
)
from koboldfs.s3.headers import (
    Headers,
    format_amz_date,
    format_iso8601,
    parse_amz_date,
    parse_http_date,
)
from koboldfs.s3.uri import (
    canonical_path,
    canonical_query,
    is_decimal,
    parse_query,
    single_param,
)

ALGORITHM = "AWS4-HMAC-SHA256"
#: At most 15 minutes between the client's clock and ours (header auth).
MAX_SKEW = 900.0
#: A presigned URL lives at most 7 days.
MAX_EXPIRES = 604800
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

SecretLookup = Callable[[str], "str | None"]
Clock = Callable[[], float]


class PayloadMode(enum.Enum):
    """
    What C{x-amz-content-sha256} says of the body.
    """

    #: The hex SHA-256 of the body: check it as the body streams.
    SHA256 = "sha256"
    UNSIGNED = "UNSIGNED-PAYLOAD"
    #: aws-chunked, every chunk signed, chained from the seed signature.
    STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
    #: The same, with signed trailing headers (checksums) after the last chunk.
    STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
    #: aws-chunked without chunk signatures, with trailing checksums.
    STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"

    @property
    def streaming(self) -> bool:
        """
        Whether the body is aws-chunked.
        """
        return self.value.startswith("STREAMING-")

    @property
    def signed_chunks(self) -> bool:
        return self in (PayloadMode.STREAMING_SIGNED, PayloadMode.STREAMING_SIGNED_TRAILER)

    @property
    def trailer(self) -> bool:
        return self.value.endswith("-TRAILER")


_SHA256_HEX = re.compile(r"[0-9a-f]{64}\Z")


def payload_mode(value: str) -> PayloadMode:
    """
    The L{PayloadMode} of an C{x-amz-content-sha256} value.

    @raise InvalidArgument: none that S3 knows.
    @raise NotImplementedS3: a mode KoboldFS does not take (SigV4a, events).
    """
    if _SHA256_HEX.match(value):
        return PayloadMode.SHA256
    try:
        mode = PayloadMode(value)
    except ValueError:
        if value.startswith("STREAMING-"):
            raise NotImplementedS3(f"x-amz-content-sha256 {value[:80]} is not supported") from None
        raise InvalidArgument(
            "x-amz-content-sha256 must be UNSIGNED-PAYLOAD, STREAMING-... or a valid sha256 value.",
            ArgumentName="x-amz-content-sha256", ArgumentValue=value[:200],
        ) from None
    if mode is PayloadMode.SHA256:
        raise InvalidArgument("x-amz-content-sha256 is not a sha256 value",
                              ArgumentName="x-amz-content-sha256")
    return mode


class AuthScheme(enum.Enum):
    HEADER = "AWS4-HMAC-SHA256 Authorization header"
    PRESIGNED = "AWS4-HMAC-SHA256 presigned query string"
    V2_HEADER = "AWS signature version 2 Authorization header"
    V2_PRESIGNED = "AWS signature version 2 presigned query string"


@dataclass(frozen=True)
class Scope:
    """
    A credential scope: C{date/region/service/aws4_request}.
    """

    date: str
    region: str
    service: str

    def __str__(self) -> str:
        return f"{self.date}/{self.region}/{self.service}/aws4_request"


@lru_cache(maxsize=1024)
def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    """
    The SigV4 signing key of a secret for one day, region and service;
    cached, since a client signs every request of a day with the same
    one (keyed by the secret itself, so a rotated secret gets a new key).
    """
    key = _hmac(("AWS4" + secret).encode("utf-8"), date)
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    return key


def _hmac(key: bytes, message: str | bytes) -> bytes:
    data = message.encode("utf-8") if isinstance(message, str) else message
    return hmac.new(key, data, hashlib.sha256).digest()


def _same(expected: str, provided: str) -> bool:
    """
    Constant-time comparison of two signatures (of any text).
    """
    return hmac.compare_digest(expected.encode("utf-8"), provided.encode("utf-8", "replace"))


class ChunkSigner:
    """
    The signatures that chain a signed aws-chunked body: each chunk's is
    over the previous signature (the seed for the first) and the chunk's
    SHA-256, and the trailer's over the last chunk's and the trailing
    headers.
    """

    def __init__(self, key: bytes, amz_date: str, scope: Scope, seed: str) -> None:
        self._key = key
        self._amz_date = amz_date
        self._scope = str(scope)
        self.seed = seed

    def chunk(self, previous: str, chunk_sha256: str) -> str:
        """
        The signature of a chunk whose SHA-256 (hex) is C{chunk_sha256}.
        """
        to_sign = "\n".join(
            (f"{ALGORITHM}-PAYLOAD", self._amz_date, self._scope, previous, EMPTY_SHA256,
             chunk_sha256)
        )
        return hmac.new(self._key, to_sign.encode("ascii"), hashlib.sha256).hexdigest()

    def trailer(self, previous: str, trailer: bytes) -> str:
        """
        The signature of the trailing headers, C{trailer} being their
        canonical form (C{name:value\\n} each, as sent).
        """
        to_sign = "\n".join(
            (f"{ALGORITHM}-TRAILER", self._amz_date, self._scope, previous,
             hashlib.sha256(trailer).hexdigest())
        )
        return hmac.new(self._key, to_sign.encode("ascii"), hashlib.sha256).hexdigest()

    @staticmethod
    def same(expected: str, provided: str) -> bool:
        """
        Whether a chunk or trailer signature is the expected one (constant time).
        """
        return _same(expected, provided)


@dataclass(frozen=True)
class Authenticated:
    """
    Who signed a request, and what its signature promises of the body.

    @ivar access_key: the access key id whose secret signed it.
    @ivar scheme: how it was signed.
    @ivar payload: the payload mode (L{PayloadMode.UNSIGNED} for presigned
        and version 2 requests).
    @ivar content_sha256: the hex SHA-256 the body must have, for
        L{PayloadMode.SHA256}.
    @ivar expires: for a presigned URL, when it expires (POSIX seconds).
    @ivar chunks: for signed aws-chunked bodies, what checks the chain.
    """

    access_key: str
    scheme: AuthScheme
    payload: PayloadMode
    content_sha256: str | None = None
    expires: float | None = None
    chunks: ChunkSigner | None = None


@dataclass(frozen=True)
class _Signed:
    """
    The parts of a SigV4 signature, from a header or a query string.
    """

    access_key: str
    scope: Scope
    signed_headers: tuple[str, ...]
    signature: str
    amz_date: str
    time: float


class Verifier:
    """
    Verifies the signature of S3 requests.

    @param secret_for: access key id -> its secret, or None when there is
        no such key (or it was revoked).
    @param clock: the time now, in POSIX seconds (C{reactor.seconds}).
    @param region: the region signatures must be scoped to.
    """

    def __init__(
        self,
        secret_for: SecretLookup,
        clock: Clock,
        region: str,
        *,
        service: str = "s3",
        max_skew: float = MAX_SKEW,
    ) -> None:
        self._secret_for = secret_for
        self._clock = clock
        self.region = region
        self.service = service
        self.max_skew = max_skew

    def verify(
        self,
        method: str,
        path: str,
        query: str,
        headers: Headers,
        *,
        virtual_bucket: str | None = None,
    ) -> Authenticated | None:
        """
        Check the request's signature.

        @param path: the path as received, still percent-encoded.
        @param query: the query string as received (without C{?}).
        @param virtual_bucket: the bucket named by the Host header in
            virtual-hosted style (version 2 signs it as part of the path).
        @return: who signed it, or None for an anonymous request (neither
            an Authorization header nor a signed query string).
        @raise S3Error: a malformed, unknown, expired or wrong signature.
        """
        params = parse_query(query)
        names = {name for name, _ in params}
        authorization = headers.get("authorization")
        presigned_v4 = "X-Amz-Algorithm" in names or "X-Amz-Signature" in names
        presigned_v2 = "AWSAccessKeyId" in names or "Signature" in names
        if authorization is not None and (presigned_v4 or presigned_v2):
            raise InvalidArgument(
                "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, "
                "Signature query string parameter or the Authorization header should be "
                "specified",
                ArgumentName="Authorization",
            )
        if authorization is not None:
            scheme = authorization.lstrip().split(" ", 1)[0]
            if scheme == ALGORITHM:
                return self._verify_header(method, path, query, headers, authorization)
            if scheme == "AWS":
                return self._verify_v2(method, path, params, headers, virtual_bucket, False)
            if scheme.startswith("AWS4-ECDSA"):
                raise NotImplementedS3("Signature Version 4A is not supported")
            raise InvalidArgument("Unsupported Authorization Type", ArgumentName="Authorization",
                                  ArgumentValue=authorization[:200])
        if presigned_v4:
            return self._verify_presigned(method, path, query, params, headers)
        if presigned_v2:
            return self._verify_v2(method, path, params, headers, virtual_bucket, True)
        return None

    # -- the Authorization header

    def _verify_header(
        self, method: str, path: str, query: str, headers: Headers, authorization: str
    ) -> Authenticated:
        fields = _authorization_fields(authorization)
        amz_date = headers.get("x-amz-date")
        if amz_date is None:
            date = headers.get("date")
            when = parse_http_date(date) if date is not None else None
            if when is None:
                raise AccessDenied(
                    "AWS authentication requires a valid Date or x-amz-date header"
                )
            amz_date = format_amz_date(when)
        try:
            when = parse_amz_date(amz_date)
        except ValueError:
            raise AccessDenied(
                "AWS authentication requires a valid Date or x-amz-date header"
            ) from None
        signed = _Signed(
            *self._credential(fields["Credential"], amz_date, AuthorizationHeaderMalformed),
            signed_headers=_signed_header_list(fields["SignedHeaders"],
                                               AuthorizationHeaderMalformed),
            signature=fields["Signature"],
            amz_date=amz_date,
            time=when,
        )
        now = self._clock()
        if abs(now - when) > self.max_skew:
            raise RequestTimeTooSkewed(
                RequestTime=amz_date,
                ServerTime=format_iso8601(now),
                MaxAllowedSkewMilliseconds=int(self.max_skew * 1000),
            )
        content_sha256 = headers.get("x-amz-content-sha256")
        if content_sha256 is None:
            raise InvalidRequest(
                "Missing required header for this request: x-amz-content-sha256"
            )
        mode = payload_mode(content_sha256)
        _check_all_signed(signed.signed_headers, headers)
        key = self._check(method, path, query, headers, signed, content_sha256, frozenset())
        return Authenticated(
            signed.access_key,
            AuthScheme.HEADER,
            mode,
            content_sha256=content_sha256 if mode is PayloadMode.SHA256 else None,
            chunks=ChunkSigner(key, amz_date, signed.scope, signed.signature)
            if mode.signed_chunks
            else None,
        )

    # -- presigned query strings

    def _verify_presigned(
        self,
        method: str,
        path: str,
        query: str,
        params: list[tuple[str, str]],
        headers: Headers,
    ) -> Authenticated:
        def need(name: str) -> str:
            value = single_param(params, name)
            if value is None:
                raise AuthorizationQueryParametersError(
                    "Query-string authentication version 4 requires the X-Amz-Algorithm, "
                    "X-Amz-Credential, X-Amz-Signature, X-Amz-Date, X-Amz-SignedHeaders, "
                    "and X-Amz-Expires parameters."
                )
            return value

        algorithm = need("X-Amz-Algorithm")
        credential, amz_date = need("X-Amz-Credential"), need("X-Amz-Date")
        signed_headers, signature = need("X-Amz-SignedHeaders"), need("X-Amz-Signature")
        expires_text = need("X-Amz-Expires")
        if algorithm != ALGORITHM:
            raise AuthorizationQueryParametersError(
                "X-Amz-Algorithm only supports \"AWS4-HMAC-SHA256\""
            )
        try:
            when = parse_amz_date(amz_date)
        except ValueError:
            raise AuthorizationQueryParametersError(
                "X-Amz-Date must be in the ISO8601 Long Format \"yyyyMMdd'T'HHmmss'Z'\""
            ) from None
        if not is_decimal(expires_text, 10):
            raise AuthorizationQueryParametersError(
                "X-Amz-Expires should be a number"
            )
        expires = int(expires_text)
        if expires > MAX_EXPIRES:
            raise AuthorizationQueryParametersError(
                "X-Amz-Expires must be less than a week (in seconds) that is 604800"
            )
        signed = _Signed(
            *self._credential(credential, amz_date, AuthorizationQueryParametersError),
            signed_headers=_signed_header_list(signed_headers, AuthorizationQueryParametersError),
            signature=signature,
            amz_date=amz_date,
            time=when,
        )
        now = self._clock()
        if now < when - self.max_skew:
            raise AccessDenied("Request is not valid yet")
        if now > when + expires:
            raise RequestExpired(expires, format_iso8601(when + expires), format_iso8601(now))
        content_sha256 = single_param(params, "X-Amz-Content-Sha256") or PayloadMode.UNSIGNED.value
        mode = payload_mode(content_sha256)
        if mode.streaming:
            raise InvalidRequest("a presigned request cannot carry an aws-chunked body")
        _check_all_signed(signed.signed_headers, headers)
        self._check(method, path, query, headers, signed, content_sha256,
                    frozenset({"X-Amz-Signature"}))
        return Authenticated(
            signed.access_key,
            AuthScheme.PRESIGNED,
            mode,
            content_sha256=content_sha256 if mode is PayloadMode.SHA256 else None,
            expires=when + expires,
        )

    # -- shared

    def _credential(
        self, credential: str, amz_date: str, malformed: type[S3Error]
    ) -> tuple[str, Scope]:
        parts = credential.split("/")
        if len(parts) != 5 or not parts[0] or parts[4] != "aws4_request":
            raise malformed(
                "Error parsing the X-Amz-Credential parameter; the Credential is mal-formed; "
                "expecting \"<YOUR-AKID>/YYYYMMDD/REGION/SERVICE/aws4_request\"."
            )
        access_key, date, region, service, _ = parts
        if date != amz_date[:8]:
            raise malformed(
                f"Invalid credential date \"{date[:20]}\". This date is not the same as "
                "X-Amz-Date: \"" + amz_date[:8] + "\"."
            )
        if region != self.region:
            raise malformed(
                f"The authorization header is malformed; the region '{region[:64]}' is wrong; "
                f"expecting '{self.region}'",
                Region=self.region,
            )
        if service != self.service:
            raise malformed(
                f"The authorization header is malformed; incorrect service \"{service[:64]}\". "
                f"This endpoint belongs to \"{self.service}\"."
            )
        return access_key, Scope(date, region, service)

    def _secret(self, access_key: str) -> str:
        secret = self._secret_for(access_key)
        if secret is None:
            raise InvalidAccessKeyId(AWSAccessKeyId=access_key[:128])
        return secret

    def _check(
        self,
        method: str,
        path: str,
        query: str,
        headers: Headers,
        signed: _Signed,
        content_sha256: str,
        exclude: frozenset[str],
    ) -> bytes:
        """
        Compute the signature and compare; return the signing key.
        """
        secret = self._secret(signed.access_key)
        canonical = canonical_request(
            method, path, query, headers, signed.signed_headers, content_sha256, exclude
        )
        to_sign = string_to_sign(signed.amz_date, signed.scope, canonical)
        key = signing_key(secret, signed.scope.date, signed.scope.region, signed.scope.service)
        expected = hmac.new(key, to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
        if not _same(expected, signed.signature):
            raise SignatureDoesNotMatch(
                AWSAccessKeyId=signed.access_key,
                StringToSign=to_sign,
                SignatureProvided=signed.signature[:128],
                CanonicalRequest=canonical,
            )
        return key

    def _verify_v2(
        self,
        method: str,
        path: str,
        params: list[tuple[str, str]],
        headers: Headers,
        virtual_bucket: str | None,
        presigned: bool,
    ) -> Authenticated:
        now = self._clock()
        if presigned:
            access_key, signature, expires = sigv2.query_fields(params, now)
        else:
            access_key, signature = sigv2.header_fields(headers, now, self.max_skew)
            expires = None
        to_sign = sigv2.string_to_sign(method, path, params, headers, virtual_bucket, presigned)
        expected = sigv2.sign(self._secret(access_key), to_sign)
        if not _same(expected, signature):
            raise SignatureDoesNotMatch(
                AWSAccessKeyId=access_key, StringToSign=to_sign,
                SignatureProvided=signature[:128],
            )
        return Authenticated(
            access_key,
            AuthScheme.V2_PRESIGNED if presigned else AuthScheme.V2_HEADER,
            PayloadMode.UNSIGNED,
            expires=expires,
        )


def canonical_request(
    method: str,
    path: str,
    query: str,
    headers: Headers,
    signed_headers: tuple[str, ...],
    content_sha256: str,
    exclude: frozenset[str] = frozenset(),
) -> str:
    """
    The SigV4 canonical request of S3 (no path normalisation, no double
    encoding): method, canonical path, canonical query, the signed
    headers (values trimmed, inner runs of spaces collapsed, repeated
    headers joined with C{,}), their names, and the payload hash.
    """
    lines = [method, canonical_path(path), canonical_query(query, exclude)]
    for name in signed_headers:
        values = [" ".join(v.split()) for v in headers.all(name)]
        lines.append(f"{name}:{','.join(values)}")
    lines += ["", ";".join(signed_headers), content_sha256]
    return "\n".join(lines)


def string_to_sign(amz_date: str, scope: Scope, canonical: str) -> str:
    """
    The SigV4 string to sign of a canonical request.
    """
    digest = hashlib.sha256(canonical.encode("latin-1", "replace")).hexdigest()
    return "\n".join((ALGORITHM, amz_date, str(scope), digest))


_FIELD = re.compile(r"\s*([A-Za-z]+)=([^,]*)\s*\Z")


def _authorization_fields(authorization: str) -> dict[str, str]:
    """
    C{Credential}, C{SignedHeaders} and C{Signature} of a SigV4
    Authorization header.
    """
    rest = authorization.strip()[len(ALGORITHM):]
    fields: dict[str, str] = {}
    for part in rest.split(","):
        m = _FIELD.match(part)
        if not m or m.group(1) in fields:
            raise AuthorizationHeaderMalformed(
                "The authorization header is malformed; it must be "
                "AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=..."
            )
        fields[m.group(1)] = m.group(2).strip()
    for name in ("Credential", "SignedHeaders", "Signature"):
        if name not in fields:
            raise AuthorizationHeaderMalformed(
                f"The authorization header is malformed; missing {name}."
            )
    return fields


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+\Z")


def _signed_header_list(value: str, malformed: type[S3Error]) -> tuple[str, ...]:
    names = tuple(value.split(";"))
    if not all(_HEADER_NAME.match(name) for name in names):
        raise malformed("SignedHeaders must be lowercase header names separated by ;")
    return names


def _check_all_signed(signed_headers: tuple[str, ...], headers: Headers) -> None:
    """
    S3's rule: the Host header and every C{x-amz-*} header sent must be
    signed, so that none can be added or changed on the way.
    """
    signed = set(signed_headers)
    unsigned = [name for name in headers if name.startswith("x-amz-") and name not in signed]
    if "host" not in signed:
        unsigned.insert(0, "host")
    if unsigned:
        raise AccessDenied(
            "There were headers present in the request which were not signed",
            HeadersNotSigned=", ".join(unsigned)[:500],
        )
