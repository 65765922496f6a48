"""
AWS signature version 2 (HMAC-SHA1), which botocore still uses for the
presigned URLs of C{generate_presigned_url} and C{aws s3 presign} unless
the client is configured with C{signature_version="s3v4"}: without it,
a presigned URL from boto3's defaults would be refused.

The string to sign is the method, C{Content-MD5}, C{Content-Type}, the
date (the C{Expires} parameter for a presigned URL, empty when
C{x-amz-date} is sent), the C{x-amz-*} headers, and the resource: the
path with the bucket (even in virtual-hosted style) and the
sub-resources that change what it names.  Called by
L{koboldfs.s3.sigv4.Verifier}.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from koboldfs.s3.errors import AccessDenied, RequestExpired, RequestTimeTooSkewed
from koboldfs.s3.headers import Headers, format_iso8601, parse_http_date
from koboldfs.s3.uri import is_decimal, single_param

#: The query parameters that are part of the resource signed.
SUBRESOURCES = frozenset(
    """accelerate acl cors defaultObjectAcl delete lifecycle location logging
    notification partNumber policy requestPayment response-cache-control
    response-content-disposition response-content-encoding
    response-content-language response-content-type response-expires restore
    tagging torrent uploadId uploads versionId versioning versions website
    replication analytics metrics inventory select select-type object-lock
    storageClass""".split()
)


def sign(secret: str, to_sign: str) -> str:
    """
    The base64 HMAC-SHA1 of C{to_sign}.
    """
    digest = hmac.new(secret.encode("utf-8"), to_sign.encode("latin-1", "replace"), hashlib.sha1)
    return base64.b64encode(digest.digest()).decode("ascii")


def header_fields(headers: Headers, now: float, max_skew: float) -> tuple[str, str]:
    """
    The access key and signature of an C{AWS AKID:signature} header, once
    the request's date is checked against C{now}.
    """
    authorization = (headers.get("authorization") or "").strip()
    access_key, sep, signature = authorization[len("AWS "):].strip().rpartition(":")
    if not sep or not access_key or not signature:
        raise AccessDenied("The Authorization header is malformed (AWS AccessKeyId:Signature)")
    date = headers.get("x-amz-date") or headers.get("date")
    when = parse_http_date(date) if date else None
    if when is None:
        raise AccessDenied("AWS authentication requires a valid Date or x-amz-date header")
    if abs(now - when) > max_skew:
        raise RequestTimeTooSkewed(RequestTime=date, ServerTime=format_iso8601(now),
                                   MaxAllowedSkewMilliseconds=int(max_skew * 1000))
    return access_key, signature


def query_fields(params: list[tuple[str, str]], now: float) -> tuple[str, str, float]:
    """
    The access key, signature and expiry of a presigned URL, once its
    expiry is checked against C{now} (at most 7 days ahead, as for SigV4).
    """
    access_key = single_param(params, "AWSAccessKeyId")
    signature = single_param(params, "Signature")
    expires_text = single_param(params, "Expires")
    if not access_key or not signature or not expires_text:
        raise AccessDenied(
            "Query-string authentication requires the Signature, Expires and AWSAccessKeyId "
            "parameters"
        )
    if not is_decimal(expires_text, 12):
        raise AccessDenied(f"Invalid date (should be seconds since epoch): {expires_text[:40]}")
    expires = float(expires_text)
    if now > expires:
        raise RequestExpired(0, format_iso8601(expires), format_iso8601(now))
    if expires - now > 604800:
        raise AccessDenied("Query-string authentication expires at most 7 days ahead")
    return access_key, signature, expires


def string_to_sign(
    method: str,
    path: str,
    params: list[tuple[str, str]],
    headers: Headers,
    virtual_bucket: str | None,
    presigned: bool,
) -> str:
    """
    The version 2 string to sign of a request.
    """
    if presigned:
        date = single_param(params, "Expires") or ""
    elif "x-amz-date" in headers:
        date = ""
    else:
        date = headers.get("date") or ""
    amz: dict[str, list[str]] = {}
    for name in headers:
        if name.startswith("x-amz-"):
            amz.setdefault(name, []).extend(v.strip() for v in headers.all(name))
    if presigned:
        for name, value in params:
            if name.lower().startswith("x-amz-"):
                amz.setdefault(name.lower(), []).append(value.strip())
    lines = [method, (headers.get("content-md5") or "").strip(),
             (headers.get("content-type") or "").strip(), date]
    lines += [f"{name}:{','.join(amz[name])}" for name in sorted(amz)]
    lines.append(_resource(path, params, virtual_bucket))
    return "\n".join(lines)


def _resource(path: str, params: list[tuple[str, str]], virtual_bucket: str | None) -> str:
    resource = f"/{virtual_bucket}{path}" if virtual_bucket is not None else path
    subs = sorted(
        ((name, value) for name, value in params if name in SUBRESOURCES), key=lambda p: p[0]
    )
    if subs:
        resource += "?" + "&".join(f"{name}={value}" if value else name for name, value in subs)
    return resource
