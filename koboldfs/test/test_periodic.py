"""
Tests of the periodic runner (L{koboldfs.periodic}) on a L{task.Clock}.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from koboldfs.errors import ErrorCode, Unavailable
from koboldfs.periodic import Periodic


class PeriodicTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_errors_logged_loop_goes_on(self) -> None:
        """
        A run that raises a bug is logged with its traceback, one that
        fails with a L{KoboldError} (the database is down) as a warning;
        either way the next run comes on time, and a failed run fires with
        the default.
        """
        outcomes = [RuntimeError("a bug"), Unavailable(ErrorCode.UNAVAILABLE, "db down"), 7]
        calls = []

        def work() -> int:
            calls.append(self.clock.seconds())
            outcome = outcomes[len(calls) - 1]
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

        periodic = Periodic("a sweep", work, 10, self.clock, default=-1)
        periodic.startService()
        self.clock.advance(10)
        self.clock.advance(10)
        self.assertEqual(calls, [0, 10, 20])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        warnings = [e for e in self.events if e.get("log_level") == LogLevel.warn]
        self.assertEqual([str(e["error"]) for e in warnings], [str(outcomes[1])])
        self.assertEqual(warnings[0]["what"], "a sweep")
        self.assertEqual(self.successResultOf(periodic.run()), -1)  # past the list: IndexError
        self.assertEqual(len(self.flushLoggedErrors(IndexError)), 1)
        self.successResultOf(periodic.stopService())
        self.clock.advance(100)
        self.assertEqual(len(calls), 4)

    def test_not_now(self) -> None:
        """
        With C{now=False} the first run is one interval after start.
        """
        calls = []
        periodic = Periodic("a beat", lambda: calls.append(1), 5, self.clock, now=False)
        periodic.startService()
        self.assertEqual(calls, [])
        self.clock.advance(5)
        self.assertEqual(calls, [1])
        periodic.stopService()

    def test_join_and_stop_waits(self) -> None:
        """
        A run asked for while one is under way joins it, and stopping
        fires only once it is over; no run overlaps another.
        """
        running: list[Deferred[str]] = []

        def work() -> Deferred[str]:
            running.append(Deferred())
            return running[-1]

        periodic = Periodic("a slow sweep", work, 1, self.clock)
        periodic.startService()
        joined = periodic.run()
        self.clock.advance(5)
        self.assertEqual(len(running), 1)
        stopped = periodic.stopService()
        self.assertNoResult(stopped)
        running[0].callback("done")
        self.assertEqual(self.successResultOf(joined), "done")
        self.successResultOf(stopped)
        self.assertFalse(periodic.running)
