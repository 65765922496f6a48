"""
Who may use the S3 front end: the access key a request names, and
credentials kept in memory (read from the file C{--s3-credentials}
names, or given by tests).

The adapter (L{koboldfs.s3web}) depends only on
L{koboldfs.interfaces.IS3Credentials}; this module holds what needs no
database.  Credentials made with C{koboldfs admin} come from the
metadata store through the same interface.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from twisted.internet import defer
from zope.interface import implementer

from koboldfs.errors import KoboldError
from koboldfs.interfaces import IS3Credentials, S3Credential, S3Grant
from koboldfs.names import check_namespace
from koboldfs.s3.errors import S3Error
from koboldfs.s3.headers import Headers
from koboldfs.s3.uri import parse_query

_V4_CREDENTIAL = re.compile(r"Credential=\s*([^/,\s]+)/")
_V2_HEADER = re.compile(r"\s*AWS\s+([^:\s]+):")


def access_key_of(headers: Headers, raw_query: str) -> str | None:
    """
    The access key id a request says it is signed with (header or query
    string, version 4 or 2), before the signature is checked; None for
    an anonymous request or one too malformed to name one (the verifier
    then says what is wrong).
    """
    authorization = headers.get("authorization")
    if authorization is not None:
        m = _V4_CREDENTIAL.search(authorization) or _V2_HEADER.match(authorization)
        return m.group(1) if m else None
    try:
        params = parse_query(raw_query)
    except S3Error:
        return None
    for name, value in params:
        if name == "X-Amz-Credential":
            return value.split("/", 1)[0] or None
        if name == "AWSAccessKeyId":
            return value or None
    return None


def allows(credential: S3Credential, namespace: str | None, write: bool) -> bool:
    """
    Whether C{credential} may read (or, if C{write}, change) C{namespace};
    C{None} asks for a cluster-wide grant.
    """
    return any(
        (g.namespace is None or g.namespace == namespace) and (g.write or not write)
        for g in credential.grants
    )


@implementer(IS3Credentials)
class StaticCredentials:
    """
    Credentials held in memory: those of a credentials file, or a test's.
    """

    def __init__(self, credentials: Iterable[S3Credential] = ()) -> None:
        self._by_key = {c.access_key: c for c in credentials}

    def lookup(self, access_key: str) -> defer.Deferred[S3Credential | None]:
        return defer.succeed(self._by_key.get(access_key))

    def __len__(self) -> int:
        return len(self._by_key)


def parse_grant(text: str) -> S3Grant:
    """
    C{NAMESPACE:rw}, C{NAMESPACE:ro}, or C{*:rw} / C{*:ro} for the whole
    cluster.

    @raise ValueError: not of that form.
    """
    namespace, sep, mode = text.rpartition(":")
    if not sep or mode not in ("rw", "ro"):
        raise ValueError(f"grant {text!r} is not NAMESPACE:rw or NAMESPACE:ro")
    if namespace == "*":
        return S3Grant(None, mode == "rw")
    try:
        return S3Grant(check_namespace(namespace), mode == "rw")
    except KoboldError as e:
        raise ValueError(str(e)) from None


def read_credentials_file(path: str) -> StaticCredentials:
    """
    The credentials of a file of lines C{ACCESS_KEY SECRET GRANT...}
    (grants as L{parse_grant} reads them; C{#} begins a comment).

    @raise ValueError: a malformed line (its number is in the message).
    """
    credentials = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) < 3:
                raise ValueError(f"{path}:{number}: want ACCESS_KEY SECRET GRANT...")
            access_key, secret, *grants = fields
            try:
                parsed = tuple(parse_grant(g) for g in grants)
            except ValueError as e:
                raise ValueError(f"{path}:{number}: {e}") from None
            credentials.append(S3Credential(access_key, secret, parsed))
    return StaticCredentials(credentials)
