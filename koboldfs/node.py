"""
The server core: what one server knows (its storage, the shared metadata,
its peers) and the operations every front end needs, written once, with
no knowledge of frames or HTTP.

L{Node} provides L{INode}.  A front end (the binary protocol in
L{koboldfs.binaryserver}, HTTP in L{koboldfs.web}, S3) authenticates its
client its own way, then calls:

  - L{Node.lookup}, L{Node.delete}, L{Node.list_keys}, L{Node.get_url}:
    plain requests, each a Deferred;
  - L{Node.put}: a L{PutStream} that the request body is written into
    as it arrives, flow-controlled through the client's producer, and
    finished with the client's checksum; forwarding to peers on other
    hosts (L{koboldfs.forwarding}) and transactions happen behind it;
  - L{Node.get}: a L{Body} that sends a file's bytes into an L{IBodySink},
    from our copy (verified as it is read; a bad one set aside) or
    relayed from a peer (the next tried if one cannot send);
  - L{Node.begin_txn} and the rest of the transaction operations
    (L{koboldfs.txnhandler}).

Errors are L{KoboldError}s, whose codes a front end turns into its own
error form.  See docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any, Awaitable, Callable, Iterable, Mapping

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from koboldfs import forwarding
from koboldfs.attributes import check_attributes
from koboldfs.auth import (
    Grant,
    auth_message,
    check_cluster_proof,
    check_key_proof,
    is_local_endpoint,
)
from koboldfs.config import ServerConfig
from koboldfs.connection import ConnectionCache
from koboldfs.errors import (
    Busy,
    ConnectionFailed,
    CorruptReplica,
    DataLost,
    ErrorCode,
    Forbidden,
    KoboldError,
    MultipartError,
    NotFound,
    PreconditionFailed,
    ProtocolError,
    ServerError,
)
from koboldfs.events import Listeners
from koboldfs.interfaces import (
    NO_EXTRAS,
    Extras,
    FileInfo,
    IBodySink,
    IMetadataStore,
    INode,
    NamespaceInfo,
    PartInfo,
    ServerInfo,
    ServerState,
    UploadInfo,
)
from koboldfs.names import check_key, check_namespace
from koboldfs.multipart import Multipart
from koboldfs.protocol import CHUNK_SIZE
from koboldfs.s3creds import S3Credentials
from koboldfs.storage import PendingPut, Reader, Storage, new_fid, relpath_for, relpath_names
from koboldfs.txnhandler import TransactionHandler, check_txn_id
from koboldfs.urls import DEFAULT_EXPIRES, MAX_EXPIRES, check_signature, fill_template, signed_url

log = Logger()

#: Most keys one list returns, whatever the client asks.
MAX_LIST = 1000


@implementer(INode)
class Node:
    """
    One server's view of the cluster and the requests it can answer; see
    the module's docstring and L{INode}.
    """

    def __init__(
        self,
        config: ServerConfig,
        storage: Storage,
        store: IMetadataStore,
        clock: Any,
        peers: ConnectionCache,
        replica_lost: Listeners[FileInfo] | None = None,
    ) -> None:
        """
        @param replica_lost: told of each file whose copy here was set
            aside (the replicator listens, to make it again).
        """
        self.config = config
        self.name = config.name
        self.storage = storage
        self.store = store
        self.clock = clock
        self.peers = peers
        self.replica_lost: Listeners[FileInfo] = replica_lost or Listeners()
        self._servers: dict[str, ServerInfo] = {}
        #: Open client connections by peer address, and puts under way.
        self.connections: dict[str, int] = {}
        self.uploads = 0
        #: Peers a forwarded put could not reach: until when puts pass
        #: them by (koboldfs.forwarding), so that a peer cut off from us
        #: but still heartbeating costs one put a setup timeout, not all.
        self.unreachable: dict[str, float] = {}
        #: Client transactions (koboldfs/txnhandler.py).
        self.txns = TransactionHandler(self)
        self.s3_credentials = S3Credentials(store, config.cluster_secrets, clock)
        #: S3's multipart uploads and copies (koboldfs/multipart.py).
        self.multipart = Multipart(self)

    # -- limits

    def admit(self, address: str) -> str | None:
        config = self.config
        if sum(self.connections.values()) >= config.max_connections:
            return f"server {self.name} is at its limit of {config.max_connections} connections"
        if self.connections.get(address, 0) >= config.max_connections_per_ip:
            return (
                f"too many connections from {address} "
                f"(limit {config.max_connections_per_ip} per address)"
            )
        self.connections[address] = self.connections.get(address, 0) + 1
        return None

    def leave(self, address: str) -> None:
        left = self.connections[address] - 1
        if left:
            self.connections[address] = left
        else:
            del self.connections[address]

    # -- the cluster

    async def refresh_servers(self) -> None:
        self._servers = {s.name: s for s in await self.store.servers()}

    @property
    def servers(self) -> dict[str, ServerInfo]:
        return self._servers

    def up(self, name: str) -> ServerInfo | None:
        server = self._servers.get(name)
        if server is None or not server.is_up(self.clock.seconds(), self.config.down_after):
            return None
        return server

    @property
    def open(self) -> bool:
        auth = self.config.auth
        return auth == "open" or (auth == "auto" and is_local_endpoint(self.config.listen))

    @property
    def readonly(self) -> bool:
        me = self._servers.get(self.name)
        return me is not None and me.state != ServerState.ALIVE

    def peers_holding(self, info: FileInfo) -> list[ServerInfo]:
        peers = [s for s in map(self.up, info.replicas) if s is not None and s.name != self.name]
        random.shuffle(peers)
        return peers

    async def authenticate(self, fields: dict[str, Any], server_nonce: str) -> Grant:
        """
        @raise Forbidden: a wrong or unknown key or secret.
        """
        method, client_nonce, proof = fields["method"], fields["cnonce"], fields["proof"]
        if method == "cluster":
            peer = fields.get("peer", "")
            message = auth_message("cluster", server_nonce, client_nonce, self.name, peer)
            secrets = self.config.cluster_secrets
            if secrets and check_cluster_proof(secrets, message, proof):
                return Grant(None, True, peer=True)
            raise Forbidden(ErrorCode.FORBIDDEN, "wrong cluster secret")
        if method == "key":
            ns, key_id = fields.get("ns"), fields.get("key_id")
            if not isinstance(ns, str) or not isinstance(key_id, str):
                raise ProtocolError("AUTH by key needs ns and key_id", ErrorCode.BAD_REQUEST)
            check_namespace(ns)
            found = await self.store.find_key(ns, key_id)
            message = auth_message("key", server_nonce, client_nonce, self.name, f"{ns}/{key_id}")
            if found is None or not check_key_proof(found.stored_key, message, proof):
                raise Forbidden(ErrorCode.FORBIDDEN, f"wrong key for namespace {ns!r}")
            return Grant(ns, not found.readonly, key_id=key_id)
        raise ProtocolError(f"unknown AUTH method {method!r}", ErrorCode.BAD_REQUEST)

    async def revoked(self, grants: Iterable[Grant]) -> set[Grant]:
        """
        Those of C{grants} earned with a key that is no longer in the
        metadata: one read of the keys of each namespace they name.
        """
        by_namespace: dict[str, list[Grant]] = {}
        for grant in grants:
            if grant.key_id is not None and grant.namespace is not None:
                by_namespace.setdefault(grant.namespace, []).append(grant)
        gone: set[Grant] = set()
        for ns, held in by_namespace.items():
            current = {key.key_id for key in await self.store.keys(ns)}
            gone.update(grant for grant in held if grant.key_id not in current)
        return gone

    async def cluster_status(self, held: bool = False) -> dict[str, Any]:
        """
        The registered servers and the cluster's health, as the metadata
        has them now, with this server's clock (C{now}) to read the
        heartbeats against; and, if C{held}, how many live files each
        server holds (a count over every copy).
        """
        store = self.store
        return {
            "now": self.clock.seconds(),
            "servers": [dataclasses.asdict(s) for s in await store.servers()],
            "health": dataclasses.asdict(await store.health()),
            "held": await store.files_held() if held else None,
        }

    # -- requests

    async def lookup(self, ns: str, key: str, txn: str | None = None) -> FileInfo:
        if txn is not None:
            return await self.txns.lookup(ns, key, txn)
        info = await self.store.lookup(check_namespace(ns), check_key(key))
        if info is None:
            raise NotFound(ErrorCode.NOT_FOUND, f"no key {key!r} in namespace {ns!r}")
        return info

    async def lookup_stored(self, fid: str, path: str) -> tuple[FileInfo, NamespaceInfo] | None:
        found = await self.store.lookup_fid(fid)
        if found is None or found[0].path != path:
            return None
        return found

    async def delete(self, ns: str, key: str, txn: str | None = None) -> None:
        """
        Mark the file deleted, then remove our copy of its bytes at once, so
        that a web server serving our data directory stops serving it too.
        Other servers' copies wait for the replicator.
        """
        if txn is not None:
            await self.txns.delete(ns, key, txn)
            return
        info = await self.lookup(ns, key)
        if not await self.store.delete(info.namespace, info.key, self.clock.seconds()):
            raise NotFound(ErrorCode.NOT_FOUND, f"no key {key!r} in namespace {ns!r}")
        if self.name in info.replicas:
            await self.storage.remove(info.path)

    async def list_keys(self, ns: str, prefix: str, after: str | None, limit: int) -> list[str]:
        return await self.store.list_keys(check_namespace(ns), prefix, after, min(limit, MAX_LIST))

    async def list_files(
        self, ns: str, prefix: str, after: str | None, limit: int
    ) -> list[FileInfo]:
        return await self.store.list_files(check_namespace(ns), prefix, after, min(limit, MAX_LIST))

    async def get_url(self, ns: str, key: str, expires: int | None = None) -> str:
        """
        The URL of a copy on a live server, picked at random to spread the
        load.  A private namespace's URL is signed, valid for C{expires}
        seconds (default L{DEFAULT_EXPIRES}); a public one's never expires.
        """
        if expires is not None and not 0 < expires <= MAX_EXPIRES:
            raise ServerError(
                ErrorCode.BAD_REQUEST, f"expires must be 1 to {MAX_EXPIRES} seconds, not {expires}"
            )
        info = await self.lookup(ns, key)
        if not info.replicas:
            raise data_lost(info)
        live = [s for s in map(self.up, info.replicas) if s is not None]
        namespace = await self.store.namespace(info.namespace)
        if not live or namespace is None:
            raise ServerError(ErrorCode.UNAVAILABLE, f"no live server holds {key!r}")
        expires_at = math.ceil(self.clock.seconds()) + (expires or DEFAULT_EXPIRES)
        return self.url_for(info, namespace, random.choice(live), expires_at)

    def url_for(
        self, info: FileInfo, namespace: NamespaceInfo, server: ServerInfo, expires_at: int
    ) -> str:
        url = fill_template(
            namespace.url_template,
            public_url=server.public_url,
            server=server.name,
            namespace=info.namespace,
            path=info.path,
            key=info.key,
            fid=info.fid,
        )
        if namespace.private and namespace.secret is not None:
            url = signed_url(url, namespace.secret, info.path, expires_at)
        return url

    def url_allowed(
        self,
        info: FileInfo,
        namespace: NamespaceInfo,
        expires: str | None,
        signature: str | None,
    ) -> bool:
        if not namespace.private:
            return True
        return namespace.secret is not None and check_signature(
            namespace.secret, info.path, expires, signature, self.clock.seconds()
        )

    # -- puts

    def put(
        self,
        ns: str,
        key: str,
        size: int | None,
        producer: IPushProducer,
        txn: str | None = None,
        failed: Callable[[KoboldError], None] | None = None,
        md5: bool = False,
    ) -> PutStream:
        if md5 and txn is not None:
            raise ServerError(ErrorCode.BAD_REQUEST, "a put in a transaction records no MD5")
        self._take_upload()
        try:
            pending = self._begin_upload(ns, key, size, md5)
        except BaseException:
            self.uploads -= 1
            raise
        stream = PutStream(self, pending, txn, failed)
        # A put in a client transaction is not forwarded: it is published at
        # the commit, and copied by the replicators then.  Any other put
        # looks for its peers first (koboldfs.forwarding), even when this
        # server believes itself alone: it may have learnt of none yet.
        if txn is None:
            stream._forward_to_peers(producer)
            if stream._refused is not None:
                # Refused before the caller had the stream (it was known at
                # once that too few hosts are alive): the pause is ours.
                producer.resumeProducing()
                raise stream._refused
        else:
            pending.upload.registerProducer(producer, True)
        stream._started = True
        return stream

    def replica_put(
        self, fid: str, path: str, size: int | None, producer: IPushProducer
    ) -> CopyStream:
        """
        A peer's REPLICA_PUT (koboldfs.forwarding): the bytes of a put
        another server is taking, written at the path it gave; recorded by
        that server, not here.
        """
        self._take_upload()
        try:
            if self.readonly:
                raise ServerError(ErrorCode.READONLY, f"server {self.name} takes no new files")
            if relpath_names(path) != fid:
                raise ServerError(
                    ErrorCode.BAD_REQUEST, f"{path!r} is not a stored path of {fid!r}"
                )
            self._check_size(size)
            upload = self.storage.open_upload(path, self.config.max_file_size, size=size)
        except BaseException:
            self.uploads -= 1
            raise
        upload.registerProducer(producer, True)
        return CopyStream(self, PendingPut("", "", fid, path, size, upload))

    def _take_upload(self) -> None:
        if self.uploads >= self.config.max_uploads:
            raise Busy(
                ErrorCode.BUSY,
                f"server {self.name} is at its limit of {self.config.max_uploads} uploads",
            )
        self.uploads += 1

    def _check_size(self, size: int | None) -> None:
        limit = self.config.max_file_size
        if limit is not None and size is not None and size > limit:
            raise ServerError(
                ErrorCode.TOO_LARGE, f"{size} bytes is over this server's limit of {limit}"
            )

    def _begin_upload(self, ns: str, key: str, size: int | None, md5: bool) -> PendingPut:
        check_namespace(ns)
        check_key(key)
        if self.readonly:
            raise ServerError(ErrorCode.READONLY, f"server {self.name} takes no new files")
        self._check_size(size)
        fid = new_fid()
        path = relpath_for(fid, key)
        upload = self.storage.open_upload(path, self.config.max_file_size, md5, size=size)
        return PendingPut(ns, key, fid, path, size, upload)

    async def finish_upload(self, put: PendingPut, sha256: str | None) -> FileInfo:
        """
        Make an upload durable, then publish it with this server's copy
        alone: only then is it visible.
        """
        await self.place(put)
        size, digest = await put.finish(sha256)
        return await self.record_put(put, size, digest)

    async def record_put(
        self, put: PendingPut, size: int, digest: str, also: tuple[str, ...] = ()
    ) -> FileInfo:
        """
        Publish C{put}, durable here and on the servers C{also}, with its
        extras (L{publish}): how every put that is not in a client
        transaction is recorded; a part of a multipart upload, or the
        object that completes one, as such.
        """
        now = self.clock.seconds()
        if put.part is not None:
            upload_id, number = put.part
            part = await self.publish(
                put,
                lambda: self.store.add_part(
                    upload_id,
                    number,
                    put.fid,
                    put.path,
                    size,
                    digest,
                    put.upload.md5,
                    now,
                    self.name,
                    also,
                ).addCallback(lambda part: part.file),
                lambda: self.store.find_part(upload_id, number).addCallback(
                    lambda part: None if part is None else part.file
                ),
                not_recorded=(MultipartError,),
            )
            return part
        if put.completes is not None:
            upload_id, chosen = put.completes
            return await self.publish(
                put,
                lambda: self.store.complete_upload(
                    upload_id,
                    chosen,
                    put.fid,
                    put.path,
                    size,
                    digest,
                    now,
                    self.name,
                    also,
                    put.recorded(),
                ),
                lambda: self.store.lookup(put.ns, put.key),
                not_recorded=(MultipartError, PreconditionFailed),
            )
        return await self.publish(
            put,
            lambda: self.store.add_file(
                put.ns,
                put.key,
                put.fid,
                put.path,
                size,
                digest,
                now,
                self.name,
                also=also,
                extras=put.recorded(),
            ),
            lambda: self.store.lookup(put.ns, put.key),
            not_recorded=(PreconditionFailed,),
        )

    async def place(self, put: PendingPut) -> NamespaceInfo | None:
        """
        Look up the namespace of C{put} and fire with it, its path set
        where its files go: a private namespace's are published apart
        (docs/storage.md).  On failure the upload is given up.
        """
        try:
            namespace = await self.store.namespace(put.ns)
            if namespace is not None and namespace.private:
                put.path = relpath_for(put.fid, put.key, private=namespace.name)
        except BaseException:
            await put.upload.abort()
            raise
        return namespace

    async def publish(
        self,
        put: PendingPut,
        record: Callable[[], Awaitable[FileInfo]],
        lookup: Callable[[], Awaitable[FileInfo | None]],
        not_recorded: tuple[type[Exception], ...] = (),
    ) -> FileInfo:
        """
        Record C{put}, whose bytes are durable at its path, with C{record};
        if that fails, remove the bytes, unless they may have been recorded
        after all.

        The commit may have happened with only its answer lost (the
        database went away): C{lookup} is asked before the bytes are
        removed, and if even that fails they are kept: an orphan file costs
        disk space (the orphan sweep reclaims it), a removed published one
        would be a lost file.  Errors in C{not_recorded}, from either, say
        for sure that nothing was recorded.
        """
        try:
            return await record()
        except not_recorded:
            await self.storage.remove(put.path)
            raise
        except Exception as error:
            try:
                found = await lookup()
            except not_recorded:
                await self.storage.remove(put.path)
                raise error from None
            except Exception:
                raise error from None
            if found is not None and found.fid == put.fid:
                return found
            await self.storage.remove(put.path)
            raise

    # -- gets

    async def get(
        self,
        info: FileInfo,
        local: bool = False,
        txn: str | None = None,
        first: int = 0,
        length: int | None = None,
        exact: bool = False,
    ) -> Body:
        # With no other copy, ours going bad is the file's loss.
        last = list(info.replicas) == [self.name] and not local
        if not info.replicas and not local:
            raise data_lost(info)
        if self.name in info.replicas:
            try:
                body = await self.open_local(info, first, length)
            except CorruptReplica:
                if last:
                    raise data_lost(info) from None
                raise
            if body is not None:
                return body
            if last:
                raise data_lost(info)
        if local:
            raise NotFound(ErrorCode.NOT_FOUND, f"{self.name} holds no copy of {info.key!r}")
        return _Relayed(self, info, first, _length(info, first, length), txn, exact)

    async def open_local(
        self,
        info: FileInfo,
        first: int = 0,
        length: int | None = None,
        small_whole: bool = True,
    ) -> Body | None:
        """
        @param small_whole: read a whole file of one chunk at once, before
            anything is sent (one thread job instead of three): a bad one
            then fails here, with L{CorruptReplica}, rather than part-way.
        """
        length = _length(info, first, length)
        whole = first == 0 and length == info.size
        # Only a full read can be checked against the file's checksum.
        reader = self.storage.open_read(
            info.path,
            offset=first,
            length=length,
            expect_sha256=info.sha256 if whole else None,
            expect_size=info.size,
        )
        if whole and small_whole and info.size <= CHUNK_SIZE:
            try:
                size, data = await reader.read_whole(CHUNK_SIZE)
            except NotFound:
                await self.replica_failed(info, "missing from disk")
                return None
            except CorruptReplica as e:
                await self.replica_failed(info, str(e))
                raise
            if data is None or size != info.size:
                await self.replica_failed(info, f"{size} bytes on disk, not {info.size}")
                return None
            return _Small(self, info, data)
        try:
            await reader.open()
        except (NotFound, CorruptReplica) as e:
            await defer.maybeDeferred(reader.close)
            reason = "missing from disk" if isinstance(e, NotFound) else str(e)
            await self.replica_failed(info, reason)
            return None
        return _Local(self, info, first, length, reader)

    async def replica_failed(self, info: FileInfo, reason: str) -> None:
        """
        Our copy is missing or corrupt: set it aside and stop offering it.
        """
        log.warn(
            "replica {fid} of {key!r} is bad: {reason}", fid=info.fid, key=info.key, reason=reason
        )
        await self.storage.quarantine(info.path)
        await self.store.quarantine_replica(info.id, self.name)
        self.replica_lost(info)

    # -- S3: copies and multipart uploads (koboldfs/multipart.py)

    async def copy(
        self,
        source: FileInfo,
        ns: str,
        key: str,
        attributes: Mapping[str, str] | None = None,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> FileInfo:
        return await self.multipart.copy(source, ns, key, attributes, if_absent, if_match)

    async def create_upload(
        self, ns: str, key: str, attributes: Mapping[str, str] | None = None
    ) -> UploadInfo:
        return await self.multipart.create(ns, key, attributes)

    def upload_part(
        self,
        upload: UploadInfo,
        number: int,
        size: int | None,
        producer: IPushProducer,
        failed: Callable[[KoboldError], None] | None = None,
    ) -> PutStream:
        return self.multipart.upload_part(upload, number, size, producer, failed)

    async def copy_part(
        self,
        upload: UploadInfo,
        number: int,
        source: FileInfo,
        first: int = 0,
        length: int | None = None,
    ) -> PartInfo:
        return await self.multipart.copy_part(upload, number, source, first, length)

    async def complete_upload(self, upload_id: str, parts: list[tuple[int, str]]) -> FileInfo:
        return await self.multipart.complete(upload_id, parts)

    async def abort_upload(self, upload_id: str) -> int:
        return await self.multipart.abort(upload_id)

    # -- client transactions

    async def begin_txn(self, ns: str) -> dict[str, Any]:
        return await self.txns.begin(ns)

    async def prepare_txn(self, txn: str, record: bool) -> dict[str, Any]:
        return await self.txns.prepare(check_txn_id(txn), record)

    async def commit_txn(self, txn: str, prepared: bool) -> dict[str, Any]:
        return await self.txns.commit(check_txn_id(txn), prepared)

    async def abort_txn(self, txn: str) -> dict[str, Any]:
        return await self.txns.abort(check_txn_id(txn))


def data_lost(info: FileInfo) -> DataLost:
    """
    The error for a file none of whose copies is good any more.
    """
    return DataLost(
        ErrorCode.DATA_LOST,
        f"no good copy of {info.key!r} is left: every copy failed its checksum or is "
        "missing (bad copies are kept in the servers' quarantine/)",
    )


def _length(info: FileInfo, first: int, length: int | None) -> int:
    if not 0 <= first <= info.size or (length is not None and length < 0):
        raise ServerError(ErrorCode.BAD_REQUEST, f"no bytes {first}+{length} in {info.size}")
    return info.size - first if length is None else min(length, info.size - first)


class _Incoming:
    """
    What every upload stream does: hold one of the node's upload slots
    until it ends, write into storage, give up.
    """

    def __init__(self, node: Node, put: PendingPut) -> None:
        self._node = node
        self.put = put
        self._finishing = False
        self._ended = False

    def write(self, data: bytes) -> None:
        """
        Take the next bytes of the body.

        @raise KoboldError: refused (over the size limit, the disk is
            full): the front end aborts the stream and answers with it.
        """
        self.put.upload.write(data)

    def abort(self) -> None:
        """
        Give the upload up (the client went, or was refused): nothing is
        kept.  Idempotent; does nothing once L{finish} began.
        """
        if self._finishing or self._ended:
            return
        self._aborting()
        self.put.upload.unregisterProducer()
        self.put.upload.abort()
        self._end()

    def _aborting(self) -> None:
        pass

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._node.uploads -= 1


class PutStream(_Incoming):
    """
    A put on its way in: the front end L{write}s each chunk of the body
    as it arrives and L{finish}es with the client's SHA-256, or
    L{abort}s.  Made by L{Node.put}.
    """

    def __init__(
        self,
        node: Node,
        put: PendingPut,
        txn: str | None,
        failed: Callable[[KoboldError], None] | None,
    ) -> None:
        super().__init__(node, put)
        self._txn = txn
        self._failed = failed
        self._forward: forwarding.Forward | None = None
        self._started = False
        self._refused: KoboldError | None = None

    def _forward_to_peers(self, producer: IPushProducer) -> None:
        """
        Stream the body to peers as it arrives too (write durability); the
        client is paused while the disk or a peer lags.
        """
        gate = forwarding.Gate(producer)
        self.put.upload.registerProducer(gate.side("disk"), True)
        self._forward = forwarding.Forward(self._node, self.put, gate, self._forwardFailed)
        self._forward.start()

    def _forwardFailed(self, error: KoboldError) -> None:
        # Once finishing, finish raises the error itself.
        if self._finishing or self._ended:
            return
        self.abort()
        if not self._started:
            self._refused = error
        elif self._failed is not None:
            self._failed(error)

    def write(self, data: bytes) -> None:
        super().write(data)
        if self._forward is not None:
            self._forward.write(data)

    def _aborting(self) -> None:
        if self._forward is not None:
            self._forward.abort()

    async def finish(
        self,
        sha256: str | None,
        md5: str | None = None,
        attributes: Mapping[str, str] | None = None,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> FileInfo:
        """
        The end of the body: fire with the published L{FileInfo} once the
        file is durable (on every host its namespace wants) and recorded,
        or fail, having published nothing.

        @param md5: the client's MD5 of the body (hex), checked before
            anything is published; only for a put begun with C{md5}.
        @param attributes: recorded with the file (L{koboldfs.attributes}).
        @param if_absent: publish only if the key has no live version, and
        @param if_match: only if the live version's entity tag is this;
            checked as the file is recorded (else
            L{PreconditionFailed}).
        @raise AttributesTooLarge: too many C{attributes} (nothing kept).
        """
        try:
            extras = Extras(
                attributes=check_attributes(attributes), if_absent=if_absent, if_match=if_match
            )
            if extras != NO_EXTRAS and self._txn is not None:
                raise ServerError(
                    ErrorCode.BAD_REQUEST, "a put in a transaction records no attributes"
                )
        except BaseException:
            self.abort()
            raise
        return await self.finish_with(sha256, md5, extras)

    async def finish_with(self, sha256: str | None, md5: str | None, extras: Extras) -> FileInfo:
        """
        L{finish} with C{extras} as given, unchecked: those of an object
        the core assembles (L{koboldfs.multipart}).
        """
        node, put = self._node, self.put
        put.md5, put.extras = md5, extras
        self._finishing = True
        try:
            if self._txn is not None:
                return await node.txns.finish_upload(put, self._txn, sha256)
            assert self._forward is not None  # every put outside a transaction has one
            return await self._forward.finish(sha256)
        finally:
            put.upload.unregisterProducer()
            self._end()


class CopyStream(_Incoming):
    """
    A peer's copy of a put it is taking (L{Node.replica_put}): stored, not
    recorded (the peer records it).
    """

    async def finish(self, sha256: str | None) -> tuple[int, str]:
        """
        Fire with the copy's size and SHA-256 once it is durable here:
        checked against C{sha256} if the peer sent one, and by the peer
        against its own.
        """
        self._finishing = True
        try:
            return await self.put.upload.finish(sha256, self.put.size)
        finally:
            self.put.upload.unregisterProducer()
            self._end()


class Body:
    """
    A file's bytes on their way out: L{send} writes them into an
    L{IBodySink}; a body not sent (a HEAD) is L{close}d.  Made by
    L{Node.get} and L{Node.open_local}.

    @ivar info: the file.
    @ivar first: the offset of the first byte sent.
    @ivar length: how many bytes are sent.
    """

    def __init__(self, node: Node, info: FileInfo, first: int, length: int) -> None:
        self._node = node
        self.info = info
        self.first = first
        self.length = length

    async def send(self, sink: IBodySink) -> None:
        """
        Send the bytes; fire once the last is written.

        @raise KoboldError: no byte could be sent (nothing began), or the
            bytes turned out bad or their source failed part-way
            (C{sink.abort} was called first).
        """
        raise NotImplementedError()

    async def close(self) -> None:
        """
        Release what the body holds without sending it.
        """


class _Small(Body):
    """
    A file of one chunk, read whole and verified already.
    """

    def __init__(self, node: Node, info: FileInfo, data: bytes) -> None:
        super().__init__(node, info, 0, len(data))
        self._data = data

    async def send(self, sink: IBodySink) -> None:
        sink.begin()
        if self._data:
            frame = sink.frame
            await _wrote(sink.write(frame(self._data) if frame is not None else self._data))


class _Local(Body):
    """
    Our copy, open: read in the thread pool, each chunk read (and framed)
    while the one before it is sent, verified on a full read so that the
    last chunk of a bad copy is never sent.
    """

    def __init__(self, node: Node, info: FileInfo, first: int, length: int, reader: Reader):
        super().__init__(node, info, first, length)
        self._reader = reader

    async def send(self, sink: IBodySink) -> None:
        reader, frame = self._reader, sink.frame
        # Reads are asked for exactly up to the end, not one more to find
        # it: the body ends with its last byte (a client that has them all
        # may close at once).
        left = self.length

        def read() -> defer.Deferred[bytes] | None:
            nonlocal left
            if left <= 0:
                return None
            n = min(CHUNK_SIZE, left)
            left -= n
            return reader.read(n, frame)

        try:
            sink.begin()
            reading = read()
            try:
                while reading is not None and not sink.gone:
                    chunk, reading = await reading, None
                    if not chunk:
                        break
                    reading = read()
                    await _wrote(sink.write(chunk))
            except CorruptReplica as e:
                sink.abort()
                await self._node.replica_failed(self.info, str(e))
                raise
            finally:
                if reading is not None:
                    reading.addErrback(lambda _: None)
        finally:
            # Not waited for: the front end ends its body at once (an HTTP
            # request is finished, and logged, before the next one comes).
            self._reader.close().addErrback(
                lambda f: log.failure("closing {path} failed", f, path=self.info.path)
            )

    async def close(self) -> None:
        await defer.maybeDeferred(self._reader.close)


class _Relayed(Body):
    """
    The bytes of a live peer's copy, relayed as they arrive: each peer
    holding one is tried in turn until one can be reached; once bytes have
    gone out, a failure ends the body (the client must start over).
    """

    def __init__(
        self, node: Node, info: FileInfo, first: int, length: int, txn: str | None, exact: bool
    ) -> None:
        super().__init__(node, info, first, length)
        self._txn = txn
        self._exact = exact

    async def send(self, sink: IBodySink) -> None:
        node, info = self._node, self.info
        started = False
        errors = []
        frame = sink.frame
        # The peer sends the whole file, verifying its copy as it reads;
        # the bytes outside the range are dropped here.
        position, first, end = 0, self.first, self.first + self.length

        def forward(chunk: bytes) -> defer.Deferred[None] | None:
            nonlocal position
            start, position = position, position + len(chunk)
            if start < first or position > end:
                chunk = chunk[max(0, first - start) : max(0, end - start)]
            if not chunk or sink.gone:
                return None
            return sink.write(frame(chunk) if frame is not None else chunk)

        # A hung peer costs its connection's deadline (--peer-connect-timeout)
        # or its reply's (--peer-reply-timeout), then the next is tried.
        for peer in node.peers_holding(info):
            try:
                conn = await node.peers.acquire(peer.address)
            except KoboldError as e:  # unreachable, hung, or refused our cluster secret
                errors.append(str(e))
                continue
            if not started:
                sink.begin()
                started = True
            try:
                fields: dict[str, Any] = {"ns": info.namespace, "key": info.key, "local": True}
                if self._txn is not None:
                    fields["txn"] = self._txn
                if self._exact:
                    fields["fid"] = info.fid
                await conn.get(fields, forward)
            except (ServerError, ConnectionFailed) as e:
                node.peers.release(peer.address, conn)
                if position == 0:
                    # Nothing of the body has gone out: another holder can
                    # send it all.
                    errors.append(f"{peer.name}: {e}")
                    continue
                sink.abort()
                # Bytes have gone out: the client must start over.
                raise ServerError(ErrorCode.UNAVAILABLE, f"peer {peer.name} failed: {e}") from e
            node.peers.release(peer.address, conn)
            return
        if started:
            sink.abort()
        raise ServerError(
            ErrorCode.UNAVAILABLE,
            f"no live server holds {info.key!r}" + (f": {'; '.join(errors)}" if errors else ""),
        )


async def _wrote(waiting: defer.Deferred[None] | None) -> None:
    if waiting is not None:
        await waiting
