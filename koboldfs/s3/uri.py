"""
Percent-encoding as S3 and Signature Version 4 use it.

A request's path and query arrive percent-encoded.  S3 decodes each
once (no double decoding, C{+} is a plus sign, not a space), and SigV4
signs them re-encoded canonically: every byte but the unreserved
C{A-Z a-z 0-9 - _ . ~} as C{%XX} in upper case.  Decoding then
re-encoding gives the same canonical form as the client computed, however
the client spelled the escapes.
"""

from __future__ import annotations

import re
from urllib.parse import quote

from koboldfs.s3.errors import InvalidArgument, InvalidURI

_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


def uri_encode(value: str | bytes, safe: str = "") -> str:
    """
    C{value} (UTF-8 when text) percent-encoded the SigV4 way; C{safe}
    lists further characters to keep (C{"/"} for a path).
    """
    return quote(value.encode("utf-8") if isinstance(value, str) else value, safe=safe)


def percent_decode(value: str) -> bytes:
    """
    The bytes C{value} stands for: each C{%XX} once, everything else as
    it is (the text is the latin-1 form of the bytes received).

    @raise InvalidURI: a C{%} not followed by two hex digits.
    """
    raw = _latin1(value)
    if _BAD_ESCAPE.search(raw):
        raise InvalidURI(f"invalid percent-encoding in {value[:200]!r}")
    return _ESCAPE.sub(lambda m: bytes((int(m.group(1), 16),)), raw)


def _latin1(value: str) -> bytes:
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        # Text that did not come off the wire as latin-1: take its UTF-8.
        return value.encode("utf-8")


def decode_text(value: str, what: str) -> str:
    """
    C{value} percent-decoded as UTF-8 text.

    @raise InvalidURI: bad escapes or bytes that are not UTF-8.
    """
    try:
        return percent_decode(value).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidURI(f"the {what} is not UTF-8 once percent-decoded") from None


def canonical_path(raw_path: str) -> str:
    """
    The canonical URI of SigV4 for S3: each C{/}-separated segment of the
    path as received decoded once and re-encoded, with no normalisation
    (S3 keeps empty, C{.} and C{..} segments: they are part of keys).
    """
    return "/".join(uri_encode(percent_decode(segment)) for segment in raw_path.split("/"))


def parse_query(raw_query: str) -> list[tuple[str, str]]:
    """
    The query string's parameters, decoded, in order; a parameter
    without C{=} has the value C{""}.

    @raise InvalidURI: bad escapes or text that is not UTF-8.
    """
    if not raw_query:
        return []
    pairs = []
    for part in raw_query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        pairs.append((decode_text(name, "query"), decode_text(value, "query")))
    return pairs


def canonical_query(raw_query: str, exclude: frozenset[str] = frozenset()) -> str:
    """
    The canonical query string of SigV4: every parameter but those named
    in C{exclude}, re-encoded, sorted by name then value.
    """
    encoded = sorted(
        (uri_encode(name), uri_encode(value))
        for name, value in parse_query(raw_query)
        if name not in exclude
    )
    return "&".join(f"{name}={value}" for name, value in encoded)


def single_param(params: list[tuple[str, str]], name: str) -> str | None:
    """
    The value of the query parameter C{name}, or None when absent.

    @raise InvalidArgument: it is given more than once.
    """
    values = [value for key, value in params if key == name]
    if len(values) > 1:
        raise InvalidArgument(f"the query parameter {name} is given more than once",
                              ArgumentName=name)
    return values[0] if values else None


def is_decimal(value: str, max_digits: int) -> bool:
    """
    Whether C{value} is 1 to C{max_digits} ASCII digits (C{str.isdigit}
    alone takes C{"²"}, which C{int} refuses).
    """
    return 0 < len(value) <= max_digits and value.isascii() and value.isdigit()
