"""
What a metadata store tells its listeners (L{IMetadataStore.subscribe}):
the event names, and L{StoreListeners}, which every store uses for its own
changes.
"""

from __future__ import annotations

from typing import Any, Callable

from koboldfs.events import Listeners
from koboldfs.interfaces import Listener

#: The events passed to L{IMetadataStore.subscribe} listeners.
FILE_ADDED = "file_added"
FILE_DELETED = "file_deleted"
SERVER_CHANGED = "server_changed"
#: Payload C{{"access_key": ...}}: caches of S3 credentials drop it.
S3_CREDENTIAL_REVOKED = "s3_credential_revoked"


class StoreListeners:
    """
    The listeners subscribed to a store, called on the reactor thread with
    C{(event, payload)}: L{koboldfs.events.Listeners} (one that raises is
    logged, the others are still told, the change is not failed), with each
    listener given its own copy of the payload, so that one changing it
    cannot mislead the next.
    """

    def __init__(self) -> None:
        self._listeners: Listeners[tuple[str, dict[str, Any]]] = Listeners()

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """
        Call C{listener(event, payload)} from now on; return a callable that
        stops it (calling it again does nothing).
        """
        return self._listeners.add(lambda notice: listener(notice[0], dict(notice[1])))

    def notify(self, event: str, payload: dict[str, Any]) -> None:
        """
        Tell every listener about C{event}.
        """
        self._listeners((event, payload))
