"""
The URLs that C{get_url} hands out, and the signatures of private ones.

Pure functions, no I/O: the server builds URLs with them and checks the
signed ones it is asked for; tests and tools can do both without a server.

A file's URL is its namespace's template (or L{DEFAULT_TEMPLATE}) filled
with the fields of L{TEMPLATE_FIELDS}.  A private namespace's URLs carry
three query arguments (docs/http.md)::

    e  the expiry, in seconds since the epoch
    s  HMAC-SHA256(secret, e + uri), base64url: what KoboldFS checks
    m  MD5(e + uri + " " + nginx_key(secret)), base64url: what stock
       nginx's secure_link module checks

where C{uri} is C{"/" + path}, the stored path, whatever the template: the
same signature is valid on every server holding the file, and the URI is
what an nginx whose root is the data directory sees.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import string
from urllib.parse import quote

#: The fields a namespace's URL template may use: the serving server's
#: C{--public-url} (no trailing slash) and name, the namespace, the stored
#: path (C{files/ab/cd/<fid><ext>}), the key (url-quoted, C{/} kept) and
#: the file's internal id.
TEMPLATE_FIELDS = frozenset({"public_url", "server", "namespace", "path", "key", "fid"})

#: The URL of a file when its namespace has no template: on the server.
DEFAULT_TEMPLATE = "{public_url}/{path}"

#: Seconds a private namespace's URL stays valid when C{get_url} is given
#: no expiry.
DEFAULT_EXPIRES = 3600

#: Longest validity C{get_url} signs for: ten years.
MAX_EXPIRES = 10 * 365 * 86400

_EXPIRY = re.compile(r"[0-9]{1,12}")


def check_template(template: str) -> str:
    """
    Return C{template} if it is a URL template C{get_url} can fill.

    @raise ValueError: it uses a field not in L{TEMPLATE_FIELDS}, a format
        spec or conversion, or none of C{path}, C{fid} and C{key} (every
        file would get the same URL).
    """
    if not isinstance(template, str) or not template:
        raise ValueError("a URL template is a non-empty string")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"bad URL template {template!r}: {e}") from None
    used = set()
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in TEMPLATE_FIELDS or spec or conversion:
            raise ValueError(
                f"bad URL template {template!r}: {{{name}}} is not one of "
                + ", ".join(f"{{{f}}}" for f in sorted(TEMPLATE_FIELDS))
            )
        used.add(name)
    if not used & {"path", "fid", "key"}:
        raise ValueError(f"bad URL template {template!r}: use {{path}}, {{fid}} or {{key}}")
    return template


def fill_template(
    template: str | None,
    *,
    public_url: str,
    server: str,
    namespace: str,
    path: str,
    key: str,
    fid: str,
) -> str:
    """
    The URL of one file on one server: C{template} (None: the default)
    filled in.
    """
    return (template or DEFAULT_TEMPLATE).format(
        public_url=public_url.rstrip("/"),
        server=server,
        namespace=namespace,
        path=path,
        key=quote(key, safe="/"),
        fid=fid,
    )


def _b64(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def new_secret() -> str:
    """
    A fresh namespace secret: 256 random bits.
    """
    return secrets.token_urlsafe(32)


def signature(secret: str, uri: str, expires: int) -> str:
    """
    The HMAC-SHA256 signature (C{s}) of C{uri} until C{expires}.
    """
    mac = hmac.new(secret.encode("utf-8"), f"{expires}{uri}".encode(), hashlib.sha256)
    return _b64(mac.digest())


def nginx_key(secret: str) -> str:
    """
    The key nginx's C{secure_link_md5} is given for a namespace: derived
    from its secret, so nginx's configuration never holds the secret that
    the HMAC signatures are made with.
    """
    return hmac.new(
        secret.encode("utf-8"), b"koboldfs nginx secure_link", hashlib.sha256
    ).hexdigest()


def nginx_token(secret: str, uri: str, expires: int) -> str:
    """
    The token (C{m}) that nginx checks with
    C{secure_link_md5 "$secure_link_expires$uri <nginx_key>"}.
    """
    data = f"{expires}{uri} {nginx_key(secret)}".encode()
    return _b64(hashlib.md5(data).digest())


def signed_url(url: str, secret: str, path: str, expires: int) -> str:
    """
    C{url}, for the file stored at C{path}, with the query arguments that
    make it valid until C{expires} (seconds since the epoch).
    """
    uri = "/" + path
    query = f"e={expires}&s={signature(secret, uri, expires)}&m={nginx_token(secret, uri, expires)}"
    return f"{url}{'&' if '?' in url else '?'}{query}"


def check_signature(secret: str, path: str, e: str | None, s: str | None, now: float) -> bool:
    """
    Whether C{e} and C{s}, a request's query arguments, make a valid
    signature of the file stored at C{path} that has not expired at C{now}.
    """
    if e is None or s is None or not _EXPIRY.fullmatch(e) or int(e) < now:
        return False
    expected = signature(secret, "/" + path, int(e))
    return hmac.compare_digest(expected.encode("ascii"), s.encode("ascii", "replace"))
