"""
Every method of a metadata store (L{IMetadataStore}, L{ITransactionStore}),
written once over the store's run seam.

Each method runs one unit with its arguments through L{MetadataStore._run},
naming the event, if any, that its result is announced with: so both
stores announce the same changes in the same words.  A store on a database
is a subclass that says only how a unit is run (L{MetadataStore._transact}:
in a thread pool, or on txpostgres), how it starts and stops, and how other
processes hear of its changes (PostgreSQL: a NOTIFY in the same database
transaction).  A new table's operations are a module of units and their
methods here, once.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, TypeVar

from twisted.internet.defer import Deferred, fail

from koboldfs.auth import KeyInfo, new_key, new_s3_credential, seal_s3_secret
from koboldfs.errors import ErrorCode, Unavailable
from koboldfs.interfaces import (
    NO_EXTRAS,
    Extras,
    FileInfo,
    Listener,
    NamespaceInfo,
    PartInfo,
    S3CredentialInfo,
    S3Grant,
    ServerInfo,
    UploadInfo,
)
from koboldfs.metadata import (
    buckets,
    files,
    health,
    keys,
    multipart,
    namespaces,
    s3creds,
    servers,
    sweeps,
    txnstore,
)
from koboldfs.metadata.events import (
    FILE_ADDED,
    FILE_DELETED,
    S3_CREDENTIAL_REVOKED,
    SERVER_CHANGED,
    StoreListeners,
)
from koboldfs.metadata.health import Health
from koboldfs.metadata.txnstore import Commit, Vote
from koboldfs.metadata.units import Unit, Work
from koboldfs.names import check_namespace

T = TypeVar("T")

#: An event for listeners: its name and payload.
Event = tuple[str, dict[str, Any]]
#: What tells the event, if any, that a unit's result is to be announced
#: with.
Notice = Callable[[Any], "Event | None"]


def _silent(result: object) -> None:
    """
    The notice of a unit whose result changes nothing others listen for.
    """
    return None


def _discarded(infos: list[FileInfo]) -> Event | None:
    """
    The notice of pending files discarded by a client transaction: the
    lowest deleted, which moves replicators' cursors back to it.
    """
    if not infos:
        return None
    first = min(infos, key=lambda info: info.id)
    return FILE_DELETED, {"id": first.id, "namespace": first.namespace, "key": first.key}


def _parts_discarded(file_ids: list[int]) -> Event | None:
    """
    The notice of parts discarded (an upload aborted or expired): the
    lowest, for the replicators to reclaim them now.
    """
    return (FILE_DELETED, {"id": min(file_ids)}) if file_ids else None


class MetadataStore:
    """
    The operations of a metadata store, for a subclass that provides the
    run seam L{_transact}, C{start}, C{stop} and C{url}.  Its listeners
    hear of changes once committed; each change is one event.

    @ivar _running: whether calls may reach the database: set by the
        subclass from C{start} to C{stop}.
    """

    def __init__(self, reactor: Any) -> None:
        """
        @param reactor: provides C{IReactorTime}, for the times the store
            records itself (namespaces and keys created).
        """
        self._reactor = reactor
        self._listeners = StoreListeners()
        self._running = False

    def _transact(self, work: Work[T], notice: Notice) -> Deferred[tuple[T, Event | None]]:
        """
        The run seam: run C{work} in one database transaction as
        L{koboldfs.metadata.units} says (again from a fresh generator when it
        loses a race on a unique index), and fire with its result and the
        event C{notice} makes of it.  A store whose database can tell
        other processes tells them of the event in the same database
        transaction; this process's listeners are told by L{_run}.

        @raise Unavailable: the database is locked, down or unreachable.
        """
        raise NotImplementedError(f"{type(self).__name__} runs no units")

    def _run(
        self, unit: Callable[..., Unit[T]], *args: Any, notice: Notice = _silent
    ) -> Deferred[T]:
        """
        Run C{unit(*args)} through L{_transact}: the one way every
        operation reaches the database.  Once it committed, tell this
        process's listeners the event C{notice} makes of its result.
        """
        if not self._running:
            return fail(
                Unavailable(
                    ErrorCode.UNAVAILABLE,
                    "metadata database unavailable: the store is not started",
                )
            )

        def told(ended: tuple[T, Event | None]) -> T:
            result, event = ended
            if event is not None:
                self._listeners.notify(*event)
            return result

        return self._transact(Work(unit, args), notice).addCallback(told)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        return self._listeners.subscribe(listener)

    # -- servers

    def register_server(self, server: ServerInfo) -> Deferred[ServerInfo]:
        """
        Fire with the server as stored (its state may be the stored one).
        """
        return self._run(
            servers.register_server,
            server,
            notice=lambda stored: (SERVER_CHANGED, {"name": stored.name}),
        )

    def heartbeat(self, name: str, now: float, disk_free: int, disk_total: int) -> Deferred[bool]:
        """
        Fire with whether server C{name} is registered.
        """
        return self._run(servers.heartbeat, name, now, disk_free, disk_total)

    def set_server_state(self, name: str, state: str) -> Deferred[bool]:
        return self._run(
            servers.set_server_state,
            name,
            state,
            notice=lambda found: (SERVER_CHANGED, {"name": name}) if found else None,
        )

    def servers(self) -> Deferred[list[ServerInfo]]:
        return self._run(servers.list_servers)

    # -- namespaces

    def namespaces(self) -> Deferred[list[NamespaceInfo]]:
        return self._run(namespaces.list_namespaces)

    def namespace(self, name: str, create: bool = False) -> Deferred[NamespaceInfo | None]:
        if create:
            return self._run(namespaces.ensure_namespace, name, self._reactor.seconds())
        return self._run(namespaces.get_namespace, name)

    def set_namespace(self, name: str, **settings: Any) -> Deferred[NamespaceInfo]:
        return self._run(namespaces.set_namespace, name, self._reactor.seconds(), settings)

    def delete_namespace(self, name: str) -> Deferred[str]:
        return self._run(buckets.delete_namespace, name, self._reactor.seconds())

    # -- files and their replicas

    def add_file(
        self,
        namespace: str,
        key: str,
        fid: str,
        path: str,
        size: int,
        sha256: str,
        created: float,
        server: str,
        also: Iterable[str] = (),
        extras: Extras = NO_EXTRAS,
    ) -> Deferred[FileInfo]:
        return self._run(
            files.add_file,
            namespace,
            key,
            fid,
            path,
            size,
            sha256,
            created,
            server,
            # A tuple: a retried unit reads its arguments again.
            tuple(also),
            extras,
            notice=lambda info: (FILE_ADDED, {"id": info.id, "namespace": namespace, "key": key}),
        )

    def known_fids(self, fids: Iterable[str]) -> Deferred[set[str]]:
        return self._run(files.known_fids, tuple(fids))

    def lookup(self, namespace: str, key: str) -> Deferred[FileInfo | None]:
        return self._run(files.lookup, namespace, key)

    def lookup_fid(self, fid: str) -> Deferred[tuple[FileInfo, NamespaceInfo] | None]:
        return self._run(files.lookup_fid, fid)

    def stored_file(self, fid: str) -> Deferred[FileInfo | None]:
        return self._run(files.stored_file, fid)

    def delete(self, namespace: str, key: str, now: float) -> Deferred[bool]:
        d = self._run(
            files.delete,
            namespace,
            key,
            now,
            notice=lambda file_id: (
                None
                if file_id is None
                else (FILE_DELETED, {"id": file_id, "namespace": namespace, "key": key})
            ),
        )
        return d.addCallback(lambda file_id: file_id is not None)

    def list_keys(
        self, namespace: str, prefix: str, after: str | None, limit: int
    ) -> Deferred[list[str]]:
        return self._run(files.list_keys, namespace, prefix, after, limit)

    def list_files(
        self, namespace: str, prefix: str, after: str | None, limit: int
    ) -> Deferred[list[FileInfo]]:
        return self._run(files.list_files, namespace, prefix, after, limit)

    def add_replica(self, file_id: int, server: str, now: float) -> Deferred[bool]:
        """
        Fire with False if there is no file C{file_id}.
        """
        return self._run(files.add_replica, file_id, server, now)

    def remove_replica(self, file_id: int, server: str) -> Deferred[bool]:
        """
        Fire with whether C{server} had a copy.
        """
        return self._run(files.remove_replica, file_id, server)

    def quarantine_replica(self, file_id: int, server: str) -> Deferred[bool]:
        """
        Announced as the file added again, so that every server's
        replicator looks back at it and the copy is made again at once.
        """
        return self._run(
            files.quarantine_replica,
            file_id,
            server,
            notice=lambda done: (FILE_ADDED, {"id": file_id}) if done else None,
        )

    def quarantine_server(self, server: str) -> Deferred[int]:
        return self._run(files.quarantine_server, server)

    def purge_file(self, file_id: int) -> Deferred[bool]:
        return self._run(files.purge_file, file_id)

    # -- the sweeps' work lists

    def missing_replicas(
        self, server: str, after: int, limit: int, upto: int | None = None
    ) -> Deferred[list[FileInfo]]:
        return self._run(sweeps.missing_replicas, server, after, limit, upto)

    def queued_files(self, server: str, after: int, limit: int) -> Deferred[list[FileInfo]]:
        return self._run(sweeps.queued_files, server, after, limit)

    def settle(self, file_id: int) -> Deferred[None]:
        return self._run(files.settle, file_id)

    def max_file_id(self) -> Deferred[int]:
        return self._run(sweeps.max_file_id)

    def max_held(self, server: str) -> Deferred[int]:
        return self._run(sweeps.max_held, server)

    def held_files(self, server: str, after: int, limit: int) -> Deferred[list[FileInfo]]:
        return self._run(sweeps.held_files, server, after, limit)

    def deleted_files(self, server: str, after: int, limit: int) -> Deferred[list[FileInfo]]:
        return self._run(sweeps.deleted_files, server, after, limit)

    # -- operators' counts

    def health(self) -> Deferred[Health]:
        return self._run(health.health)

    def files_held(self) -> Deferred[dict[str, int]]:
        return self._run(health.files_held)

    def live_files(self, namespace: str | None, after: int, limit: int) -> Deferred[list[FileInfo]]:
        return self._run(health.live_files, namespace, after, limit)

    # -- client keys

    def create_key(self, namespace: str, readonly: bool = False) -> Deferred[str]:
        """
        Make a new key of C{namespace} (created if missing) and fire with
        it: the only time it is seen, since only a hash of it is stored.
        """
        made = new_key()
        d = self._run(
            keys.add_key,
            check_namespace(namespace),
            made.key_id,
            made.stored_key,
            bool(readonly),
            self._reactor.seconds(),
        )
        return d.addCallback(lambda _: made.key)

    def find_key(self, namespace: str, key_id: str) -> Deferred[KeyInfo | None]:
        return self._run(keys.find_key, namespace, key_id)

    def keys(self, namespace: str) -> Deferred[list[KeyInfo]]:
        return self._run(keys.namespace_keys, namespace)

    def revoke_key(self, namespace: str, key_id: str) -> Deferred[bool]:
        return self._run(keys.revoke_key, namespace, key_id)

    # -- S3 credentials

    def create_s3_credential(
        self, grants: Iterable[S3Grant], cluster_secret: bytes
    ) -> Deferred[tuple[str, str]]:
        """
        @raise ValueError: no grant, or a grant of a bad namespace name.
        """
        grants = tuple(grants)
        try:
            if not grants:
                raise ValueError("an S3 credential needs a grant: a namespace or the cluster")
            for grant in grants:
                if grant.namespace is not None:
                    check_namespace(grant.namespace)
        except ValueError as e:
            return fail(e)
        access_key, secret = new_s3_credential()
        sealed = seal_s3_secret(cluster_secret, access_key, secret)
        d = self._run(
            s3creds.add_s3_credential, access_key, sealed, grants, self._reactor.seconds()
        )
        return d.addCallback(lambda _: (access_key, secret))

    def s3_credential(self, access_key: str) -> Deferred[S3CredentialInfo | None]:
        return self._run(s3creds.find_s3_credential, access_key)

    def s3_credentials(self) -> Deferred[list[S3CredentialInfo]]:
        return self._run(s3creds.list_s3_credentials)

    def touch_s3_credential(self, access_key: str, now: float) -> Deferred[None]:
        return self._run(s3creds.touch_s3_credential, access_key, now)

    def revoke_s3_credential(self, access_key: str) -> Deferred[bool]:
        return self._run(
            s3creds.revoke_s3_credential,
            access_key,
            notice=lambda found: (
                (S3_CREDENTIAL_REVOKED, {"access_key": access_key}) if found else None
            ),
        )

    # -- multipart uploads (their parts' files are announced at completion
    # or abort, as deleted, for the replicators to reclaim)

    def create_upload(
        self, upload_id: str, namespace: str, key: str, attributes: Mapping[str, str] | None
    ) -> Deferred[UploadInfo]:
        return self._run(
            multipart.create_upload,
            upload_id,
            namespace,
            key,
            attributes,
            self._reactor.seconds(),
        )

    def find_upload(self, upload_id: str) -> Deferred[UploadInfo | None]:
        return self._run(multipart.find_upload, upload_id)

    def uploads(
        self, namespace: str, prefix: str, after: tuple[str, str] | None, limit: int
    ) -> Deferred[list[UploadInfo]]:
        return self._run(multipart.list_uploads, namespace, prefix, after, limit)

    def upload_parts(self, upload_id: str, after: int, limit: int) -> Deferred[list[PartInfo]]:
        return self._run(multipart.upload_parts, upload_id, after, limit)

    def find_part(self, upload_id: str, number: int) -> Deferred[PartInfo | None]:
        return self._run(multipart.find_part, upload_id, number)

    def add_part(
        self,
        upload_id: str,
        number: int,
        fid: str,
        path: str,
        size: int,
        sha256: str,
        md5: str,
        now: float,
        server: str,
        also: Iterable[str] = (),
    ) -> Deferred[PartInfo]:
        return self._run(
            multipart.add_part,
            upload_id,
            number,
            fid,
            path,
            size,
            sha256,
            md5,
            now,
            server,
            tuple(also),
        )

    def complete_upload(
        self,
        upload_id: str,
        chosen: Iterable[tuple[int, int]],
        fid: str,
        path: str,
        size: int,
        sha256: str,
        now: float,
        server: str,
        also: Iterable[str] = (),
        extras: Extras = NO_EXTRAS,
    ) -> Deferred[FileInfo]:
        """
        Announced as the object added (its parts, deleted meanwhile, have
        lower ids: the replicators' cursors move back over them too).
        """
        return self._run(
            multipart.complete_upload,
            upload_id,
            tuple(chosen),
            fid,
            path,
            size,
            sha256,
            now,
            server,
            tuple(also),
            extras,
            notice=lambda info: (
                FILE_ADDED,
                {"id": info.id, "namespace": info.namespace, "key": info.key},
            ),
        )

    def abort_upload(self, upload_id: str, now: float) -> Deferred[int]:
        """
        Fire with how many parts were discarded.
        """
        d = self._run(multipart.abort_upload, upload_id, now, notice=_parts_discarded)
        return d.addCallback(len)

    def expire_uploads(self, before: float, now: float, limit: int) -> Deferred[list[str]]:
        """
        Fire with the ids of the uploads aborted.
        """
        d = self._run(
            multipart.expire_uploads,
            before,
            now,
            limit,
            notice=lambda ended: _parts_discarded(ended[1]),
        )
        return d.addCallback(lambda ended: ended[0])

    # -- client transactions (ITransactionStore)

    def begin_txn(self, txn_id: str, namespace: str, now: float, expires: float) -> Deferred[float]:
        return self._run(txnstore.begin_txn, txn_id, namespace, now, expires)

    def txn_put(
        self,
        txn_id: str,
        namespace: str,
        key: str,
        fid: str,
        path: str,
        size: int,
        sha256: str,
        now: float,
        server: str,
        expires: float,
    ) -> Deferred[tuple[FileInfo, list[FileInfo]]]:
        return self._run(
            txnstore.txn_put,
            txn_id,
            namespace,
            key,
            fid,
            path,
            size,
            sha256,
            now,
            server,
            expires,
            notice=lambda result: _discarded(result[1]),
        )

    def txn_delete(
        self, txn_id: str, namespace: str, key: str, now: float, expires: float
    ) -> Deferred[tuple[bool, list[FileInfo]]]:
        return self._run(
            txnstore.txn_delete,
            txn_id,
            namespace,
            key,
            now,
            expires,
            notice=lambda result: _discarded(result[1]),
        )

    def txn_lookup(self, txn_id: str, namespace: str, key: str) -> Deferred[FileInfo | None]:
        return self._run(txnstore.txn_lookup, txn_id, namespace, key)

    def txn_pending(
        self, txn_id: str, now: float
    ) -> Deferred[tuple[str, list[tuple[FileInfo, str | None]]]]:
        return self._run(txnstore.txn_pending, txn_id, now)

    def txn_vote(
        self, txn_id: str, server: str, file_ids: list[int], now: float, expires: float
    ) -> Deferred[Vote]:
        return self._run(txnstore.txn_vote, txn_id, server, file_ids, now, expires)

    def txn_commit(self, txn_id: str, now: float, keep: float, prepared: bool) -> Deferred[Commit]:
        """
        Announced as the lowest id published (or else retired), which
        moves replicators' cursors back to it.
        """

        def notice(commit: Commit) -> Event | None:
            if commit.published:
                return FILE_ADDED, {"id": min(commit.published), "txn": txn_id}
            if commit.retired:
                return FILE_DELETED, {"id": min(commit.retired), "txn": txn_id}
            return None

        return self._run(txnstore.txn_commit, txn_id, now, keep, prepared, notice=notice)

    def txn_abort(self, txn_id: str, now: float) -> Deferred[list[FileInfo]]:
        return self._run(txnstore.txn_abort, txn_id, now, notice=_discarded)

    def expire_txns(self, now: float, limit: int) -> Deferred[list[FileInfo]]:
        return self._run(txnstore.expire_txns, now, limit, notice=_discarded)
