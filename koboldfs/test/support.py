"""
Helpers the tests share to wait on real processes and sockets, written once:
a free port, a pause, and waiting for a condition instead of sleeping for
it.  They run on the global reactor, as the end-to-end tests do.
"""

from __future__ import annotations

import socket
from typing import Any, Awaitable, Callable, TypeVar

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

from koboldfs.errors import Unavailable

T = TypeVar("T")


def free_port() -> int:
    """
    A loopback port nobody listens on now (for an instant at least).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sleep(seconds: float) -> defer.Deferred[None]:
    """
    Let the reactor run for a while: between two polls of a real process,
    never in place of waiting for what the test needs.
    """
    return deferLater(reactor, seconds, lambda: None)


def eventually(
    check: Callable[[], Any], timeout: float = 20.0, what: str = "condition"
) -> defer.Deferred[None]:
    """
    Fire once C{check()} (a value or a Deferred of one) is true, polling a
    real process's state every tenth of a second.

    @raise AssertionError: still false after C{timeout} seconds; the
        message names C{what} was awaited.
    """

    async def wait() -> None:
        deadline = reactor.seconds() + timeout
        while not await defer.maybeDeferred(check):
            if reactor.seconds() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await sleep(0.1)

    return defer.ensureDeferred(wait())


def until_available(call: Callable[[], Awaitable[T]], timeout: float = 30.0) -> defer.Deferred[T]:
    """
    Fire with C{call()}'s result, calling again while it fails with
    L{Unavailable}: a metadata store or a server reconnects on its own
    schedule.
    """

    async def wait() -> T:
        deadline = reactor.seconds() + timeout
        while True:
            try:
                return await call()
            except Unavailable:
                if reactor.seconds() > deadline:
                    raise
                await sleep(0.1)

    return defer.ensureDeferred(wait())
