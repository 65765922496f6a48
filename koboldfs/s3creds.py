"""
The S3 credentials a server checks signatures with: looked up in the
metadata, opened with the cluster secrets, and kept for a few seconds so
that a burst of requests costs one query (docs/security.md, "S3
credentials").

A revocation reaches the cache as the store's C{s3_credential_revoked}
event: at once for a revoke through this process's store, and through
LISTEN/NOTIFY for one through any other on PostgreSQL.  Only a revoke on
SQLite by another process (the C{koboldfs admin} command) is not heard:
it takes effect when the entry expires, after at most L{TTL} seconds.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from koboldfs.auth import S3_ACCESS_KEY, open_s3_secret
from koboldfs.interfaces import IMetadataStore, IS3Credentials, S3Credential
from koboldfs.metadata.events import S3_CREDENTIAL_REVOKED

log = Logger()

#: Seconds a looked-up credential (or its absence) is kept.
TTL = 5.0
#: Entries kept at most: unknown keys sent by anyone are cached too.
MAX_ENTRIES = 10_000
#: How stale a credential's C{last_used} may get, in seconds: it is
#: recorded at most this often, so that use costs no write per request.
USED_EVERY = 60.0


@implementer(IS3Credentials)
class S3Credentials:
    """
    L{IS3Credentials} over a metadata store, cached for C{ttl} seconds.
    """

    def __init__(
        self,
        store: IMetadataStore,
        cluster_secrets: tuple[bytes, ...],
        clock: Any,
        ttl: float = TTL,
    ) -> None:
        """
        @param cluster_secrets: the server's C{--secret-file}; with none,
            no credential opens and every lookup finds nothing.
        """
        self._store = store
        self._secrets = cluster_secrets
        self._clock = clock
        self.ttl = ttl
        self._cache: dict[str, tuple[float, S3Credential | None]] = {}
        #: The callers waiting for each lookup under way: one query each.
        self._asking: dict[str, list[defer.Deferred[S3Credential | None]]] = {}
        store.subscribe(self._heard)

    def _heard(self, event: str, payload: dict[str, Any]) -> None:
        if event == S3_CREDENTIAL_REVOKED:
            access_key = payload.get("access_key")
            self._cache.pop(access_key, None)  # type: ignore[arg-type]
            # An answer on its way may predate the revoke: not to be kept.
            self._asking.pop(access_key, None)  # type: ignore[arg-type]

    def lookup(self, access_key: str) -> defer.Deferred[S3Credential | None]:
        if not isinstance(access_key, str) or not S3_ACCESS_KEY.match(access_key):
            return defer.succeed(None)
        cached = self._cache.get(access_key)
        if cached is not None and cached[0] > self._clock.seconds():
            return defer.succeed(cached[1])
        d: defer.Deferred[S3Credential | None] = defer.Deferred()
        waiters = self._asking.get(access_key)
        if waiters is not None:
            waiters.append(d)
            return d
        waiters = self._asking[access_key] = [d]
        defer.ensureDeferred(self._fetch(access_key, waiters))
        return d

    async def _fetch(
        self, access_key: str, waiters: list[defer.Deferred[S3Credential | None]]
    ) -> None:
        """
        Look C{access_key} up for C{waiters}, and keep the answer unless a
        revoke was heard meanwhile.
        """
        try:
            found = await self._open(access_key)
        except Exception:
            failure = Failure()
            if self._asking.get(access_key) is waiters:
                del self._asking[access_key]
            for d in waiters:
                d.errback(failure)
            return
        if self._asking.get(access_key) is waiters:
            del self._asking[access_key]
            if len(self._cache) >= MAX_ENTRIES:
                self._cache.clear()
            self._cache[access_key] = (self._clock.seconds() + self.ttl, found)
        for d in waiters:
            d.callback(found)

    async def _open(self, access_key: str) -> S3Credential | None:
        """
        The credential as stored, opened; its use recorded if that is due.
        """
        info = await self._store.s3_credential(access_key)
        if info is None:
            return None
        secret = open_s3_secret(self._secrets, access_key, info.sealed)
        if secret is None:
            log.warn(
                "S3 credential {access_key} was sealed with a cluster secret this "
                "server does not hold: refused",
                access_key=access_key,
            )
            return None
        now = self._clock.seconds()
        if info.last_used is None or now - info.last_used >= USED_EVERY:
            self._store.touch_s3_credential(access_key, now).addErrback(
                lambda f: log.warn(
                    "recording the use of {access_key} failed: {error}",
                    access_key=access_key,
                    error=f.value,
                )
            )
        return S3Credential(access_key, secret, info.grants)
