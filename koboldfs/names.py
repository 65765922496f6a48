"""
What a namespace and a key may be.

Clients check names before sending anything and servers check them again,
so a bad name is refused with the same message on both sides.  A key never
becomes a path on disk (files are stored by an internal id), so the rules
are about what the metadata can index, not about file systems.
"""

from __future__ import annotations

import re

from koboldfs.errors import InvalidKey, InvalidNamespace

MAX_NAMESPACE = 64
MAX_KEY_BYTES = 1024

_NAMESPACE = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")


def check_namespace(namespace: object) -> str:
    """
    Return C{namespace} if it is a valid namespace name, else raise.

    @raise InvalidNamespace: not 1 to 64 characters of C{[A-Za-z0-9._-]}.
    """
    if not isinstance(namespace, str) or not _NAMESPACE.match(namespace):
        raise InvalidNamespace(
            f"invalid namespace {namespace!r}: use 1 to {MAX_NAMESPACE} "
            "characters from A-Z a-z 0-9 . _ -"
        )
    return namespace


def check_key(key: object) -> str:
    """
    Return C{key} if it is a valid key, else raise.

    @raise InvalidKey: empty, longer than 1024 bytes of UTF-8, containing
        NUL, or not encodable as UTF-8 (lone surrogates).
    """
    if not isinstance(key, str):
        raise InvalidKey(f"invalid key {key!r}: keys are str")
    if not key:
        raise InvalidKey("invalid key: keys are not empty")
    if "\0" in key:
        raise InvalidKey(f"invalid key {key!r}: keys contain no NUL")
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidKey(f"invalid key {key!r}: not encodable as UTF-8") from None
    if len(encoded) > MAX_KEY_BYTES:
        raise InvalidKey(
            f"invalid key: {len(encoded)} bytes of UTF-8, the limit is {MAX_KEY_BYTES}"
        )
    return key


def key_upper_bound(prefix: str) -> str | None:
    """
    The smallest string greater than every string starting with C{prefix}.

    Listing by prefix is then a range scan (C{prefix <= key < bound}) that
    any index serves, in code-point order (which is UTF-8 byte order).
    None when no such bound exists (the prefix is all U+10FFFF).
    """
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last < 0x10FFFF:
            nxt = last + 1
            if 0xD800 <= nxt <= 0xDFFF:  # skip surrogates: not valid keys
                nxt = 0xE000
            return "".join(chars) + chr(nxt)
    return None


_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")
_IP_LIKE = re.compile(r"\d+\.\d+\.\d+\.\d+\Z")
_BUCKET_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_BUCKET_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")


def is_bucket_name(name: str) -> bool:
    """
    Whether namespace C{name} is also a valid S3 bucket name (S3's general
    purpose bucket naming rules): 3 to 63 lower-case letters, digits, dots
    and hyphens, starting and ending with a letter or digit, no two dots
    in a row, not shaped like an IP address, none of S3's reserved
    prefixes and suffixes.  Namespaces that are not are kept out of S3.
    """
    return (
        _BUCKET.match(name) is not None
        and ".." not in name
        and _IP_LIKE.match(name) is None
        and not name.startswith(_BUCKET_RESERVED_PREFIXES)
        and not name.endswith(_BUCKET_RESERVED_SUFFIXES)
    )
