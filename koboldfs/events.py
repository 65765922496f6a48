"""
A small callback registry, passed to the parts that call it and to those
that listen, so that no part is patched into another after construction.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from twisted.logger import Logger

log = Logger()

T = TypeVar("T")


class Listeners(Generic[T]):
    """
    Callables told of one kind of event, in the order they were added.

    A listener that raises is logged, and the others are still told: the
    caller of an event is never failed by someone listening to it.
    """

    def __init__(self) -> None:
        self._listeners: list[Callable[[T], None]] = []

    def add(self, listener: Callable[[T], None]) -> Callable[[], None]:
        """
        Tell C{listener} of every event from now on; return the callable
        that stops it.
        """
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    def __call__(self, event: T) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.failure("listener {listener!r} failed", listener=listener)
