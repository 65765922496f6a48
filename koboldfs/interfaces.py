"""
The interfaces between KoboldFS's parts, and the plain records they pass.

Records are frozen dataclasses: no live database object ever leaves the
metadata store, so callers on the reactor thread never touch a connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from zope.interface import Attribute, Interface

#: Server states.  A server in ``alive`` takes reads and new files;
#: ``readonly`` serves but takes none; ``drain`` has its files copied
#: elsewhere; ``dead`` is forgotten.  ``down`` is not stored: it is what an
#: ``alive`` server whose heartbeat is too old is taken to be.
SERVER_STATES = ("alive", "readonly", "drain", "dead")


@dataclass(frozen=True)
class ServerInfo:
    """
    One server of the cluster, as registered in the metadata.

    @ivar address: C{host:port} of its binary protocol, for peers.
    @ivar public_url: base URL under which its files are served over HTTP.
    @ivar heartbeat: when it last reported, in seconds since the epoch.
    """

    name: str
    host: str
    address: str
    public_url: str
    state: str = "alive"
    heartbeat: float = 0.0
    disk_free: int = 0
    disk_total: int = 0

    def is_up(self, now: float, timeout: float) -> bool:
        """
        Whether this server can be asked for files: not dead, and heard from
        within C{timeout} seconds.
        """
        return self.state != "dead" and now - self.heartbeat <= timeout


@dataclass(frozen=True)
class NamespaceInfo:
    """
    A namespace and its settings; None settings mean the cluster default.
    """

    id: int
    name: str
    created: float
    replicas: int | None = None
    min_copies: int | None = None
    url_template: str | None = None


@dataclass(frozen=True)
class FileInfo:
    """
    One stored version of a key.

    @ivar id: the metadata's sequence number: increasing, never reused.
    @ivar fid: the name the bytes are stored under on every server.
    @ivar path: where the bytes live, relative to each server's data dir.
    @ivar replicas: names of the servers that hold a verified copy.
    """

    id: int
    fid: str
    namespace: str
    key: str
    size: int
    sha256: str
    created: float
    path: str
    replicas: tuple[str, ...] = ()


class IMetadataStore(Interface):
    """
    The cluster's shared metadata: namespaces, files, replicas and servers.

    Every method returns a Deferred.  Changes that touch several rows happen
    in one database transaction.  A store that cannot reach its database
    fails the Deferred with L{koboldfs.errors.Unavailable}, which clients
    retry.
    """

    url = Attribute("The database URL, with any password removed.")

    def start():
        """
        Connect, and create or upgrade the schema.  Safe when several
        servers start at once against the same database.
        """

    def stop():
        """
        Release connections and threads.
        """

    def register_server(server):
        """
        Insert or update this server's row (a L{ServerInfo}); its stored
        state is kept if the row exists, unless it was ``dead``.
        """

    def heartbeat(name, now, disk_free, disk_total):
        """
        Record that server C{name} is alive at C{now} with this much disk.
        """

    def set_server_state(name, state):
        """
        Set a server's state (one of L{SERVER_STATES}); fire with False if
        there is no such server.
        """

    def servers():
        """
        Fire with every registered server, a list of L{ServerInfo}.
        """

    def namespace(name, create=False):
        """
        Fire with the L{NamespaceInfo} of C{name}, creating it first if
        C{create}; None if it does not exist and was not created.
        """

    def add_file(namespace, key, fid, path, size, sha256, created, server):
        """
        Publish a new version of C{key}, held by C{server}, creating the
        namespace on first use.  The previous version, if any, is marked
        deleted in the same transaction, for the replicator to reclaim.
        Fire with the new L{FileInfo}.
        """

    def lookup(namespace, key):
        """
        Fire with the live L{FileInfo} of C{key}, or None.
        """

    def delete(namespace, key, now):
        """
        Mark the live version of C{key} deleted; fire with whether there
        was one.
        """

    def list_keys(namespace, prefix, after, limit):
        """
        Fire with up to C{limit} live keys that start with C{prefix} and sort
        after C{after} (None: from the start), in code-point order.
        """

    def add_replica(file_id, server, now):
        """
        Record that C{server} holds a verified copy of file C{file_id}.
        """

    def remove_replica(file_id, server):
        """
        Forget C{server}'s copy of file C{file_id}.
        """

    def subscribe(listener):
        """
        Call C{listener(event, payload)} on metadata changes: C{event} is
        ``file_added``, ``file_deleted`` or ``server_changed``.  Fires for
        changes made by any process where the database can notify
        (PostgreSQL), otherwise for this process's own changes.  Return a
        no-argument callable that unsubscribes.
        """


Listener = Callable[[str, dict], None]
