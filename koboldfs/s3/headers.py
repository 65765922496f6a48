"""
Request headers as received, and the date formats S3 uses.

Header names and values arrive as bytes; they are kept as latin-1 text,
which maps every byte to one character and back, so a signature is
computed over exactly the bytes the client sent (a UTF-8 metadata value
included).  Times are POSIX seconds (a float, as a Twisted clock's
C{seconds()}).
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Iterable, Iterator, Sequence

_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


class Headers:
    """
    Request headers: names compared without case, every value kept, in
    the order received.
    """

    def __init__(self, pairs: Iterable[tuple[str | bytes, str | bytes]] = ()) -> None:
        self._values: dict[str, list[str]] = {}
        for name, value in pairs:
            self._values.setdefault(_text(name).lower(), []).append(_text(value))

    @classmethod
    def from_lists(
        cls, lists: Iterable[tuple[str | bytes, Sequence[str | bytes]]]
    ) -> Headers:
        """
        From (name, [value, ...]) pairs, the shape of twisted.web's
        C{request.requestHeaders.getAllRawHeaders()}.
        """
        return cls((name, value) for name, values in lists for value in values)

    def get(self, name: str, default: str | None = None) -> str | None:
        """
        The header's value, several values joined with C{","} as HTTP
        allows; C{default} when it is absent.
        """
        values = self._values.get(name.lower())
        return ",".join(values) if values else default

    def all(self, name: str) -> list[str]:
        """
        Every value of the header, in order.
        """
        return list(self._values.get(name.lower(), ()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._values

    def __iter__(self) -> Iterator[str]:
        """
        The lowercase names present.
        """
        return iter(self._values)

    def __repr__(self) -> str:
        return f"Headers({self._values!r})"


def trailer_names(headers: Headers) -> list[str]:
    """
    The trailers C{x-amz-trailer} declares, lower case.
    """
    value = headers.get("x-amz-trailer") or ""
    return [name.strip().lower() for name in value.split(",") if name.strip()]


def format_http_date(seconds: float) -> str:
    """
    The IMF-fixdate of RFC 9110 (C{Mon, 07 Dec 2026 16:49:07 GMT}), for
    C{Last-Modified}, C{Date} and C{Expires}.
    """
    t = time.gmtime(seconds)
    return (
        f"{_WEEKDAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    )


_IMF = re.compile(
    r"[A-Za-z]{3}, (\d{2}) ([A-Za-z]{3}) (\d{4}) (\d{2}):(\d{2}):(\d{2}) GMT\Z"
)
_RFC850 = re.compile(
    r"[A-Za-z]{6,9}, (\d{2})-([A-Za-z]{3})-(\d{2}) (\d{2}):(\d{2}):(\d{2}) GMT\Z"
)
_ASCTIME = re.compile(
    r"[A-Za-z]{3} ([A-Za-z]{3}) ([ \d]\d) (\d{2}):(\d{2}):(\d{2}) (\d{4})\Z"
)


def parse_http_date(value: str) -> float | None:
    """
    A date in any of the three forms RFC 9110 requires a recipient to
    accept (IMF-fixdate, RFC 850, asctime), or None when it is none of
    them: a conditional header with a date that does not parse is
    ignored, as S3 does.
    """
    value = value.strip()
    if m := _IMF.match(value):
        day, month, year, hh, mm, ss = m.groups()
    elif m := _RFC850.match(value):
        day, month, yy, hh, mm, ss = m.groups()
        # RFC 9110: a two-digit year more than 50 years ahead is in the past.
        year = str(2000 + int(yy) if int(yy) < 70 else 1900 + int(yy))
    elif m := _ASCTIME.match(value):
        month, day, hh, mm, ss, year = m.groups()
    else:
        return None
    try:
        mon = _MONTHS.index(month.capitalize()) + 1
    except ValueError:
        return None
    fields = (int(year), mon, int(day), int(hh), int(mm), int(ss))
    if not (1 <= fields[2] <= 31 and fields[3] < 24 and fields[4] < 60 and fields[5] < 61):
        return None
    return float(calendar.timegm(fields + (0, 0, 0)))


def format_iso8601(seconds: float) -> str:
    """
    The timestamps of S3's XML (C{2026-12-07T16:49:07.000Z}), milliseconds
    included.
    """
    whole = int(seconds // 1)
    millis = int(round((seconds - whole) * 1000))
    if millis == 1000:
        whole, millis = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


_AMZ_DATE = re.compile(r"(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z\Z")


def parse_amz_date(value: str) -> float:
    """
    The SigV4 timestamp (C{X-Amz-Date}, C{20130524T000000Z}).

    @raise ValueError: not of that form, or not a real time.
    """
    m = _AMZ_DATE.match(value)
    if not m:
        raise ValueError(f"not an ISO 8601 basic timestamp: {value!r}")
    year, mon, day, hh, mm, ss = (int(g) for g in m.groups())
    if not (1 <= mon <= 12 and 1 <= day <= 31 and hh < 24 and mm < 60 and ss < 61):
        raise ValueError(f"not a real time: {value!r}")
    return float(calendar.timegm((year, mon, day, hh, mm, ss, 0, 0, 0)))


def format_amz_date(seconds: float) -> str:
    """
    C{seconds} as a SigV4 timestamp (C{20130524T000000Z}).
    """
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(seconds))
