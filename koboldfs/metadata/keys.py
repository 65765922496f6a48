"""
The client-key methods of a metadata store (docs/security.md), shared by
the SQLite and PostgreSQL stores: the statements are in
L{koboldfs.metadata.queries}, the stores only run them.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred

from koboldfs.auth import KeyInfo, new_key
from koboldfs.metadata import queries
from koboldfs.names import check_namespace


class ClientKeysMixin:
    """
    For a store with C{_run(unit, *args)} and C{_reactor}.
    """

    _run: Callable[..., Deferred[Any]]
    _reactor: Any

    def create_key(self, namespace: str, readonly: bool = False) -> Deferred[str]:
        """
        Make a new key of C{namespace} (created if missing) and fire with
        it: the only time it is seen, since only a hash of it is stored.
        """
        made = new_key()
        d = self._run(
            queries.add_key,
            check_namespace(namespace),
            made.key_id,
            made.stored_key,
            bool(readonly),
            self._reactor.seconds(),
        )
        return d.addCallback(lambda _: made.key)

    def find_key(self, namespace: str, key_id: str) -> Deferred[KeyInfo | None]:
        return self._run(queries.find_key, namespace, key_id)

    def keys(self, namespace: str) -> Deferred[list[KeyInfo]]:
        return self._run(queries.namespace_keys, namespace)

    def revoke_key(self, namespace: str, key_id: str) -> Deferred[bool]:
        return self._run(queries.revoke_key, namespace, key_id)
