"""
The interfaces between KoboldFS's parts, and the plain records they pass.

Records are frozen dataclasses: no live database object ever leaves the
metadata store, so callers on the reactor thread never touch a connection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Callable, Mapping

from zope.interface import Attribute, Interface


class ServerState(StrEnum):
    """
    The states an operator sets a server to (C{koboldfs admin set-state}),
    stored as their values.  ``down`` is not one: it is what a server whose
    heartbeat is too old is taken to be, whatever its state.
    """

    #: Serves reads and takes new files.
    ALIVE = "alive"
    #: Serves reads, takes no new files.
    READONLY = "readonly"
    #: Its files are copied elsewhere; its copies no longer count.
    DRAIN = "drain"
    #: Forgotten: never asked, its copies forgotten.
    DEAD = "dead"


#: A disk with less room than this above its reserve is full: it takes no
#: new copies (placement passes it by) and the status page says so.
FULL_ROOM = 1024 * 1024


@dataclass(frozen=True)
class ServerInfo:
    """
    One server of the cluster, as registered in the metadata.

    @ivar address: C{host:port} of its binary protocol, for peers.
    @ivar public_url: base URL under which its files are served over HTTP.
    @ivar heartbeat: when it last reported, in seconds since the epoch.
    @ivar disk_free: bytes it still takes: its disk's free space above its
        C{--reserve}, as last reported.
    """

    name: str
    host: str
    address: str
    public_url: str
    state: str = ServerState.ALIVE
    heartbeat: float = 0.0
    disk_free: int = 0
    disk_total: int = 0

    @property
    def full(self) -> bool:
        """
        Whether its disk is full: C{disk_free} is the space it still takes
        above its C{--reserve}, and it has reported less than L{FULL_ROOM}.
        """
        return self.disk_total > 0 and self.disk_free < FULL_ROOM

    def is_up(self, now: float, timeout: float) -> bool:
        """
        Whether this server can be asked for files: not dead, and heard from
        within C{timeout} seconds.
        """
        return self.state != ServerState.DEAD and now - self.heartbeat <= timeout


@dataclass(frozen=True)
class NamespaceInfo:
    """
    A namespace and its settings; None settings mean the cluster default.

    @ivar url_template: how C{get_url} builds its files' URLs, or None for
        the serving server's C{public_url} (L{koboldfs.urls}).
    @ivar private: whether its files are served only by signed URLs.
    @ivar public_read: whether the S3 front end serves its objects to
        anonymous GET and HEAD (nothing else is ever anonymous).
    @ivar secret: the key those URLs are signed with; kept out of reprs,
        which end up in logs.
    """

    id: int
    name: str
    created: float
    replicas: int | None = None
    min_copies: int | None = None
    url_template: str | None = None
    private: bool = False
    secret: str | None = field(default=None, repr=False)
    public_read: bool = False


@dataclass(frozen=True)
class FileInfo:
    """
    One stored version of a key.

    @ivar id: the metadata's sequence number: increasing, never reused.
    @ivar fid: the name the bytes are stored under on every server.
    @ivar path: where the bytes live, relative to each server's data dir.
    @ivar replicas: names of the servers that hold a verified copy.
    @ivar md5: hex MD5 of the bytes, computed as they arrived (S3 puts);
        for a multipart object, the MD5 of its parts' binary MD5s; None
        for a file put without one (the binary protocol).
    @ivar parts: how many parts a multipart object was assembled from;
        None for any other file.
    @ivar part_size: the size of each of its parts but the last, if they
        were all of one size (as clients make them); else None.
    @ivar attributes: what a front end stored with the file (the S3
        headers: content-type, x-amz-meta-*...; see
        L{koboldfs.attributes}), or None.
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
    md5: str | None = None
    parts: int | None = None
    part_size: int | None = None
    attributes: Mapping[str, str] | None = field(default=None, hash=False)

    @property
    def etag(self) -> str:
        """
        The file's S3 entity tag, unquoted: see L{etag}.
        """
        return etag(self.sha256, self.md5, self.parts)

    def part_range(self, number: int) -> tuple[int, int] | None:
        """
        C{(first byte, length)} of part C{number} of a multipart object
        whose parts but the last were of one size (S3's GetObject
        C{partNumber}); part 1 of any other file is all of it; None for a
        part it does not have, or whose bounds were not kept.
        """
        if self.parts is None:
            return (0, self.size) if number == 1 else None
        if self.part_size is None or not 1 <= number <= self.parts:
            return None
        first = (number - 1) * self.part_size
        return first, (self.size - first if number == self.parts else self.part_size)


def etag(sha256: str, md5: str | None, parts: int | None) -> str:
    """
    The S3 entity tag of a file, unquoted: its MD5 for a single-part
    object, S3's C{<md5 of part md5s>-<parts>} for a multipart one, and
    for a file put without an MD5 its SHA-256 and C{-0}: no client takes
    that for an MD5 (it is not 32 hex digits, and it has a dash, as
    multipart tags do) nor for a real multipart tag (no object has zero
    parts).
    """
    if md5 is None:
        return f"{sha256}-0"
    if parts is not None:
        return f"{md5}-{parts}"
    return md5


@dataclass(frozen=True)
class Extras:
    """
    What a put may record with a file beyond its bytes (the S3 front end's
    MD5 and attributes; a multipart object's number of parts), and its
    condition: C{if_absent}, only if the key has no live version;
    C{if_match}, only if the live version's entity tag is this one.
    """

    md5: str | None = None
    parts: int | None = None
    part_size: int | None = None
    attributes: Mapping[str, str] | None = field(default=None, hash=False)
    if_absent: bool = False
    if_match: str | None = None


NO_EXTRAS = Extras()


@dataclass(frozen=True)
class UploadInfo:
    """
    A multipart upload under way (docs/s3-store.md): to be published as
    C{key} of C{namespace} with C{attributes}.
    """

    upload_id: str
    namespace: str
    key: str
    attributes: Mapping[str, str] | None = field(hash=False)
    created: float


@dataclass(frozen=True)
class PartInfo:
    """
    Part C{number} of a multipart upload: C{file}, a file row of its own in
    state C{part} (invisible to readers), with its size, SHA-256, MD5 and
    the servers holding it.
    """

    number: int
    file: FileInfo

    @property
    def size(self) -> int:
        return self.file.size

    @property
    def etag(self) -> str:
        """
        The part's S3 entity tag: its MD5.
        """
        return self.file.etag


@dataclass(frozen=True)
class S3Grant:
    """
    What an S3 credential may use: namespace C{namespace} (None: every
    namespace, and bucket administration: create, delete, list all),
    read-write if C{write}, else read-only.
    """

    namespace: str | None
    write: bool


@dataclass(frozen=True)
class S3CredentialInfo:
    """
    An S3 credential as the metadata stores it: its secret sealed under a
    key derived from the cluster secret (L{koboldfs.auth.seal_s3_secret}).
    """

    access_key: str
    sealed: str = field(repr=False)
    grants: tuple[S3Grant, ...]
    created: float
    last_used: float | None = None


@dataclass(frozen=True)
class S3Credential:
    """
    An S3 credential opened, for checking signatures: what
    L{IS3Credentials.lookup} gives the S3 front end.
    """

    access_key: str
    secret: str = field(repr=False)
    grants: tuple[S3Grant, ...] = ()

    def allows(self, namespace: str | None, write: bool) -> bool:
        """
        Whether a grant covers C{namespace} (None: bucket administration,
        which only a cluster-wide grant allows), for writing if C{write}.
        """
        return any(
            (grant.namespace is None or grant.namespace == namespace)
            and (grant.write or not write)
            for grant in self.grants
        )


class IS3Credentials(Interface):
    """
    The S3 credentials as a server sees them (L{koboldfs.s3creds}).
    """

    def lookup(access_key):
        """
        Fire with the L{S3Credential} of C{access_key}, or None if there is
        none (never made, revoked, or sealed with no secret this server
        holds).
        """


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
        Set a server's state (a L{ServerState}); fire with False if
        there is no such server.
        """

    def servers():
        """
        Fire with every registered server, a list of L{ServerInfo}.
        """

    def files_held():
        """
        Fire with a dict: for each server holding good copies of live files,
        how many.  A full count, for operators' listings.
        """

    def namespaces():
        """
        Fire with every namespace, a list of L{NamespaceInfo} by name.
        """

    def namespace(name, create=False):
        """
        Fire with the L{NamespaceInfo} of C{name}, creating it first if
        C{create}; None if it does not exist and was not created.
        """

    def set_namespace(name, **settings):
        """
        Change settings of namespace C{name}, creating it first if missing,
        and fire with its L{NamespaceInfo}.  Settings are the fields of
        L{NamespaceInfo} after C{created}; C{private=True} with no C{secret}
        keeps the namespace's secret, or makes one.  Fails with
        L{ValueError} for an unknown setting, a bad URL template, or a
        change of C{private} once the namespace has files (their paths on
        disk depend on it).
        """

    def delete_namespace(name):
        """
        Remove namespace C{name} if it is empty (no live, pending or part
        file, no multipart upload, no transaction under way), with its
        client keys; fire with C{"deleted"}, C{"not-empty"} or
        C{"missing"}.  Its deleted files' bytes are still reclaimed.
        """

    def add_file(
        namespace, key, fid, path, size, sha256, created, server, also=(), extras=NO_EXTRAS
    ):
        """
        Publish a new version of C{key}, held by C{server} and by the
        servers named in C{also} (copies made durable while it was put),
        creating the namespace on first use.  The previous version, if any, is marked
        deleted in the same transaction, for the replicator to reclaim.
        C{extras} (an L{Extras}) are recorded with it, and its condition
        checked in the same transaction (failing with
        L{koboldfs.errors.PreconditionFailed}).  Fire with the new
        L{FileInfo}.
        """

    def known_fids(fids):
        """
        Fire with the set of those of C{fids} that a file row (live or
        deleted) names: the others are bytes no metadata knows.
        """

    def lookup(namespace, key):
        """
        Fire with the live L{FileInfo} of C{key}, or None.
        """

    def lookup_fid(fid):
        """
        Fire with C{(file, namespace)}, the live L{FileInfo} stored as C{fid}
        and its L{NamespaceInfo}, or None: how HTTP finds a file by its URL.
        """

    def stored_file(fid):
        """
        Fire with the L{FileInfo} stored as C{fid} if it is live or a part
        of a multipart upload (what a peer relays by fid), else None.
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

    def list_files(namespace, prefix, after, limit):
        """
        As L{list_keys}, with the live L{FileInfo}s (their C{replicas}
        left empty): what an S3 listing shows.
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

    def missing_replicas(server, after, limit, upto=None):
        """
        Fire with up to C{limit} live L{FileInfo}s with ids above C{after}
        (and at most C{upto} unless None), by id, of which C{server} holds
        no good copy; their C{replicas} are the servers that do.  The
        replicator's cursor walks these, in windows of ids.
        """

    def queued_files(server, after, limit):
        """
        Fire with up to C{limit} L{FileInfo}s of the replication queue (live
        files a change left short of copies) with ids above C{after}, by
        id, of which C{server} holds no good copy; their C{replicas} are
        the servers that do.
        """

    def settle(file_id):
        """
        Take file C{file_id} off the replication queue unless it is still
        a live file short of copies; fire with None.
        """

    def max_file_id():
        """
        Fire with the highest id of a stored file, live or deleted (0 when
        there is none): how far a replicator that found nothing missing
        may move its cursor.
        """

    def max_held(server):
        """
        Fire with the highest id of a file C{server} has a good copy of
        (0 when none): where its replicator's walk resumes after a restart.
        """

    def held_files(server, after, limit):
        """
        Fire with up to C{limit} live L{FileInfo}s with ids above C{after},
        by id, of which C{server} holds a good copy; their C{replicas} are
        the servers that do.  The scrubber's cursor walks these.
        """

    def deleted_files(server, after, limit):
        """
        Fire with up to C{limit} deleted L{FileInfo}s with ids above
        C{after}, by id, that C{server} holds a copy of or that no server
        but ``dead`` ones does; their C{replicas} are the servers holding
        one.
        """

    def purge_file(file_id):
        """
        Forget deleted file C{file_id} if no server but ``dead`` ones holds
        a copy any more (their replica rows are forgotten with it); fire
        with whether it was forgotten.
        """

    def health():
        """
        Fire with the cluster's L{Health<koboldfs.metadata.health.Health>}:
        counts over every live file, for operators (not for hot paths).
        """

    def live_files(namespace, after, limit):
        """
        Fire with up to C{limit} live L{FileInfo}s with ids above C{after}
        (of namespace C{namespace} only, unless None), by id, with the
        servers holding a good copy: what C{fsck} walks.
        """

    def quarantine_replica(file_id, server):
        """
        Mark C{server}'s copy of file C{file_id} bad: no longer served nor
        counted until its server's replicator makes it again
        (L{add_replica} marks it good).  Fire with whether there was one.
        """

    def quarantine_server(server):
        """
        Mark every good copy on C{server} bad (its disk was replaced): its
        replicator makes them all again.  Fire with how many there were.
        """

    def create_key(namespace, readonly=False):
        """
        Make a new client key of C{namespace}, creating the namespace if
        missing, and fire with the key: shown this once, only a hash of it
        is stored.  A C{readonly} key may get, stat, list and get_url, but
        not put or delete.
        """

    def find_key(namespace, key_id):
        """
        Fire with the L{koboldfs.auth.KeyInfo} of key C{key_id} of
        C{namespace}, or None.
        """

    def keys(namespace):
        """
        Fire with the L{koboldfs.auth.KeyInfo}s of C{namespace}, oldest
        first.
        """

    def revoke_key(namespace, key_id):
        """
        Forget key C{key_id} of C{namespace}; fire with whether it existed.
        Connections it authenticated keep their rights until they close.
        """


    def create_s3_credential(grants, cluster_secret):
        """
        Make an S3 credential with C{grants} (L{S3Grant}s), its secret
        sealed under C{cluster_secret} (the first of the servers'
        C{--secret-file}), and fire with C{(access key id, secret)}: the
        secret is shown this once.
        """

    def s3_credential(access_key):
        """
        Fire with the L{S3CredentialInfo} of C{access_key}, or None.
        """

    def s3_credentials():
        """
        Fire with every L{S3CredentialInfo}, oldest first.
        """

    def touch_s3_credential(access_key, now):
        """
        Record that C{access_key} was used at C{now}.
        """

    def revoke_s3_credential(access_key):
        """
        Forget credential C{access_key}; fire with whether it existed.
        Announced (C{s3_credential_revoked}), so that servers caching it
        drop it at once.
        """


    def create_upload(upload_id, namespace, key, attributes):
        """
        Open multipart upload C{upload_id} of C{key} (the namespace created
        if missing), to be published with C{attributes}; fire with its
        L{UploadInfo}.
        """

    def find_upload(upload_id):
        """
        Fire with the L{UploadInfo} of C{upload_id}, or None.
        """

    def uploads(namespace, prefix, after, limit):
        """
        Fire with up to C{limit} L{UploadInfo}s of C{namespace} whose keys
        start with C{prefix}, by key then id, after C{after} (a C{(key,
        upload_id)} pair, or None).
        """

    def upload_parts(upload_id, after, limit):
        """
        Fire with up to C{limit} L{PartInfo}s of C{upload_id} numbered above
        C{after}, by number, with the servers holding each;
        L{koboldfs.errors.MultipartError} C{NoSuchUpload} if there is no
        such upload.
        """

    def find_part(upload_id, number):
        """
        Fire with part C{number} of C{upload_id} (a L{PartInfo}), or None.
        """

    def add_part(upload_id, number, fid, path, size, sha256, md5, now, server, also=()):
        """
        Record part C{number}, stored as C{fid} on C{server} and C{also},
        replacing (and discarding) a part of that number; fire with its
        L{PartInfo}.  C{NoSuchUpload} if the upload is gone.
        """

    def complete_upload(
        upload_id, chosen, fid, path, size, sha256, now, server, also=(), extras=NO_EXTRAS
    ):
        """
        Publish the object assembled from the parts C{chosen} (C{(number,
        file id)} pairs) as a new live version of the upload's key, with
        C{extras} and the upload's attributes, discard every part and close
        the upload, in one transaction; fire with the L{FileInfo}.
        C{NoSuchUpload}, or C{InvalidPart} if a chosen part was replaced.
        """

    def abort_upload(upload_id, now):
        """
        Discard the upload and its parts; fire with how many parts.
        C{NoSuchUpload} if there is none.
        """

    def expire_uploads(before, now, limit):
        """
        Abort up to C{limit} uploads begun before C{before}; fire with
        their ids.
        """


class ITransactionStore(Interface):
    """
    The metadata of client transactions (docs/transactions.md), kept by
    every store beside L{IMetadataStore}; the units that run them are
    in L{koboldfs.metadata.txnstore}.  Refusals fail with
    L{koboldfs.errors.TransactionError}.
    """

    def begin_txn(txn_id, namespace, now, expires):
        """
        Open a transaction, collected at C{expires} unless used again.
        """

    def txn_put(txn_id, namespace, key, fid, path, size, sha256, now, server, expires):
        """
        Record a pending upload; fire with it (a L{FileInfo}) and the
        pending files of the same key it replaced.
        """

    def txn_delete(txn_id, namespace, key, now, expires):
        """
        Record a delete; fire with whether the key existed for the
        transaction, and the pending files discarded.
        """

    def txn_lookup(txn_id, namespace, key):
        """
        Fire with C{key} as the transaction sees it, or None.
        """

    def txn_pending(txn_id, now):
        """
        Fire with the transaction's state and its pending files, each with
        the server that vouched for it (or None).
        """

    def txn_vote(txn_id, server, file_ids, now, expires):
        """
        Record C{server}'s vote for pending files C{file_ids}; fire with a
        L{koboldfs.metadata.txnstore.Vote}.
        """

    def txn_commit(txn_id, now, keep, prepared):
        """
        Publish the transaction at once; fire with a
        L{koboldfs.metadata.txnstore.Commit}.
        """

    def txn_abort(txn_id, now):
        """
        Discard the transaction; fire with its pending files, now deleted.
        """

    def expire_txns(now, limit):
        """
        Abort transactions past their expiry; fire with the files discarded.
        """


class IBodySink(Interface):
    """
    Where a front end wants a file's bytes sent (a connection, an HTTP
    response): what L{INode.get}'s body source writes into.
    """

    frame = Attribute(
        "None, or a function applied to each chunk before L{write} gets it, in a "
        "worker thread where the chunk is read from disk (framing it for the wire "
        "then costs the reactor nothing)."
    )
    gone = Attribute("True once the receiver is gone: nothing more is sent.")

    def begin():
        """
        The body is about to start, and will: called once, before the
        first L{write}, after every check that can fail without a byte
        sent (a front end sends its header now).
        """

    def write(data):
        """
        Send C{data}; return None, or a Deferred that fires when more may
        be written (flow control).
        """

    def abort():
        """
        The bytes turned out bad part-way (the copy failed its checksum):
        the receiver must not take what it got for a whole file.  Called
        before the error is raised; a front end that cannot say so in-band
        cuts its connection.
        """


class INode(Interface):
    """
    The server core: one server's view of the cluster and the operations
    every front end needs, with no wire in sight.  The binary protocol
    (L{koboldfs.binaryserver}), HTTP (L{koboldfs.web}) and any new front
    end translate their requests into these calls; see
    docs/architecture.md.

    Requests fail with L{koboldfs.errors.KoboldError}s whose C{code} says
    what went wrong (a front end maps it to its own error form).  C{txn},
    where taken, is a client transaction's id: the request then sees and
    changes what that transaction sees (docs/transactions.md).
    """

    name = Attribute("This server's name.")
    config = Attribute("Its L{koboldfs.config.ServerConfig}.")
    clock = Attribute("Provides IReactorTime.")
    storage = Attribute("Its L{koboldfs.storage.Storage}.")
    store = Attribute("The cluster's L{IMetadataStore} (and L{ITransactionStore}).")
    peers = Attribute("The L{koboldfs.connection.ConnectionCache} to other servers.")
    unreachable = Attribute(
        "Peers a forwarded put could not reach lately, by name: until when puts pass them by."
    )
    servers = Attribute("Every registered server by name, as last refreshed: L{ServerInfo}s.")
    open = Attribute("Whether clients may do anything without a key.")
    readonly = Attribute("Whether this server takes no new files (its state is not alive).")
    uploads = Attribute("Puts being received now.")
    multipart = Attribute("Its L{koboldfs.multipart.Multipart}.")
    s3_credentials = Attribute(
        "The L{IS3Credentials} the S3 front end checks signatures with (cached briefly, "
        "revocations heard at once: L{koboldfs.s3creds})."
    )
    replica_lost = Attribute(
        "L{koboldfs.events.Listeners} told of each L{FileInfo} whose copy here was "
        "found bad or missing and set aside."
    )

    # -- connections and the cluster

    def admit(address):
        """
        Count a new connection from C{address}: None if it is welcome, else
        why it is refused (and it is not counted).
        """

    def leave(address):
        """
        A connection L{admit} counted has closed.
        """

    def refresh_servers():
        """
        Read the registered servers again (a Deferred).
        """

    def up(name):
        """
        The L{ServerInfo} of server C{name} if it is registered and heard
        from recently, else None.
        """

    def peers_holding(info):
        """
        Live servers other than this one with a good copy of C{info}, in
        random order.
        """

    def authenticate(fields, server_nonce):
        """
        Check a proof (the fields of a binary AUTH) against the nonce this
        server gave; fire with the L{koboldfs.auth.Grant} it earns.
        """

    def revoked(grants):
        """
        Fire with the set of those L{koboldfs.auth.Grant}s whose key has
        been revoked since they were earned (docs/security.md).
        """

    def cluster_status(held=False):
        """
        Fire with the fields of the OK reply to CLUSTER_STATUS
        (docs/protocol.md): the servers and health as the metadata has
        them, this server's clock, and each server's files if C{held}.
        """

    # -- requests

    def lookup(ns, key, txn=None):
        """
        Fire with the live L{FileInfo} of C{key} (its size, checksum,
        replicas: a stat); L{koboldfs.errors.NotFound} if there is none.
        """

    def lookup_stored(fid, path):
        """
        Fire with C{(FileInfo, NamespaceInfo)} of the live file stored as
        C{fid} at C{path} exactly, or None: how a URL names a file.
        """

    def delete(ns, key, txn=None):
        """
        Delete C{key}; L{koboldfs.errors.NotFound} if there was none.
        """

    def list_keys(ns, prefix, after, limit):
        """
        Fire with up to C{limit} (at most 1000) live keys of C{ns} that
        start with C{prefix} and sort after C{after} (None: from the
        first), in code-point order.
        """

    def list_files(ns, prefix, after, limit):
        """
        As L{list_keys}, the live L{FileInfo}s (without their replicas).
        """

    def get_url(ns, key, expires=None):
        """
        Fire with the URL of a copy on a live server (signed for
        C{expires} seconds if the namespace is private).
        """

    def url_for(info, namespace, server, expires_at):
        """
        The URL of C{server}'s copy of C{info}, signed until C{expires_at}
        if its namespace is private.
        """

    def url_allowed(info, namespace, expires, signature):
        """
        Whether a request for C{info} by URL may be served: always for a
        public namespace, with a valid, unexpired signature for a private
        one (C{expires}, C{signature}: the URL's, or None).
        """

    def put(ns, key, size, producer, txn=None, failed=None, md5=False):
        """
        Begin a put of C{key} (C{size} bytes, or None if not known) and
        return its L{koboldfs.node.PutStream}: the front end writes the
        body into it and finishes it with the client's SHA-256, which
        fires with the published L{FileInfo}.  C{producer} (an
        IPushProducer: the client's connection) is paused while the disk
        or a peer taking a copy lags.  C{failed} is called with the error
        if the put fails while the body is still arriving (a peer's copy
        failed), the stream then given up.  Plain, forwarded (copies made
        at the put on other hosts) and transactional puts are one call.
        With C{md5} (not in a transaction), the MD5 of the body is computed
        as it arrives and recorded (L{FileInfo.md5}); the stream's
        C{finish} then takes the client's MD5 to check, the attributes to
        record and a condition (L{Extras}).

        @raise KoboldError: refused at once (busy, read-only, too large,
            bad name).
        """

    def replica_put(fid, path, size, producer):
        """
        Begin receiving a peer's copy of a put it is taking (REPLICA_PUT):
        stored at C{path}, not recorded; a L{koboldfs.node.CopyStream}.
        """

    def get(info, local=False, txn=None, first=0, length=None, exact=False):
        """
        Fire with the body source (L{koboldfs.node.Body}) of C{info}'s bytes
        C{first} to C{first + length} (None: to the end): our copy, verified
        as it is read, or, if we hold no good one and not C{local}, relayed
        from a live peer that does, the next tried if one fails before
        sending.  A copy found bad here is set aside and made again.
        C{exact}: relay this very file (by its fid), not the key's live
        version: a part of a multipart upload.
        """

    def open_local(info, first=0, length=None, small_whole=True):
        """
        Fire with the body source of our own copy of C{info}, or None if we
        hold no good one (a missing or bad one is set aside first).
        """

    def replica_failed(info, reason):
        """
        Our copy of C{info} is missing or bad: set it aside, stop offering
        it, and tell L{replica_lost}.
        """

    # -- S3: copies and multipart uploads (L{koboldfs.multipart})

    def copy(source, ns, key, attributes=None, if_absent=False, if_match=None):
        """
        Fire with a new version of C{key} holding the bytes of C{source} (a
        L{FileInfo}: a new file, its bytes streamed from a copy, checked
        against the source's MD5 if it has one) with C{attributes} (None:
        the source's).  S3's CopyObject, onto the same key too.
        """

    def create_upload(ns, key, attributes=None):
        """
        Open a multipart upload of C{key}; fire with its L{UploadInfo}.
        """

    def upload_part(upload, number, size, producer, failed=None):
        """
        Begin part C{number} (1 to 10,000) of C{upload} (a L{UploadInfo}):
        a L{koboldfs.node.PutStream} as L{put}'s, its MD5 computed, whose
        C{finish} fires with the part's file (its C{md5} the part's ETag).
        """

    def copy_part(upload, number, source, first=0, length=None):
        """
        Make part C{number} of C{upload} from bytes C{first} to C{first +
        length} of C{source}; fire with its L{PartInfo}.
        """

    def complete_upload(upload_id, parts):
        """
        Assemble the object from C{parts} (C{(number, ETag)} pairs, in
        ascending order) into a new file, publish it and close the upload;
        fire with its L{FileInfo} (ETag C{<md5 of md5s>-N}).  Fails with
        L{koboldfs.errors.MultipartError}.
        """

    def abort_upload(upload_id):
        """
        Discard the upload and its parts; fire with how many parts.
        """

    # -- client transactions

    def begin_txn(ns):
        """
        Open a transaction; fire with the fields a client needs (C{txn},
        C{timeout}).
        """

    def prepare_txn(txn, record):
        """
        Vouch for this server's pending copies of C{txn} (and record the
        vote if C{record}); fire with C{state} and C{remaining}.
        """

    def commit_txn(txn, prepared):
        """
        Publish C{txn}; fire with C{published} and C{already}.
        """

    def abort_txn(txn):
        """
        Discard C{txn}; fire with C{discarded}.
        """

    # -- for the parts (forwarding, transactions): publishing an upload

    def place(put):
        """
        Look up the namespace of a L{koboldfs.storage.PendingPut} and set
        its path where its files go; fire with the L{NamespaceInfo}.
        """

    def finish_upload(put, sha256):
        """
        Make a put's upload durable and publish it with this server's copy
        alone (its forwarding found that one copy is enough, or the only
        one left).
        """

    def record_put(put, size, digest, also=()):
        """
        Publish a put durable here and on the servers C{also}, with its
        extras: the one record every put out of a transaction ends with.
        """

    def publish(put, record, lookup, not_recorded=()):
        """
        Record a durable upload with C{record}, removing its bytes if that
        fails unless they may have been recorded after all.
        """


Listener = Callable[[str, dict], None]
