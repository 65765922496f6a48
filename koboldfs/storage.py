"""
Local storage of write-once files under one data directory.

Files are stored by an internal id (a C{fid}, the hex of a uuid4), never by
key, so no key can steer a path anywhere; the only part of a key that
reaches the disk is its sanitised extension, kept so that an external web
server serving C{files/} guesses the Content-Type.  Layout under the root::

    files/ab/cd/<fid><ext>   published files (ab = fid[0:2], cd = fid[2:4]):
                             65,536 leaf directories keep each one small
                             even with tens of millions of files
    private/<ns>/ab/cd/<fid><ext>
                             published files of private namespace <ns>,
                             apart so that a web server serving the data
                             directory can ask for a signature (docs/http.md)
    tmp/                     uploads in progress, outside the served tree;
                             emptied by L{Storage.start} (crash leftovers)
    quarantine/              replicas that failed their checksum

A file becomes visible only once complete and durable: it is written to
C{tmp/}, hashed while streaming, fsynced, renamed into place, and then its
directory is fsynced.

Every blocking call (open, write, fsync, rename, hash, read, unlink,
statvfs) runs in the thread pool given to L{Storage}; functions that run
there are named C{_thd...}.  The reactor thread only moves buffers around.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import posixpath
import re
import shutil
import stat
import uuid
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from zope.interface import implementer

from koboldfs.errors import (
    ChecksumMismatch,
    CorruptReplica,
    ErrorCode,
    KoboldError,
    NoSpace,
    NotFound,
    ServerError,
    SizeMismatch,
    TooLarge,
)
from koboldfs.interfaces import FULL_ROOM, NO_EXTRAS, Extras
from koboldfs.protocol import CHUNK_SIZE

FILES = "files"
PRIVATE = "private"
TMP = "tmp"
QUARANTINE = "quarantine"

#: Pause the producer when more than this is accepted but not yet on disk.
HIGH_WATER = 8 * 1024 * 1024
#: Resume it when that falls below this.
LOW_WATER = 2 * 1024 * 1024
#: Buffered bytes that start a write job.  Smaller files stay in memory until
#: L{Upload.finish}, which then does everything in one thread job.  Must not
#: exceed LOW_WATER, or a paused producer could wait for a write that never
#: starts.
FLUSH_SIZE = CHUNK_SIZE

_EXT = re.compile(r"\.[a-z0-9]{1,10}")
_FID = re.compile(r"[0-9a-f]{32}")
# The only relative paths L{Storage.abspath} accepts: exactly what
# L{relpath_for} produces, with the directories matching the fid.
_RELPATH = re.compile(
    r"(?:files|private/(?!\.\.?/)[A-Za-z0-9._-]{1,64})"
    r"/([0-9a-f]{2})/([0-9a-f]{2})/\1\2[0-9a-f]{28}(?:\.[a-z0-9]{1,10})?"
)
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def new_fid() -> str:
    """
    A fresh internal file id: random, so servers need not coordinate.
    """
    return uuid.uuid4().hex


def extension_for(key: str) -> str:
    """
    The key's extension, lower-cased, if it is safe to put in a file name
    (C{.} then 1-10 of C{[a-z0-9]}), else C{""}.
    """
    ext = posixpath.splitext(key.rpartition("/")[2])[1]
    if not ext.isascii():
        return ""
    ext = ext.lower()
    return ext if _EXT.fullmatch(ext) else ""


def relpath_for(fid: str, key: str, private: str | None = None) -> str:
    """
    Where the file C{fid}, stored under C{key}, lives relative to the root
    (posix separators): C{files/ab/cd/<fid><ext>}, or
    C{private/<namespace>/ab/cd/<fid><ext>} for a file of C{private}
    namespace.
    """
    if not isinstance(fid, str) or not _FID.fullmatch(fid):
        raise ValueError(f"not a file id: {fid!r}")
    tree = FILES if private is None else f"{PRIVATE}/{private}"
    relpath = f"{tree}/{fid[0:2]}/{fid[2:4]}/{fid}{extension_for(key)}"
    if not _RELPATH.fullmatch(relpath):
        raise ValueError(f"not a namespace that can be private: {private!r}")
    return relpath


def relpath_names(relpath: object) -> str | None:
    """
    The fid that C{relpath} stores, if it is a stored file's path exactly
    as L{relpath_for} makes them; else None.
    """
    if not isinstance(relpath, str) or not _RELPATH.fullmatch(relpath):
        return None
    return posixpath.basename(relpath)[:32]


def fsync_directory(path: str) -> None:
    """
    Make the entries of directory C{path} durable (after a rename or mkdir
    in it).  Runs in a thread.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _thdMakeDirs(path: str) -> None:
    """
    Create C{path} and missing parents, fsyncing each parent that gained an
    entry so the new directory survives a crash.  Runs in a thread.
    """
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    _thdMakeDirs(parent)
    try:
        os.mkdir(path)
    except FileExistsError:
        # Another upload made it; fsync anyway in case it has not yet.
        pass
    fsync_directory(parent)


def _no_space(e: OSError, root: str) -> NoSpace | None:
    """
    The L{NoSpace} error to raise instead of C{e}, if C{e} means a full disk.
    """
    if e.errno in _NO_SPACE:
        return NoSpace(ErrorCode.NO_SPACE, f"no space left under {root}: {e.strerror}")
    return None


#: The free space a server keeps by default (C{--reserve}): it takes no
#: file that would leave less free on its disk.
DEFAULT_RESERVE = "2%"


def parse_reserve(text: str) -> tuple[int, float]:
    """
    A C{--reserve}: bytes (C{1073741824}, C{512M}, C{1G}) or a percentage
    of the disk (C{2%}), as (bytes, fraction), one of them 0.

    @raise ValueError: anything else.
    """
    spec = text.strip()
    try:
        if spec.endswith("%"):
            fraction = float(spec[:-1]) / 100
            if not 0 <= fraction < 1:
                raise ValueError(spec)
            return 0, fraction
        unit = _UNITS.get(spec[-1:].upper(), 1)
        number = float(spec[:-1] if spec[-1:].upper() in _UNITS else spec)
        if not 0 <= number < float("inf"):
            raise ValueError(spec)
        return int(number * unit), 0.0
    except (ValueError, IndexError):
        raise ValueError(
            f"--reserve must be bytes (with K, M, G or T) or a percentage of the disk, not {text!r}"
        ) from None


_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class Storage:
    """
    The files one server stores, under C{root}.

    Space: the server never fills its disk past its reserve.  L{free} is
    what the disk had free at the last look (L{refresh_space}, each second
    and at each heartbeat), less what uploads finished since have written;
    each open upload claims its announced size (or, size unknown, what it
    has received), and one that would leave less than L{reserve} free is
    refused with L{NoSpace}: before its body when the size is known.

    Two attributes exist so tests can simulate failures without a full disk
    or a crash: C{_write} (like L{os.write}) writes upload bytes, C{_rename}
    (like L{os.rename}) publishes a finished upload.
    """

    def __init__(self, root: str, reactor: Any, threadpool: Any) -> None:
        self.root = os.path.abspath(root)
        self.reactor = reactor
        self.threadpool = threadpool
        self._write: Callable[[int, Any], int] = os.write
        self._rename: Callable[[str, str], None] = os.rename
        #: The temp files of uploads not settled yet, which the orphan
        #: sweep must leave alone however old they are.
        self.open_uploads: set[str] = set()
        self._reserve = parse_reserve(DEFAULT_RESERVE)
        #: Bytes kept free; free bytes as last seen (None: not yet looked,
        #: nothing refused); bytes the disk holds; bytes open uploads claim.
        self.reserve = 0
        self.free: int | None = None
        self.total = 0
        self.claimed = 0

    def set_reserve(self, spec: str) -> None:
        """
        Keep C{spec} free (see L{parse_reserve}), from the next look.
        """
        self._reserve = parse_reserve(spec)

    def refresh_space(self) -> Deferred[tuple[int, int]]:
        """
        Look at the disk again: fires with (free, total) bytes, as
        L{disk_usage}, and updates L{free}, L{total} and L{reserve}.
        """

        def looked(usage: tuple[int, int]) -> tuple[int, int]:
            self.free, self.total = usage
            fixed, fraction = self._reserve
            self.reserve = fixed or int(self.total * fraction)
            return usage

        return self.disk_usage().addCallback(looked)

    @property
    def room(self) -> int | None:
        """
        Bytes a new upload may still take before the reserve; None before
        the disk was first looked at.
        """
        if self.free is None:
            return None
        return self.free - self.reserve - self.claimed

    @property
    def full(self) -> bool:
        """
        Whether less than L{FULL_ROOM} fits above the reserve.
        """
        room = self.room
        return room is not None and room < FULL_ROOM

    def claim(self, size: int) -> None:
        """
        Claim C{size} bytes for an upload.

        @raise NoSpace: they would leave less than the reserve free.
        """
        room = self.room
        if room is not None and (size > room or room <= 0):
            raise NoSpace(
                ErrorCode.NO_SPACE,
                f"disk full: {max(room, 0)} bytes free above the reserve of {self.reserve} "
                f"under {self.root}, {size} more asked",
            )
        self.claimed += size

    def _defer(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        """
        Run blocking C{f} in the thread pool, never on the reactor.
        """
        return deferToThreadPool(self.reactor, self.threadpool, f, *args, **kwargs)

    def start(self) -> Deferred[None]:
        """
        Create the layout and delete the uploads a crash left in C{tmp/}.
        """
        return self._defer(self._thdStart)

    def _thdStart(self) -> None:
        for name in (FILES, PRIVATE, TMP, QUARANTINE):
            os.makedirs(os.path.join(self.root, name), exist_ok=True)
        with os.scandir(os.path.join(self.root, TMP)) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)

    def disk_usage(self) -> Deferred[tuple[int, int]]:
        """
        (free bytes available to us, total bytes) of the root's file system,
        so the server can stop taking files before the disk fills.
        """
        return self._defer(self._thdDiskUsage)

    def _thdDiskUsage(self) -> tuple[int, int]:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def abspath(self, relpath: str) -> str:
        """
        The absolute path of stored file C{relpath}.

        @raise ValueError: unless C{relpath} is exactly a path L{relpath_for}
            makes, so nothing outside the published trees can be named.
        """
        if not isinstance(relpath, str) or not _RELPATH.fullmatch(relpath):
            raise ValueError(f"not a stored file's path: {relpath!r}")
        return os.path.join(self.root, *relpath.split("/"))

    def open_upload(
        self,
        relpath: str,
        max_size: int | None = None,
        md5: bool = False,
        size: int | None = None,
    ) -> Upload:
        """
        Start writing the file that will appear at C{relpath}, of C{size}
        bytes if known; with C{md5}, its MD5 is computed too
        (L{Upload.md5}).

        @raise NoSpace: it would not fit above the reserve (or, C{size}
            unknown, the disk is full already).
        """
        self.claim(size or 0)
        try:
            return Upload(self, relpath, max_size, md5, claimed=size or 0)
        except BaseException:
            self.claimed -= size or 0
            raise

    def open_read(
        self,
        relpath: str,
        offset: int = 0,
        length: int | None = None,
        expect_sha256: str | None = None,
        expect_size: int | None = None,
    ) -> Reader:
        """
        A L{Reader} of C{relpath}; call its C{open} first.
        """
        return Reader(self, relpath, offset, length, expect_sha256, expect_size)

    def exists(self, relpath: str) -> Deferred[bool]:
        """
        Whether the file is on disk.
        """
        return self._defer(os.path.isfile, self.abspath(relpath))

    def remove(self, relpath: str) -> Deferred[bool]:
        """
        Delete the file; C{False} if it was already gone.  Directories stay:
        they are few and will be reused.
        """
        return self._defer(self._thdRemove, self.abspath(relpath))

    @staticmethod
    def _thdRemove(path: str) -> bool:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True

    def quarantine(self, relpath: str) -> Deferred[None]:
        """
        Move a bad replica out of the served tree, keeping it for a post
        mortem under C{quarantine/<fid><ext>}; a copy of the same file set
        aside before is kept too (the later ones are C{<fid><ext>.1},
        C{.2}...).  No error if it is absent.
        """
        path = self.abspath(relpath)
        target = os.path.join(self.root, QUARANTINE, os.path.basename(path))
        return self._defer(self._thdQuarantine, path, target)

    @staticmethod
    def _thdQuarantine(path: str, target: str) -> None:
        # A hard link never replaces what is there: each earlier copy stays.
        for n in itertools.count():
            try:
                os.link(path, f"{target}.{n}" if n else target)
            except FileExistsError:
                continue
            except FileNotFoundError:
                return
            break
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass  # set aside at the same moment by another request
        fsync_directory(os.path.dirname(path))
        fsync_directory(os.path.dirname(target))

    # -- the orphan sweep (koboldfs.orphans)

    def remove_stale_tmp(self, before: float) -> Deferred[int]:
        """
        Delete what C{tmp/} holds that was last modified before C{before}
        (seconds since the epoch) and is not an upload in progress here:
        leftovers of uploads that crashed.  Fires with how many went.
        """
        return self._defer(self._thdRemoveStaleTmp, before, frozenset(self.open_uploads))

    def _thdRemoveStaleTmp(self, before: float, busy: frozenset[str]) -> int:
        removed = 0
        with os.scandir(os.path.join(self.root, TMP)) as entries:
            for entry in entries:
                if entry.path in busy:
                    continue
                try:
                    if entry.stat(follow_symlinks=False).st_mtime >= before:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path)
                    else:
                        os.unlink(entry.path)
                except FileNotFoundError:
                    continue
                removed += 1
        return removed

    def buckets(self) -> Deferred[list[str]]:
        """
        The directories stored files are spread over, relative to the root
        (C{files/ab}, C{private/<ns>/ab}): units of work small enough to
        list at once.
        """
        return self._defer(self._thdBuckets)

    def _thdBuckets(self) -> list[str]:
        trees = [FILES]
        with os.scandir(os.path.join(self.root, PRIVATE)) as entries:
            trees += sorted(
                f"{PRIVATE}/{e.name}" for e in entries if e.is_dir(follow_symlinks=False)
            )
        buckets = []
        for tree in trees:
            with os.scandir(os.path.join(self.root, *tree.split("/"))) as entries:
                buckets += sorted(
                    f"{tree}/{e.name}"
                    for e in entries
                    if re.fullmatch(r"[0-9a-f]{2}", e.name) and e.is_dir(follow_symlinks=False)
                )
        return buckets

    def old_files(self, bucket: str, before: float) -> Deferred[list[str]]:
        """
        The stored files under C{bucket} (from L{buckets}) last modified
        before C{before}, as relative paths.  Names that are not a stored
        file's are not ours to judge, and are left out.
        """
        return self._defer(self._thdOldFiles, bucket, before)

    def _thdOldFiles(self, bucket: str, before: float) -> list[str]:
        found = []
        try:
            subdirs = os.scandir(os.path.join(self.root, *bucket.split("/")))
        except FileNotFoundError:
            return found
        with subdirs:
            for sub in subdirs:
                if not sub.is_dir(follow_symlinks=False):
                    continue
                with os.scandir(sub.path) as entries:
                    for entry in entries:
                        relpath = f"{bucket}/{sub.name}/{entry.name}"
                        if relpath_names(relpath) is None:
                            continue
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        if stat.S_ISREG(st.st_mode) and st.st_mtime < before:
                            found.append(relpath)
        return sorted(found)

    def remove_if_older(self, relpath: str, before: float) -> Deferred[bool]:
        """
        Delete the stored file C{relpath} if it is still last modified
        before C{before}; a copy written since is not the one judged.
        """
        return self._defer(self._thdRemoveIfOlder, self.abspath(relpath), before)

    @staticmethod
    def _thdRemoveIfOlder(path: str, before: float) -> bool:
        try:
            if os.lstat(path).st_mtime >= before:
                return False
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True


class UploadState(Enum):
    """
    Where an L{Upload} is in its life.
    """

    OPEN = "open"  # taking writes
    FINISHING = "finishing"  # finish() called, not settled yet
    DONE = "done"  # published
    ABORTED = "aborted"  # discarded, by abort() or a failed finish()


@implementer(IConsumer)
class Upload:
    """
    One file being written: temp file in C{tmp/}, SHA-256 (and MD5 if
    asked) while streaming, in the thread jobs that write, then fsync,
    rename into place, fsync the directory.

    Bytes are buffered on the reactor and appended by one thread job at a
    time; a registered push producer is paused while too much waits.  The
    fd, hasher and byte count are touched only by those jobs, one at a time.

    @ivar size: bytes accepted so far.
    @ivar state: an L{UploadState}.
    @ivar md5: the hex MD5 of the file once finished, if it was asked for.
    """

    def __init__(
        self,
        storage: Storage,
        relpath: str,
        max_size: int | None = None,
        md5: bool = False,
        claimed: int = 0,
    ) -> None:
        self._storage = storage
        self.relpath = relpath
        self.path = storage.abspath(relpath)
        #: Bytes of the storage's space this upload holds (L{Storage.claim}).
        self._claimed = claimed
        self.max_size = max_size
        self.tmppath = os.path.join(storage.root, TMP, uuid.uuid4().hex + ".part")
        storage.open_uploads.add(self.tmppath)
        self.state = UploadState.OPEN
        self.size = 0
        self._buffer: list[bytes] = []
        self._buffered = 0  # bytes in _buffer
        self._inflight = 0  # bytes the running job is writing
        self._producer: IPushProducer | None = None
        self._paused = False
        self._job: Deferred[Any] | None = None
        self._idleWaiters: list[Deferred[None]] = []
        self._settled = False
        self._settledWaiters: list[Deferred[None]] = []
        self._error: Failure | None = None  # why writes are refused
        # Thread-job state:
        self._fd: int | None = None
        self._hasher = hashlib.sha256()
        self._md5 = hashlib.md5(usedforsecurity=False) if md5 else None
        self.md5: str | None = None
        self._written = 0

    # -- IConsumer

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        """
        Let C{producer} (e.g. the client's TCP transport) be paused while
        the disk lags behind.
        """
        if not streaming:
            raise ValueError("an Upload only takes push (streaming) producers")
        if self._producer is not None:
            raise RuntimeError("a producer is already registered")
        self._producer = producer
        if self._pending() > HIGH_WATER and self.state is UploadState.OPEN:
            self._pause()

    def unregisterProducer(self) -> None:
        """
        Forget the producer, resuming it if we paused it: it outlives us.
        """
        self._resume(force=True)
        self._producer = None

    def write(self, data: bytes) -> None:
        """
        Accept more of the file.

        @raise TooLarge: if it would pass C{max_size}; the upload then only
            fails, so abort it.
        @raise KoboldError: if an earlier append failed (e.g. L{NoSpace}).
        @raise RuntimeError: after C{finish} or C{abort}.
        """
        if self.state is not UploadState.OPEN:
            raise RuntimeError(f"write() on an upload that is {self.state.value}")
        if self._error is not None:
            error = self._error.value
            if isinstance(error, KoboldError):
                raise error
            raise ServerError(ErrorCode.INTERNAL, f"writing failed: {error}") from error
        if not data:
            return
        if self.max_size is not None and self.size + len(data) > self.max_size:
            too_large = TooLarge(
                ErrorCode.TOO_LARGE, f"file is over this server's limit of {self.max_size} bytes"
            )
            self._refuse(Failure(too_large))
            raise too_large
        if self.size + len(data) > self._claimed:
            more = self.size + len(data) - self._claimed
            try:
                self._storage.claim(more)
            except NoSpace as e:
                self._refuse(Failure(e))
                raise
            self._claimed += more
        if not isinstance(data, bytes):
            data = bytes(data)
        self._buffer.append(data)
        self._buffered += len(data)
        self.size += len(data)
        if self._pending() > HIGH_WATER:
            self._pause()
        self._maybeFlush()

    # -- flow control

    def _pending(self) -> int:
        return self._buffered + self._inflight

    def _pause(self) -> None:
        if not self._paused and self._producer is not None:
            self._paused = True
            self._producer.pauseProducing()

    def _resume(self, force: bool = False) -> None:
        if self._paused and (force or self._pending() < LOW_WATER):
            self._paused = False
            if self._producer is not None:
                self._producer.resumeProducing()

    def _takeBuffer(self) -> list[bytes]:
        chunks, self._buffer = self._buffer, []
        self._inflight, self._buffered = self._buffered, 0
        return chunks

    def _refuse(self, failure: Failure) -> None:
        """
        Fail every later write and the finish: drop what is buffered, and
        let the producer go so its owner hears of the error.
        """
        if self._error is None:
            self._error = failure
        self._buffer = []
        self._buffered = 0
        self._resume(force=True)

    # -- appending, one thread job at a time

    def _maybeFlush(self) -> None:
        if self._job is not None or self.state is not UploadState.OPEN or self._error is not None:
            return
        if self._buffered < FLUSH_SIZE and not (self._paused and self._buffered):
            return
        self._job = self._storage._defer(self._thdAppend, self._takeBuffer())
        self._job.addCallbacks(self._appended, self._appendFailed)

    def _appended(self, _: None) -> None:
        self._job = None
        self._inflight = 0
        self._resume()
        self._maybeFlush()
        if self._job is None:
            self._notifyIdle()

    def _appendFailed(self, failure: Failure) -> None:
        self._job = None
        self._inflight = 0
        self._refuse(failure)
        self._notifyIdle()

    def _whenIdle(self) -> Deferred[None]:
        """
        Fires once no thread job runs (and, while OPEN, none is due).
        """
        if self._job is None:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._idleWaiters.append(d)
        return d

    def _notifyIdle(self) -> None:
        waiters, self._idleWaiters = self._idleWaiters, []
        for d in waiters:
            d.callback(None)

    def _thdOpen(self) -> None:
        self._fd = os.open(self.tmppath, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC, 0o644)

    def _thdWriteAll(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self._storage._write(self._fd, view) :]
        self._hasher.update(data)
        if self._md5 is not None:
            self._md5.update(data)
        self._written += len(data)

    def _thdAppend(self, chunks: list[bytes]) -> None:
        try:
            if self._fd is None:
                self._thdOpen()
            for chunk in chunks:
                self._thdWriteAll(chunk)
        except BaseException as e:
            self._thdCleanupAfter(e)
            raise

    def _thdDiscard(self) -> None:
        """
        Close and delete the temp file, if any.
        """
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmppath)

    def _thdCleanupAfter(self, e: BaseException) -> None:
        """
        After failure C{e}: discard the temp file, and raise L{NoSpace}
        instead if the disk is full.
        """
        with contextlib.suppress(OSError):
            self._thdDiscard()
        if isinstance(e, OSError):
            no_space = _no_space(e, self._storage.root)
            if no_space is not None:
                raise no_space from e

    # -- the end

    def finish(
        self,
        sha256: str | None,
        size: int | None = None,
        relpath: str | None = None,
        md5: str | None = None,
    ) -> Deferred[tuple[int, str]]:
        """
        Check and publish the file: fires with (size, sha256 hex) once it is
        durable at its final path (and sets L{md5}).  Fails with
        L{ChecksumMismatch} (C{sha256} or C{md5}, hex, not the bytes'),
        L{SizeMismatch}, L{NoSpace} or the underlying error, having deleted
        the temp file and published nothing.

        @param relpath: publish there instead of at the path given at open:
            what decides the path (the namespace's privacy) may be known
            only once the bytes have arrived.
        """
        if self.state is not UploadState.OPEN:
            return defer.fail(RuntimeError(f"finish() on an upload that is {self.state.value}"))
        if md5 is not None and self._md5 is None:
            return defer.fail(ValueError("an MD5 to check, but the upload computes none"))
        if relpath is not None:
            self.relpath, self.path = relpath, self._storage.abspath(relpath)
        self.state = UploadState.FINISHING
        d = self._whenIdle()
        d.addCallback(lambda _: self._startFinish(sha256, size, md5))
        d.addBoth(self._finished)
        return d

    def _startFinish(
        self, sha256: str | None, size: int | None, md5: str | None
    ) -> Deferred[tuple[int, str]]:
        if self._error is not None:
            error = self._error
            return self._storage._defer(self._thdDiscard).addBoth(lambda _: error)
        # Files smaller than FLUSH_SIZE reach here with nothing on disk:
        # create, write, hash, fsync, rename and fsync the directory in one
        # thread job.
        self._job = self._storage._defer(self._thdFinish, self._takeBuffer(), sha256, size, md5)
        return self._job

    def _thdFinish(
        self, chunks: list[bytes], sha256: str | None, size: int | None, md5: str | None
    ) -> tuple[int, str]:
        directory = os.path.dirname(self.path)
        renamed = False
        try:
            if self._fd is None:
                self._thdOpen()
            for chunk in chunks:
                self._thdWriteAll(chunk)
            digest = self._hasher.hexdigest()
            if size is not None and self._written != size:
                raise SizeMismatch(
                    ErrorCode.SIZE_MISMATCH, f"received {self._written} bytes, not {size}"
                )
            if sha256 is not None and digest != sha256.lower():
                raise ChecksumMismatch(
                    ErrorCode.CHECKSUM_MISMATCH, f"received data has sha256 {digest}, not {sha256}"
                )
            if self._md5 is not None:
                self.md5 = self._md5.hexdigest()
                if md5 is not None and self.md5 != md5.lower():
                    raise ChecksumMismatch(
                        ErrorCode.CHECKSUM_MISMATCH, f"received data has MD5 {self.md5}, not {md5}"
                    )
            fd, self._fd = self._fd, None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            _thdMakeDirs(directory)
            self._storage._rename(self.tmppath, self.path)
            renamed = True
            fsync_directory(directory)
        except BaseException as e:
            if renamed:
                # Not durable, and the caller will not record it: unpublish.
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            self._thdCleanupAfter(e)
            raise
        return self._written, digest

    def _finished(self, result: Any) -> Any:
        self._job = None
        self._inflight = 0
        self.state = UploadState.ABORTED if isinstance(result, Failure) else UploadState.DONE
        self._settle()
        return result

    def abort(self) -> Deferred[None]:
        """
        Discard the upload: wait for the running job, delete the temp file.
        Idempotent; a no-op once finished or failed.  During C{finish}, waits
        for it to settle (the file may then be published).
        """
        if self._settled:
            return defer.succeed(None)
        if self.state is not UploadState.OPEN:
            return self._whenSettled()
        self.state = UploadState.ABORTED
        self._refuse(Failure(RuntimeError("upload aborted")))
        d = self._whenIdle()
        d.addCallback(lambda _: self._storage._defer(self._thdDiscard))

        def settled(result: Any) -> Any:
            self._settle()
            return result

        return d.addBoth(settled)

    def _whenSettled(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._settledWaiters.append(d)
        return d

    def _settle(self) -> None:
        self._settled = True
        storage = self._storage
        storage.open_uploads.discard(self.tmppath)
        storage.claimed -= self._claimed
        self._claimed = 0
        if self.state is UploadState.DONE and storage.free is not None:
            # On disk now, and not yet in what the last look saw.
            storage.free -= self._written
        self._buffer = []
        self._buffered = 0
        self._resume(force=True)
        waiters, self._settledWaiters = self._settledWaiters, []
        for d in waiters:
            d.callback(None)


class Reader:
    """
    Reads a stored file in large chunks in the thread pool, verifying its
    checksum on a full read: the last chunk of a corrupt file is replaced by
    L{CorruptReplica}, so a bad copy is never delivered whole.

    @ivar size: the file's total size, once L{open} has fired.
    """

    def __init__(
        self,
        storage: Storage,
        relpath: str,
        offset: int = 0,
        length: int | None = None,
        expect_sha256: str | None = None,
        expect_size: int | None = None,
    ) -> None:
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must not be negative")
        if expect_sha256 is not None and offset != 0:
            raise ValueError("a checksum can only be verified on a full read")
        self._storage = storage
        self.relpath = relpath
        self.path = storage.abspath(relpath)
        self.offset = offset
        self.length = length
        self.expect_sha256 = None if expect_sha256 is None else expect_sha256.lower()
        self.expect_size = expect_size
        self.size: int | None = None
        # Thread jobs run one at a time under this lock, in call order.
        self._lock = defer.DeferredLock()
        self._fd: int | None = None
        self._closed = False
        self._pos = offset
        self._remaining = 0
        self._hasher = hashlib.sha256() if expect_sha256 is not None else None
        self._verified = False
        self._error: CorruptReplica | None = None

    def open(self) -> Deferred[int]:
        """
        Open the file; fires with its total size.  L{NotFound} if missing,
        L{CorruptReplica} if its size is not C{expect_size}.
        """
        return self._lock.run(self._storage._defer, self._thdOpen)

    def _thdOpen(self) -> int:
        if self._fd is not None or self._closed:
            raise RuntimeError("Reader.open() called twice")
        try:
            # Not through a symlink: only what was published here is read.
            fd = os.open(self.path, os.O_RDONLY | _CLOEXEC | _NOFOLLOW)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(ErrorCode.NOT_FOUND, f"{self.relpath} is not on disk") from None
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise CorruptReplica(ErrorCode.CORRUPT, f"{self.relpath} is a symlink") from None
        try:
            # Nor through a symlinked directory of the tree (the root itself
            # may be one: another disk).
            inside = os.path.join(os.path.realpath(self._storage.root), *self.relpath.split("/"))
            if os.path.realpath(self.path) != inside:
                raise CorruptReplica(
                    ErrorCode.CORRUPT, f"{self.relpath} leads out of the tree through a symlink"
                )
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CorruptReplica(ErrorCode.CORRUPT, f"{self.relpath} is not a regular file")
            size = st.st_size
            if self.expect_size is not None and size != self.expect_size:
                raise CorruptReplica(
                    ErrorCode.CORRUPT, f"{self.relpath} has {size} bytes, not {self.expect_size}"
                )
            if self.offset > size:
                raise ValueError(f"offset {self.offset} is past the end ({size} bytes)")
            end = size if self.length is None else min(size, self.offset + self.length)
            if self._hasher is not None and end != size:
                raise ValueError("a checksum can only be verified on a full read")
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.size = size
        self._remaining = end - self.offset
        return size

    def read(
        self, n: int = CHUNK_SIZE, wrap: Callable[[bytes], bytes] | None = None
    ) -> Deferred[bytes]:
        """
        The next chunk of at most C{n} bytes; C{b""} at the end.  Reads may
        be asked for before the last one fired (to read ahead): they run in
        order.

        @param wrap: applied to a non-empty chunk in the worker thread, so
            that, say, framing it for the wire costs the reactor nothing.
        """
        if n <= 0:
            raise ValueError("read size must be positive")
        return self._lock.run(self._storage._defer, self._thdReadWrapped, n, wrap)

    def _thdReadWrapped(self, n: int, wrap: Callable[[bytes], bytes] | None) -> bytes:
        data = self._thdRead(n)
        return wrap(data) if wrap is not None and data else data

    def read_whole(self, limit: int) -> Deferred[tuple[int, bytes | None]]:
        """
        Open, read (verified), and close a small file in one thread job,
        instead of one job for each: fires with (its size, its bytes), or
        (its size, None) without reading if that size is not
        C{expect_size} or is over C{limit}.  Fails as L{open} and L{read}.
        """
        return self._lock.run(self._storage._defer, self._thdReadWhole, limit)

    def _thdReadWhole(self, limit: int) -> tuple[int, bytes | None]:
        expect_size, self.expect_size = self.expect_size, None
        try:
            size = self._thdOpen()
            if (expect_size is not None and size != expect_size) or self._remaining > limit:
                return size, None
            return size, self._thdRead(max(self._remaining, 1))
        finally:
            self._thdClose()

    def _thdRead(self, n: int) -> bytes:
        if self._fd is None:
            raise RuntimeError("Reader is not open")
        if self._error is not None:
            raise self._error
        want = min(n, self._remaining)
        parts = []
        got = 0
        while got < want:
            part = os.pread(self._fd, want - got, self._pos + got)
            if not part:
                break
            parts.append(part)
            got += len(part)
        data = b"".join(parts) if len(parts) != 1 else parts[0]
        if got < want:
            self._error = CorruptReplica(
                ErrorCode.CORRUPT, f"{self.relpath} shrank while being read"
            )
            raise self._error
        self._pos += got
        self._remaining -= got
        if self._hasher is not None and not self._verified:
            self._hasher.update(data)
            if self._remaining == 0:
                self._verified = True
                digest = self._hasher.hexdigest()
                if digest != self.expect_sha256:
                    self._error = CorruptReplica(
                        ErrorCode.CORRUPT,
                        f"{self.relpath} has sha256 {digest}, not {self.expect_sha256}",
                    )
                    raise self._error
        return data

    def close(self) -> Deferred[None]:
        """
        Close the file, after any read under way.
        """
        return self._lock.run(self._storage._defer, self._thdClose)

    def _thdClose(self) -> None:
        self._closed = True
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


@dataclass
class PendingPut:
    """
    An upload and where its file is to be published: what the core, put
    forwarding and the transaction handler pass between them.

    @ivar path: where the bytes go, under the data directory; set again
        once the namespace is known (a private one's are kept apart).
    @ivar size: as the client declared it, or None.
    @ivar md5: the MD5 the client declared (hex), or None.
    @ivar extras: what to record with the file (L{Extras}); its MD5 is
        the upload's own (L{Upload.md5}), once finished.
    @ivar part: C{(upload id, number)} if the bytes are a part of a
        multipart upload, recorded as such (L{koboldfs.multipart}).
    @ivar completes: C{(upload id, ((number, file id), ...))} if the bytes
        are the object assembled from those parts of that upload, whose
        recording completes it.
    """

    ns: str
    key: str
    fid: str
    path: str
    size: int | None
    upload: Upload
    md5: str | None = None
    extras: Extras = NO_EXTRAS
    part: tuple[str, int] | None = None
    completes: tuple[str, tuple[tuple[int, int], ...]] | None = None

    def finish(self, sha256: str | None) -> Deferred[tuple[int, str]]:
        """
        Make the bytes durable at C{path}, checked against the declared
        size, MD5 and C{sha256}: L{Upload.finish}.
        """
        return self.upload.finish(sha256, self.size, self.path, self.md5)

    def recorded(self) -> Extras:
        """
        The extras to record with the file, its MD5 computed as its bytes
        arrived (once finished).
        """
        md5 = self.upload.md5
        return self.extras if md5 is None else replace(self.extras, md5=md5)
