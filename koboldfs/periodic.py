"""
Background work that must never stop on its first error.

L{logged} runs one piece of work (a sweep, a poll, a heartbeat) and logs
its failure instead of raising it: a L{KoboldError} (the metadata database
is down, a peer is gone) as one warning line, anything else (a bug) with
its traceback.  L{Periodic} is a service that runs a piece of work through
it every C{interval} seconds on a C{LoopingCall} whose clock is passed in,
so that one failure never ends the loop and tests drive it with
C{task.Clock}.  Every periodic part of the server is one, or paces itself
and guards each step with L{logged}.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from koboldfs.errors import KoboldError

log = Logger()

T = TypeVar("T")
D = TypeVar("D")


async def logged(what: str, work: Callable[[], Awaitable[T]], default: D) -> T | D:
    """
    Run C{work} and return its result, or log why it failed and return
    C{default}.  A cancellation (the service stopping) is not a failure:
    it is raised.

    @param what: the work, for the log: C{"orphan sweep on a1"}.
    """
    try:
        return await work()
    except CancelledError:
        raise
    except KoboldError as e:
        # Expected trouble (the database is down): one line, no traceback.
        log.warn("{what} failed: {error}", what=what, error=e)
    except Exception:
        log.failure("{what} failed", what=what)
    return default


class Periodic(Service):
    """
    Runs C{work} every C{interval} seconds while the service runs, through
    L{logged}.  A run still under way when the next is due is not doubled:
    the loop waits for it (C{LoopingCall}'s rule), and L{run} joins it.
    """

    def __init__(
        self,
        what: str,
        work: Callable[[], Awaitable[Any] | Any],
        interval: float,
        clock: Any,
        now: bool = True,
        default: Any = None,
    ) -> None:
        """
        @param clock: provides C{IReactorTime}.
        @param now: run at start too, not only C{interval} seconds later.
        @param default: what a failed run fires with.
        """
        self.what = what
        self._work = work
        self.interval = interval
        self._now = now
        self._default = default
        self._loop = LoopingCall(self.run)
        self._loop.clock = clock
        self._running: Deferred[Any] | None = None

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=self._now)

    def stopService(self) -> Deferred[Any]:
        """
        Start no more runs; fire once the run under way is over.
        """
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        running = self._running
        return succeed(None) if running is None else _chained(running)

    def run(self) -> Deferred[Any]:
        """
        Run now, or join the run under way; fire with its result (the
        default if it failed).  Never fails.
        """
        if self._running is not None:
            return _chained(self._running)
        d: Deferred[Any] = Deferred.fromCoroutine(
            logged(self.what, lambda: maybeDeferred(self._work), self._default)
        )
        if d.called:
            return d
        self._running = d

        def done(result: Any) -> Any:
            self._running = None
            return result

        d.addBoth(done)
        return _chained(d)


def _chained(d: Deferred[Any]) -> Deferred[Any]:
    """
    A new Deferred with C{d}'s result, leaving C{d}'s own chain alone.
    """
    out: Deferred[Any] = Deferred()

    def passOn(result: Any) -> Any:
        out.callback(result)
        return result

    d.addBoth(passOn)
    return out
