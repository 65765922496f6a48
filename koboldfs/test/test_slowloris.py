"""
Slow and silent clients against a real server process: they are dropped by
the handshake and frame timeouts, and while they are held they cost a
normal client no latency.
"""

from __future__ import annotations

import resource
import socket
import time

from twisted.internet import defer, threads
from twisted.internet.task import LoopingCall
from twisted.trial.unittest import TestCase

from koboldfs.errors import ErrorCode
from koboldfs.protocol import VERSION, FrameDecoder, Op, encode_message
from koboldfs.test.cluster import ClusterMixin, ServerProcess
from koboldfs.test.support import sleep

HELLO = encode_message(Op.HELLO, {"versions": [VERSION]})
PING = encode_message(Op.PING)
IDLE_CONNECTIONS = 500
#: Pings per measurement: enough for a p99 of 30 samples.
PINGS = 3000
#: Longest a measurement may take.
MAX_SECONDS = 60


def raise_fd_limit(needed: int) -> None:
    """
    Raise this process's soft limit on open files (which the servers it
    starts inherit) to at least C{needed}.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise RuntimeError(f"this test needs {needed} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def connect(server: ServerProcess) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_frames(s: socket.socket, decoder: FrameDecoder) -> list:
    """
    Read until at least one frame arrives, or EOF (an empty list).
    """
    while True:
        data = s.recv(65536)
        if not data:
            return []
        frames = decoder.feed(data)
        if frames:
            return frames


def ping_latencies(server: ServerProcess, count: int, least_seconds: float = 0.0) -> list[float]:
    """
    Round trips of C{count} PINGs (more, until C{least_seconds} passed) on
    one connection, from a plain blocking socket: run it in a thread.
    """
    s = connect(server)
    try:
        decoder = FrameDecoder()
        s.sendall(HELLO)
        assert read_frames(s, decoder)[0].op is Op.WELCOME
        times = []
        start = time.perf_counter()
        while len(times) < count or time.perf_counter() - start < least_seconds:
            if time.perf_counter() - start > MAX_SECONDS:
                break  # a server this slow fails the test: say so, do not hang
            before = time.perf_counter()
            s.sendall(PING)
            [ok] = read_frames(s, decoder)
            times.append(time.perf_counter() - before)
            assert ok.op is Op.OK, ok
        return times
    finally:
        s.close()


def p99(times: list[float]) -> float:
    return sorted(times)[int(len(times) * 0.99)]


def still_open(s: socket.socket) -> bool:
    """
    Whether the server has neither written to nor closed C{s}.
    """
    s.setblocking(False)
    try:
        return not s.recv(1)
    except BlockingIOError:
        return True
    except OSError:
        return False


class SlowlorisTests(ClusterMixin, TestCase):
    timeout = 180

    def test_idleConnectionsCostNothing(self) -> defer.Deferred[None]:
        """
        500 connections that say nothing and one that sends a byte a second
        do not raise a normal client's p99 ping latency past twice its
        unloaded value (or 20 ms, whichever is more: on a loaded machine
        scheduling alone moves a p99 by some milliseconds; a server blocked
        by its idle connections would take far longer).
        """

        async def run() -> None:
            raise_fd_limit(4 * IDLE_CONNECTIONS + 256)
            server = await self.startServer(
                "s",
                extra=(
                    "--handshake-timeout=300",
                    "--frame-timeout=300",
                    f"--max-connections={IDLE_CONNECTIONS * 2}",
                    f"--max-connections-per-ip={IDLE_CONNECTIONS * 2}",
                ),
            )
            await threads.deferToThread(ping_latencies, server, 200)  # warm up
            unloaded = await threads.deferToThread(ping_latencies, server, PINGS, 5.0)
            idle = await threads.deferToThread(
                lambda: [connect(server) for _ in range(IDLE_CONNECTIONS)]
            )
            self.addCleanup(lambda: [s.close() for s in idle])
            slow = connect(server)
            self.addCleanup(slow.close)
            slow_bytes = iter(HELLO + encode_message(Op.STAT, {"ns": "t", "key": "k" * 900}))
            trickle = LoopingCall(lambda: slow.send(bytes([next(slow_bytes)])))
            trickle.start(1.0)
            self.addCleanup(lambda: trickle.running and trickle.stop())
            await sleep(1)
            loaded = await threads.deferToThread(ping_latencies, server, PINGS, 5.0)
            trickle.stop()
            self.assertTrue(still_open(slow), "the slow client was dropped too early")
            dropped = sum(not still_open(s) for s in idle)
            self.assertEqual(dropped, 0, "idle connections were not all held")
            self.assertGreaterEqual(
                len(loaded), PINGS, f"only {len(loaded)} pings in {MAX_SECONDS} s under load"
            )
            before, after = p99(unloaded), p99(loaded)
            limit = max(2 * before, 0.020)
            self.assertLessEqual(
                after,
                limit,
                f"p99 {after * 1000:.2f} ms with {IDLE_CONNECTIONS} idle connections, "
                f"{before * 1000:.2f} ms without",
            )

        return defer.ensureDeferred(run())

    def test_silentAndSlowDropped(self) -> defer.Deferred[None]:
        """
        A connection that says nothing is dropped after the handshake
        timeout, one trickling a frame after the frame timeout, each told
        why; the server goes on serving.
        """

        async def run() -> None:
            server = await self.startServer(
                "s", extra=("--handshake-timeout=1", "--frame-timeout=2")
            )

            def silent() -> tuple[list, float]:
                s = connect(server)
                start = time.monotonic()
                try:
                    frames = read_frames(s, FrameDecoder())
                    return frames, time.monotonic() - start
                finally:
                    s.close()

            def trickling() -> tuple[list, float]:
                s = connect(server)
                decoder = FrameDecoder()
                try:
                    s.sendall(HELLO)
                    assert read_frames(s, decoder)[0].op is Op.WELCOME
                    start = time.monotonic()
                    s.settimeout(0.5)
                    for byte in encode_message(Op.STAT, {"ns": "t", "key": "k" * 100}):
                        s.send(bytes([byte]))
                        try:
                            frames = read_frames(s, decoder)
                        except socket.timeout:
                            continue
                        return frames, time.monotonic() - start
                    return [], time.monotonic() - start
                finally:
                    s.close()

            for check, seconds, what in ((silent, 1, "handshake"), (trickling, 2, "frame")):
                frames, took = await threads.deferToThread(check)
                self.assertEqual(frames[0]["code"], ErrorCode.TIMEOUT, what)
                self.assertIn(what, frames[0]["message"])
                self.assertGreaterEqual(took, seconds * 0.9)
                self.assertLess(took, seconds + 20)
            self.assertEqual(len(await threads.deferToThread(ping_latencies, server, 5)), 5)

        return defer.ensureDeferred(run())
