"""
What a front end may store with a file besides its bytes: its attributes,
a flat mapping of lower-case names to strings (the S3 front end's
C{content-type}, C{cache-control}, C{x-amz-meta-*}...; docs/s3.md).  The
core and the metadata store keep them without knowing what they mean, and
bound them here, once, so that a put with too many is refused before
anything is published.
"""

from __future__ import annotations

import json
from types import MappingProxyType
from typing import Any, Mapping

from koboldfs.errors import ErrorCode, ServerError

#: The prefix of user metadata, whose total size S3 bounds.
USER_PREFIX = "x-amz-meta-"
#: S3's bound on user metadata: the UTF-8 bytes of every name (after the
#: prefix) and value, summed.
MAX_USER_METADATA = 2048
#: The bound on all of them, as stored (JSON).
MAX_ATTRIBUTES = 8192
MAX_NAME = 128


class AttributesTooLarge(ServerError):
    """
    More attributes than a file may carry (S3's C{MetadataTooLarge}).
    """

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.BAD_REQUEST, message)


def check_attributes(attributes: Mapping[str, str] | None) -> Mapping[str, str] | None:
    """
    Return C{attributes} frozen (None when empty) if a file may carry them.

    @raise AttributesTooLarge: user metadata over L{MAX_USER_METADATA}
        bytes, or all of them over L{MAX_ATTRIBUTES} once stored.
    @raise ServerError: (C{BAD_REQUEST}) a name that is not lower-case
        printable ASCII, or a value that is not a string or holds a
        control character (it would not survive an HTTP header).
    """
    if not attributes:
        return None
    user = 0
    for name, value in attributes.items():
        if not (
            isinstance(name, str)
            and 0 < len(name) <= MAX_NAME
            and name.isascii()
            and name.isprintable()
            and name == name.lower()
            and " " not in name
        ):
            raise ServerError(ErrorCode.BAD_REQUEST, f"bad attribute name {name!r}")
        if not isinstance(value, str) or any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ServerError(ErrorCode.BAD_REQUEST, f"bad value for attribute {name!r}")
        if name.startswith(USER_PREFIX):
            user += len(name[len(USER_PREFIX) :].encode()) + len(value.encode())
    if user > MAX_USER_METADATA:
        raise AttributesTooLarge(
            f"user metadata is {user} bytes: at most {MAX_USER_METADATA} are allowed"
        )
    if len(encode(attributes).encode()) > MAX_ATTRIBUTES:
        raise AttributesTooLarge(f"attributes over {MAX_ATTRIBUTES} bytes")
    return MappingProxyType(dict(attributes))


def encode(attributes: Mapping[str, str]) -> str:
    """
    The stored form: JSON, names sorted.
    """
    return json.dumps(dict(attributes), sort_keys=True, separators=(",", ":"))


def decode(stored: str | None) -> Mapping[str, str] | None:
    """
    Attributes from their stored form, frozen.
    """
    if stored is None:
        return None
    found: Any = json.loads(stored)
    return MappingProxyType(found)
