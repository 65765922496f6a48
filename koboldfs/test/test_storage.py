"""
Tests for L{koboldfs.storage}: durable write-once uploads, verified reads.
"""

from __future__ import annotations

import errno
import hashlib
import os
from typing import Any

from twisted.internet import defer, reactor
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from koboldfs.errors import (
    ChecksumMismatch,
    CorruptReplica,
    ErrorCode,
    NoSpace,
    NotFound,
    SizeMismatch,
    TooLarge,
    error_for_code,
)
from koboldfs.protocol import CHUNK_SIZE
from koboldfs.storage import (
    HIGH_WATER,
    LOW_WATER,
    Storage,
    UploadState,
    new_fid,
    parse_reserve,
    relpath_for,
)

KiB = 1024
MiB = 1024 * KiB


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pattern(size: int) -> bytes:
    """
    Bytes that differ from chunk to chunk, so misplaced chunks show.
    """
    block = os.urandom(4093)
    return (block * (size // len(block) + 1))[:size]


class CountingThreadPool(ThreadPool):
    """
    A thread pool counting the jobs it is given, to check the fast path.
    """

    jobs = 0

    def callInThreadWithCallback(self, *args: Any, **kwargs: Any) -> None:
        self.jobs += 1
        super().callInThreadWithCallback(*args, **kwargs)


class FakeProducer:
    """
    A push producer recording how it was driven; C{resumed} fires on the
    first resumeProducing.
    """

    def __init__(self) -> None:
        self.paused = 0
        self.resumes = 0
        self.stopped = 0
        self.resumed: defer.Deferred[None] = defer.Deferred()

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumes += 1
        if not self.resumed.called:
            self.resumed.callback(None)

    def stopProducing(self) -> None:
        self.stopped += 1


class _StorageMixin:
    """
    A started L{Storage} on a fresh root, with a real thread pool.
    """

    def setUp(self) -> defer.Deferred[None]:
        self.pool = CountingThreadPool(minthreads=1, maxthreads=4, name="test-storage")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.root = os.path.abspath(self.mktemp())
        self.storage = Storage(self.root, reactor, self.pool)
        return self.storage.start()

    def listing(self, sub: str) -> list[str]:
        """
        Files (not directories) under C{sub} of the root, relative to it.
        """
        found = []
        for dirpath, _, filenames in os.walk(os.path.join(self.root, sub)):
            for name in filenames:
                found.append(os.path.relpath(os.path.join(dirpath, name), self.root))
        return sorted(found)

    def assertNothingStored(self) -> None:
        self.assertEqual(self.listing("files"), [])
        self.assertEqual(self.listing("tmp"), [])

    async def store(self, data: bytes, key: str = "x.bin", step: int = 64 * KiB) -> str:
        """
        Upload C{data} in C{step}-byte writes; return its relpath.
        """
        path = relpath_for(new_fid(), key)
        upload = self.storage.open_upload(path)
        for i in range(0, len(data), step):
            upload.write(data[i : i + step])
        result = await upload.finish(sha(data), len(data))
        self.assertEqual(result, (len(data), sha(data)))
        return path

    def readback(self, relpath: str) -> bytes:
        with open(self.storage.abspath(relpath), "rb") as f:
            return f.read()


class NamingTests(TestCase):
    """
    Paths come from file ids; keys only contribute a safe extension.
    """

    def setUp(self) -> None:
        self.storage = Storage("/srv/kobold", reactor, None)

    def test_newFid(self) -> None:
        """
        File ids are 32 lower-case hex digits, and fresh each time.
        """
        fids = {new_fid() for _ in range(100)}
        self.assertEqual(len(fids), 100)
        for fid in fids:
            self.assertRegex(fid, r"^[0-9a-f]{32}$")

    def test_layout(self) -> None:
        """
        A file lives under files/ab/cd/ named by its fid, so leaf directories
        stay small.
        """
        fid = "0123456789abcdef0123456789abcdef"
        self.assertEqual(relpath_for(fid, "photo.JPG"), f"files/01/23/{fid}.jpg")

    def test_extensionSanitised(self) -> None:
        """
        Only a short alphanumeric extension of the key's last component
        survives, lower-cased; nothing else of the key reaches the disk.
        """
        fid = new_fid()
        base = f"files/{fid[:2]}/{fid[2:4]}/{fid}"
        cases = {
            "a/b/../x.JPG": ".jpg",
            "noext": "",
            "x.ta r": "",
            "x.tar.gz": ".gz",
            "x.abcdefghij": ".abcdefghij",
            "x.abcdefghijk": "",
            "dir.d/file": "",
            "../../etc/passwd": "",
            "x.": "",
            ".bashrc": "",
            "x.j/pg": "",
            "x.jp\u0130": "",
            "x.\u212a": "",
        }
        for key, ext in cases.items():
            self.assertEqual(relpath_for(fid, key), base + ext, key)

    def test_privateLayout(self) -> None:
        """
        A private namespace's files live apart, under private/<namespace>/,
        so that a web server can ask for a signature there alone; a
        namespace that names no directory of its own cannot be one.
        """
        fid = "0123456789abcdef0123456789abcdef"
        self.assertEqual(
            relpath_for(fid, "a.JPG", private="Photos_2.x"), f"private/Photos_2.x/01/23/{fid}.jpg"
        )
        self.assertEqual(relpath_for(fid, "a", private="..."), f"private/.../01/23/{fid}")
        for name in (".", "..", "a/b", "", "x" * 65):
            self.assertRaises(ValueError, relpath_for, fid, "a.jpg", private=name)

    def test_badFid(self) -> None:
        """
        Only real file ids make paths.
        """
        for fid in ["../../etc", "0123456789ABCDEF0123456789ABCDEF", "abc", ""]:
            self.assertRaises(ValueError, relpath_for, fid, "x.jpg")

    def test_abspath(self) -> None:
        """
        A stored file's path is under the root's files/ tree.
        """
        fid = new_fid()
        self.assertEqual(
            self.storage.abspath(relpath_for(fid, "a.png")),
            os.path.join("/srv/kobold", "files", fid[:2], fid[2:4], fid + ".png"),
        )

    def test_abspathRejects(self) -> None:
        """
        Nothing but a path relpath_for makes is accepted, so no caller can
        reach outside files/.
        """
        fid = new_fid()
        bad = [
            "../etc/passwd",
            "/etc/passwd",
            "tmp/x",
            f"tmp/{fid}",
            f"quarantine/{fid}",
            "files/../tmp/x",
            f"files/{fid[:2]}/{fid[2:4]}/../../../etc/passwd",
            f"/files/{fid[:2]}/{fid[2:4]}/{fid}",
            f"files/{fid[:2]}/{fid[2:4]}/{fid}/",
            f"files/{fid[:2]}/{fid[2:4]}/{fid}.JPG",
            f"files/00/00/ff{fid[2:]}",
            f"private/../{fid[:2]}/{fid[2:4]}/{fid}",
            f"private/./{fid[:2]}/{fid[2:4]}/{fid}",
            f"private/{fid[:2]}/{fid[2:4]}/{fid}",
            f"private/a/b/{fid[:2]}/{fid[2:4]}/{fid}",
            "files",
            "",
        ]
        for relpath in bad:
            self.assertRaises(ValueError, self.storage.abspath, relpath)


class UploadTests(_StorageMixin, TestCase):
    """
    Uploads become visible only whole, checked and durable.
    """

    async def test_smallRoundTrip(self) -> None:
        """
        A small file lands at files/ab/cd/<fid><ext> byte for byte, with its
        checksum, and nothing is left in tmp/.
        """
        data = os.urandom(4 * KiB)
        fid = new_fid()
        path = relpath_for(fid, "a.txt")
        upload = self.storage.open_upload(path)
        upload.write(data)
        self.assertEqual(upload.size, len(data))
        self.assertEqual(await upload.finish(sha(data), len(data)), (len(data), sha(data)))
        self.assertIs(upload.state, UploadState.DONE)
        self.assertEqual(
            self.listing("files"), [os.path.join("files", fid[:2], fid[2:4], fid + ".txt")]
        )
        self.assertEqual(self.listing("tmp"), [])
        self.assertEqual(self.readback(path), data)

    async def test_smallFileOneJob(self) -> None:
        """
        A file still wholly buffered at finish is created, written, fsynced
        and renamed in a single thread job: small files need one hop.
        """
        upload = self.storage.open_upload(relpath_for(new_fid(), "a"))
        for _ in range(4):
            upload.write(b"x" * KiB)
        before = self.pool.jobs
        await upload.finish(None)
        self.assertEqual(self.pool.jobs - before, 1)

    async def test_multiChunkRoundTrip(self) -> None:
        """
        5 MiB written in 64 KiB pieces goes through several append jobs and
        arrives intact; finish returns the computed size and checksum.
        """
        data = pattern(5 * MiB)
        path = relpath_for(new_fid(), "big.bin")
        upload = self.storage.open_upload(path)
        before = self.pool.jobs
        for i in range(0, len(data), 64 * KiB):
            upload.write(data[i : i + 64 * KiB])
        self.assertEqual(await upload.finish(None), (len(data), sha(data)))
        self.assertGreater(self.pool.jobs - before, 1)
        self.assertEqual(self.readback(path), data)
        self.assertEqual(self.listing("tmp"), [])

    async def test_emptyFile(self) -> None:
        """
        A zero-byte file is a file too.
        """
        path = relpath_for(new_fid(), "empty")
        upload = self.storage.open_upload(path)
        self.assertEqual(await upload.finish(sha(b""), 0), (0, sha(b"")))
        self.assertEqual(self.readback(path), b"")

    async def test_checksumMismatch(self) -> None:
        """
        Data that does not match the client's checksum is refused, for a
        buffered and a streamed file, and nothing remains anywhere.
        """
        for size in (3 * KiB, 3 * MiB):
            data = pattern(size)
            upload = self.storage.open_upload(relpath_for(new_fid(), "a.bin"))
            for i in range(0, size, 64 * KiB):
                upload.write(data[i : i + 64 * KiB])
            with self.assertRaises(ChecksumMismatch) as caught:
                await upload.finish(sha(data + b"!"))
            self.assertEqual(caught.exception.code, ErrorCode.CHECKSUM_MISMATCH)
            self.assertIs(upload.state, UploadState.ABORTED)
            self.assertNothingStored()
            await upload.abort()

    async def test_sizeMismatch(self) -> None:
        """
        Fewer bytes than announced is refused with SizeMismatch, even with a
        matching checksum, and nothing remains.
        """
        data = os.urandom(1000)
        upload = self.storage.open_upload(relpath_for(new_fid(), "a.bin"))
        upload.write(data)
        with self.assertRaises(SizeMismatch) as caught:
            await upload.finish(sha(data), 1001)
        self.assertEqual(caught.exception.code, ErrorCode.SIZE_MISMATCH)
        self.assertNothingStored()

    async def test_failedRename(self) -> None:
        """
        If publishing fails, the error comes back and the temp file goes.
        """

        def rename(src: str, dst: str) -> None:
            raise OSError(errno.EIO, "simulated I/O error")

        self.storage._rename = rename
        upload = self.storage.open_upload(relpath_for(new_fid(), "a.bin"))
        upload.write(pattern(2 * MiB))
        with self.assertRaises(OSError) as caught:
            await upload.finish(None)
        self.assertEqual(caught.exception.errno, errno.EIO)
        self.assertNothingStored()

    async def test_crashLeavesNothingVisible(self) -> None:
        """
        An upload cut short by a crash (data on disk, never finished) is
        invisible, and the next start() deletes it and any other leftovers.
        """
        upload = self.storage.open_upload(relpath_for(new_fid(), "a.bin"))
        upload.write(pattern(3 * MiB))
        await upload._whenIdle()
        self.assertEqual(len(self.listing("tmp")), 1)
        self.assertEqual(self.listing("files"), [])
        leftover = os.path.join(self.root, "tmp", "olddir")
        os.makedirs(os.path.join(leftover, "sub"))
        with open(os.path.join(leftover, "sub", "part"), "wb") as f:
            f.write(b"x")

        await Storage(self.root, reactor, self.pool).start()
        self.assertEqual(os.listdir(os.path.join(self.root, "tmp")), [])
        self.assertEqual(self.listing("files"), [])

    async def test_abort(self) -> None:
        """
        abort() deletes the temp file; a second abort is harmless; the
        upload then refuses writes and finish.
        """
        upload = self.storage.open_upload(relpath_for(new_fid(), "a.bin"))
        upload.write(pattern(2 * MiB))
        await upload._whenIdle()
        self.assertEqual(len(self.listing("tmp")), 1)
        await upload.abort()
        self.assertNothingStored()
        self.assertIs(upload.state, UploadState.ABORTED)
        await upload.abort()
        self.assertRaises(RuntimeError, upload.write, b"x")
        with self.assertRaises(RuntimeError):
            await upload.finish(None)

    async def test_abortWhileWriting(self) -> None:
        """
        Aborting while an append job runs waits for it, then deletes the
        file it created; concurrent aborts all wait.
        """
        upload = self.storage.open_upload(relpath_for(new_fid(), "a.bin"))
        upload.write(pattern(4 * MiB))
        first, second = upload.abort(), upload.abort()
        await first
        await second
        self.assertNothingStored()

    async def test_abortAfterFinish(self) -> None:
        """
        abort() once finished leaves the published file alone.
        """
        path = relpath_for(new_fid(), "a")
        upload = self.storage.open_upload(path)
        upload.write(b"data")
        finished = upload.finish(None)
        await upload.abort()
        await finished
        await upload.abort()
        self.assertEqual(self.readback(path), b"data")

    async def test_writeAfterFinish(self) -> None:
        """
        A finished upload takes no more bytes.
        """
        upload = self.storage.open_upload(relpath_for(new_fid(), "a"))
        upload.write(b"data")
        d = upload.finish(None)
        self.assertRaises(RuntimeError, upload.write, b"more")
        await d
        self.assertRaises(RuntimeError, upload.write, b"more")

    async def test_backpressure(self) -> None:
        """
        Past HIGH_WATER bytes waiting for the disk the producer is paused;
        once the appends drain below LOW_WATER it is resumed.
        """
        producer = FakeProducer()
        data = pattern(10 * MiB)
        step = 64 * KiB
        upload = self.storage.open_upload(relpath_for(new_fid(), "a.bin"))
        upload.registerProducer(producer, True)
        paused_at = None
        for i in range(0, len(data), step):
            upload.write(data[i : i + step])
            if producer.paused and paused_at is None:
                paused_at = upload.size
        # No thread job can complete while this loop runs on the reactor.
        self.assertEqual(paused_at, HIGH_WATER + step)
        self.assertEqual(producer.paused, 1)
        self.assertEqual(producer.resumes, 0)
        await producer.resumed
        self.assertEqual(producer.resumes, 1)
        self.assertLess(upload._pending(), LOW_WATER)
        upload.unregisterProducer()
        self.assertEqual(await upload.finish(sha(data)), (len(data), sha(data)))
        self.assertEqual(producer.paused, 1)
        self.assertEqual(producer.stopped, 0)

    async def test_finishResumesProducer(self) -> None:
        """
        A producer still paused when the upload ends is resumed: it is a
        connection that outlives the upload.
        """
        producer = FakeProducer()
        upload = self.storage.open_upload(relpath_for(new_fid(), "a.bin"))
        upload.registerProducer(producer, True)
        data = pattern(HIGH_WATER + MiB)
        upload.write(data)
        self.assertEqual(producer.paused, 1)
        await upload.finish(sha(data))
        self.assertEqual(producer.resumes, 1)

    async def test_registerWhileFull(self) -> None:
        """
        A producer registered when too much is already waiting is paused at
        once; unregistering it resumes it.
        """
        producer = FakeProducer()
        upload = self.storage.open_upload(relpath_for(new_fid(), "a.bin"))
        upload.write(pattern(HIGH_WATER + 1))
        upload.registerProducer(producer, True)
        self.assertEqual(producer.paused, 1)
        upload.unregisterProducer()
        self.assertEqual(producer.resumes, 1)
        await upload.abort()

    async def test_noSpaceFastPath(self) -> None:
        """
        A full disk while writing a small file gives NoSpace, and the temp
        file is deleted.
        """

        def write(fd: int, data: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.storage._write = write
        upload = self.storage.open_upload(relpath_for(new_fid(), "a.bin"))
        upload.write(b"x" * 100)
        with self.assertRaises(NoSpace) as caught:
            await upload.finish(None)
        self.assertEqual(caught.exception.code, ErrorCode.NO_SPACE)
        self.assertTrue(caught.exception.retryable)
        self.assertNothingStored()

    async def test_noSpaceWhileStreaming(self) -> None:
        """
        A full disk during a background append frees the temp file at once,
        makes the next write raise NoSpace, and fails finish with NoSpace.
        """
        writes = []

        def write(fd: int, data: Any) -> int:
            if writes:
                raise OSError(errno.ENOSPC, "No space left on device")
            writes.append(len(data))
            return os.write(fd, data)

        self.storage._write = write
        upload = self.storage.open_upload(relpath_for(new_fid(), "a.bin"))
        upload.write(pattern(3 * MiB))
        await upload._whenIdle()
        self.assertEqual(writes, [3 * MiB])
        upload.write(pattern(2 * MiB))
        await upload._whenIdle()
        self.assertNothingStored()
        self.assertRaises(NoSpace, upload.write, b"x")
        with self.assertRaises(NoSpace):
            await upload.finish(None)
        self.assertNothingStored()
        await upload.abort()

    async def test_otherWriteErrorRefusesWrites(self) -> None:
        """
        Any other append failure also deletes the temp file; later writes
        raise a KoboldFS error the protocol can report, and finish fails
        with the original error.
        """

        def write(fd: int, data: Any) -> int:
            raise OSError(errno.EIO, "simulated I/O error")

        self.storage._write = write
        upload = self.storage.open_upload(relpath_for(new_fid(), "a.bin"))
        upload.write(pattern(2 * MiB))
        await upload._whenIdle()
        self.assertNothingStored()
        with self.assertRaises(Exception) as caught:
            upload.write(b"x")
        self.assertEqual(caught.exception.code, ErrorCode.INTERNAL)
        with self.assertRaises(OSError):
            await upload.finish(None)

    async def test_tooLarge(self) -> None:
        """
        Passing max_size raises TOO_LARGE synchronously; exactly max_size is
        fine; the refused upload stores nothing.
        """
        path = relpath_for(new_fid(), "a.bin")
        upload = self.storage.open_upload(path, max_size=10)
        upload.write(b"12345678")
        with self.assertRaises(TooLarge) as caught:
            upload.write(b"abc")
        self.assertEqual(caught.exception.code, ErrorCode.TOO_LARGE)
        self.assertEqual(upload.size, 8)
        with self.assertRaises(TooLarge):
            await upload.finish(None)
        self.assertNothingStored()

        upload = self.storage.open_upload(path, max_size=10)
        upload.write(b"1234567890")
        self.assertEqual((await upload.finish(None))[0], 10)

    def test_errorCodesRoundTrip(self) -> None:
        """
        Clients turn the new error codes back into the same classes.
        """
        for cls, code in [
            (NoSpace, ErrorCode.NO_SPACE),
            (SizeMismatch, ErrorCode.SIZE_MISMATCH),
            (TooLarge, ErrorCode.TOO_LARGE),
            (CorruptReplica, ErrorCode.CORRUPT),
        ]:
            self.assertIsInstance(error_for_code(code, "m"), cls)


class ReaderTests(_StorageMixin, TestCase):
    """
    Reads come in large chunks, and a full read is verified.
    """

    async def read_all(self, reader: Any, n: int = CHUNK_SIZE) -> tuple[bytes, list[int]]:
        chunks = []
        while True:
            chunk = await reader.read(n)
            if not chunk:
                return b"".join(chunks), [len(c) for c in chunks]
            chunks.append(chunk)

    async def test_fullReadVerifies(self) -> None:
        """
        A sound file reads back whole, in CHUNK_SIZE chunks, checksum and all.
        """
        data = pattern(3 * MiB + 123)
        path = await self.store(data)
        reader = self.storage.open_read(path, expect_sha256=sha(data), expect_size=len(data))
        self.assertEqual(await reader.open(), len(data))
        self.assertEqual(reader.size, len(data))
        got, sizes = await self.read_all(reader)
        self.assertEqual(got, data)
        self.assertEqual(sizes, [CHUNK_SIZE] * 3 + [123])
        self.assertEqual(await reader.read(), b"")
        await reader.close()

    async def test_corruptNeverDeliveredWhole(self) -> None:
        """
        With one byte flipped, the chunk that would complete the file is
        replaced by CorruptReplica, wherever the damage is.
        """
        data = pattern(2 * MiB + 500)
        for where in (0, len(data) - 1):
            path = await self.store(data)
            with open(self.storage.abspath(path), "r+b") as f:
                f.seek(where)
                f.write(bytes([data[where] ^ 1]))
            reader = self.storage.open_read(path, expect_sha256=sha(data))
            await reader.open()
            delivered = 0
            with self.assertRaises(CorruptReplica) as caught:
                while await reader.read() != b"":
                    delivered += CHUNK_SIZE
            self.assertEqual(caught.exception.code, ErrorCode.CORRUPT)
            self.assertEqual(delivered, 2 * CHUNK_SIZE)
            with self.assertRaises(CorruptReplica):
                await reader.read()
            await reader.close()

    async def test_corruptSmallFile(self) -> None:
        """
        A corrupt one-chunk file yields no bytes at all.
        """
        path = await self.store(b"hello world")
        with open(self.storage.abspath(path), "wb") as f:
            f.write(b"hello World")
        reader = self.storage.open_read(path, expect_sha256=sha(b"hello world"))
        await reader.open()
        with self.assertRaises(CorruptReplica):
            await reader.read()
        await reader.close()

    async def test_wrongSize(self) -> None:
        """
        A file whose size on disk is not the recorded one is corrupt: at
        open with expect_size, at the end of a verified read otherwise.
        """
        data = pattern(MiB + 1)
        path = await self.store(data)
        os.truncate(self.storage.abspath(path), MiB)
        reader = self.storage.open_read(path, expect_size=len(data))
        with self.assertRaises(CorruptReplica):
            await reader.open()
        reader = self.storage.open_read(path, expect_sha256=sha(data))
        self.assertEqual(await reader.open(), MiB)
        with self.assertRaises(CorruptReplica):
            await self.read_all(reader)
        await reader.close()

    async def test_rangedRead(self) -> None:
        """
        offset and length select a slice; a length past the end stops at it.
        """
        data = pattern(3 * MiB)
        path = await self.store(data)
        for offset, length in [
            (5, 10),
            (MiB - 7, MiB + 100),
            (2 * MiB, None),
            (3 * MiB - 4, 99),
            (3 * MiB, None),
            (0, 0),
        ]:
            reader = self.storage.open_read(path, offset=offset, length=length)
            self.assertEqual(await reader.open(), len(data))
            got, _ = await self.read_all(reader, 256 * KiB)
            end = len(data) if length is None else offset + length
            self.assertEqual(got, data[offset:end])
            await reader.close()

    async def test_rangedReadRefusals(self) -> None:
        """
        A checksum cannot be checked on part of a file, and an offset past
        the end is an error, not silence.
        """
        data = pattern(1000)
        path = await self.store(data)
        self.assertRaises(ValueError, self.storage.open_read, path, 1, None, sha(data))
        self.assertRaises(ValueError, self.storage.open_read, path, -1)
        reader = self.storage.open_read(path, 0, 10, sha(data))
        with self.assertRaises(ValueError):
            await reader.open()
        reader = self.storage.open_read(path, offset=1001)
        with self.assertRaises(ValueError):
            await reader.open()

    async def test_missing(self) -> None:
        """
        A file absent from disk gives NotFound with the NOT_FOUND code.
        """
        reader = self.storage.open_read(relpath_for(new_fid(), "a.bin"))
        with self.assertRaises(NotFound) as caught:
            await reader.open()
        self.assertEqual(caught.exception.code, ErrorCode.NOT_FOUND)
        await reader.close()

    async def test_symlinkRefused(self) -> None:
        """
        A symlink where a stored file should be is not followed: whatever
        it points at was not published here.
        """
        secret = os.path.join(self.root, "secret")
        with open(secret, "wb") as f:
            f.write(b"not a stored file")
        path = relpath_for(new_fid(), "a.txt")
        os.makedirs(os.path.dirname(self.storage.abspath(path)))
        os.symlink(secret, self.storage.abspath(path))
        reader = self.storage.open_read(path)
        with self.assertRaises(CorruptReplica):
            await reader.open()
        await reader.close()

    async def test_readAfterClose(self) -> None:
        """
        A closed reader reads nothing more.
        """
        path = await self.store(b"abc")
        reader = self.storage.open_read(path)
        await reader.open()
        await reader.close()
        with self.assertRaises(RuntimeError):
            await reader.read()


class StorageTests(_StorageMixin, TestCase):
    """
    Layout, space reporting and file management.
    """

    def test_layout(self) -> None:
        """
        start() makes files/, private/, tmp/ and quarantine/.
        """
        for name in ("files", "private", "tmp", "quarantine"):
            self.assertTrue(os.path.isdir(os.path.join(self.root, name)))

    async def test_diskUsage(self) -> None:
        """
        Free and total space are reported in bytes, free within total.
        """
        free, total = await self.storage.disk_usage()
        self.assertGreater(total, 0)
        self.assertTrue(0 <= free <= total)

    def test_parseReserve(self) -> None:
        """
        A reserve is bytes, with a binary unit or none, or a percentage.
        """
        self.assertEqual(parse_reserve("2%"), (0, 0.02))
        self.assertEqual(parse_reserve("512M"), (512 << 20, 0.0))
        self.assertEqual(parse_reserve("1g"), (1 << 30, 0.0))
        self.assertEqual(parse_reserve("4096"), (4096, 0.0))
        self.assertEqual(parse_reserve("0"), (0, 0.0))
        for bad in ("", "%", "-1", "100%", "lots", "1X", "nan"):
            with self.assertRaises(ValueError) as caught:
                parse_reserve(bad)
            self.assertIn("--reserve", str(caught.exception))

    async def test_reserve(self) -> None:
        """
        An upload whose announced size would pass the reserve is refused at
        open; one of unknown size is stopped when it reaches it, and leaves
        no temp file; what uploads claim is given back when they end.
        """
        free, total = await self.storage.disk_usage()
        # Keep all but 3 MiB of what is free now.
        self.storage.set_reserve(str(free - 3 * MiB))
        await self.storage.refresh_space()
        room = self.storage.room
        assert room is not None
        self.assertLessEqual(abs(room - 3 * MiB), 1 * MiB)
        self.assertFalse(self.storage.full)
        with self.assertRaises(NoSpace) as caught:
            self.storage.open_upload(relpath_for(new_fid(), "a"), size=room + 1)
        self.assertIn("disk full", str(caught.exception))
        self.assertEqual(self.storage.claimed, 0)
        held = self.storage.open_upload(relpath_for(new_fid(), "b"), size=room - MiB)
        self.assertEqual(self.storage.claimed, room - MiB)
        growing = self.storage.open_upload(relpath_for(new_fid(), "c"))
        growing.write(b"x" * (MiB // 2))
        with self.assertRaises(NoSpace):
            growing.write(b"x" * MiB)
        with self.assertRaises(NoSpace):
            await growing.finish(None)
        self.assertEqual(os.listdir(os.path.join(self.root, "tmp")), [])
        await held.abort()
        self.assertEqual(self.storage.claimed, 0)
        self.assertEqual(self.storage.room, room)

    def test_full(self) -> None:
        """
        Less than FULL_ROOM above the reserve is full; before the first
        look at the disk, nothing is refused.
        """
        self.assertIsNone(self.storage.room)
        self.assertFalse(self.storage.full)
        self.storage.free, self.storage.reserve = 10 * MiB, 9 * MiB + 1
        self.assertTrue(self.storage.full)
        self.storage.reserve = 9 * MiB
        self.assertFalse(self.storage.full)

    async def test_existsAndRemove(self) -> None:
        """
        remove() deletes a file (True) and reports a missing one (False),
        leaving its directory in place.
        """
        path = await self.store(b"abc")
        self.assertTrue(await self.storage.exists(path))
        self.assertTrue(await self.storage.remove(path))
        self.assertFalse(await self.storage.exists(path))
        self.assertFalse(await self.storage.remove(path))
        self.assertTrue(os.path.isdir(os.path.dirname(self.storage.abspath(path))))

    async def test_finishElsewhere(self) -> None:
        """
        An upload can be published under another path than the one it was
        opened with, decided once its bytes are in.
        """
        fid = new_fid()
        upload = self.storage.open_upload(relpath_for(fid, "a.txt"))
        upload.write(b"abc")
        private = relpath_for(fid, "a.txt", private="ns")
        await upload.finish(sha(b"abc"), 3, private)
        self.assertEqual(self.listing("files"), [])
        self.assertEqual(self.listing("private"), [private])
        self.assertEqual(self.readback(private), b"abc")

    async def test_quarantine(self) -> None:
        """
        A bad replica moves out of the served tree into quarantine/, under
        its fid name; quarantining an absent file is no error.
        """
        fid = new_fid()
        path = relpath_for(fid, "x.PNG")
        upload = self.storage.open_upload(path)
        upload.write(b"bad bytes")
        await upload.finish(None)
        await self.storage.quarantine(path)
        self.assertEqual(self.listing("files"), [])
        self.assertEqual(self.listing("quarantine"), [os.path.join("quarantine", fid + ".png")])
        with open(os.path.join(self.root, "quarantine", fid + ".png"), "rb") as f:
            self.assertEqual(f.read(), b"bad bytes")
        await self.storage.quarantine(path)
        await self.storage.quarantine(relpath_for(new_fid(), "y"))

    async def test_quarantineAgain(self) -> None:
        """
        A copy of the same file set aside again keeps the ones before it.
        """
        fid = new_fid()
        path = relpath_for(fid, "x.txt")
        for n, body in enumerate((b"first", b"second", b"third")):
            upload = self.storage.open_upload(path)
            upload.write(body)
            await upload.finish(None)
            await self.storage.quarantine(path)
            self.assertEqual(len(self.listing("quarantine")), n + 1)
        kept = {}
        for name in ("", ".1", ".2"):
            with open(os.path.join(self.root, "quarantine", fid + ".txt" + name), "rb") as f:
                kept[name] = f.read()
        self.assertEqual(kept, {"": b"first", ".1": b"second", ".2": b"third"})
        self.assertEqual(self.listing("files"), [])

    def test_refusesForeignPaths(self) -> None:
        """
        File management refuses paths outside files/ before touching disk.
        """
        self.assertRaises(ValueError, self.storage.remove, "../etc/passwd")
        self.assertRaises(ValueError, self.storage.exists, "/etc/passwd")
        self.assertRaises(ValueError, self.storage.quarantine, "tmp/x")
        self.assertRaises(ValueError, self.storage.open_upload, "tmp/x")
        self.assertRaises(ValueError, self.storage.open_read, "files/../../x")
