"""
How a metadata operation is written once for every database: as a unit.

A unit (of work) is a generator that yields L{Query}s, is sent back an
L{Outcome} for each, and returns its result (C{StopIteration.value}); the
store runs each unit in one database transaction.  A generator that is
only a part of units, run with C{yield from}, is a step.  The word
"transaction" alone is kept for client transactions
(L{koboldfs.metadata.txnstore}).  A unit does no I/O and knows no engine
or dialect, so the SQLite store (L{koboldfs.metadata.sqlstore}) and the
PostgreSQL one run the same code.

Each query is a SQLAlchemy Core statement built once, at import, with
C{bindparam()}s, and the values of this run: building and compiling a
statement costs more than running it, so drivers may compile each once and
keep it (both stores do, by identity: L{koboldfs.metadata.compiled}).
Parameters are named C{b_...}, never after a column: SQLAlchemy would take
a parameter named after a column for a value to set in an INSERT or
UPDATE.

The driver contract:

  - Run each unit in one database transaction: begin, drive the
    generator with L{drive} (or an asynchronous loop doing the same: first
    C{next(gen)}, then C{gen.send(outcome)} until C{StopIteration}), commit.
  - Begin writers (C{work.writes}) so that they hold the write lock from the
    start: C{BEGIN IMMEDIATE} on SQLite.
  - On an integrity error (a unique index lost a race with another writer),
    roll back and run the whole unit again from a fresh generator,
    C{work()}, up to L{ATTEMPTS} runs in all: the next run sees the
    winner's rows.  An integrity error that persists is a bug, and is let
    through.  Errors raised by the generator itself (L{ValueError},
    L{NewerSchema<koboldfs.metadata.schema.NewerSchema>}) are final.

Drivers are given a L{Work}: a zero-argument factory of fresh generators
that also tells whether the unit writes.  The units live with the
statements they run, by what they work on: L{schema<koboldfs.metadata.schema>},
L{namespaces<koboldfs.metadata.namespaces>}, L{servers<koboldfs.metadata.servers>},
L{files<koboldfs.metadata.files>}, L{sweeps<koboldfs.metadata.sweeps>},
L{health<koboldfs.metadata.health>}, L{keys<koboldfs.metadata.keys>} and
L{txnstore<koboldfs.metadata.txnstore>}.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Generator, Generic, Iterable, Mapping, NamedTuple, TypeVar

from sqlalchemy import Column
from sqlalchemy.sql.base import Executable

T = TypeVar("T")
R = TypeVar("R")

#: Runs of a unit that keeps losing races on a unique index before
#: its integrity error is let through.
ATTEMPTS = 5


class Query(NamedTuple):
    """
    One statement to execute: a shape built once, and this run's values
    for its parameters.
    """

    statement: Executable
    params: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class Outcome:
    """
    What executing one statement gave: its rows (empty for statements that
    return none) and the driver's row count (-1 where it has none).
    """

    rows: list[tuple]
    rowcount: int


#: A unit returning a T.
Unit = Generator[Query, Outcome, T]


def reader(unit: Callable[..., Unit[T]]) -> Callable[..., Unit[T]]:
    """
    Mark C{unit} as a unit that only reads.
    """
    unit.writes = False  # type: ignore[attr-defined]
    return unit


def writer(unit: Callable[..., Unit[T]]) -> Callable[..., Unit[T]]:
    """
    Mark C{unit} as a unit that writes, which drivers begin by taking the
    write lock so that it never fails upgrading a read lock.
    """
    unit.writes = True  # type: ignore[attr-defined]
    return unit


@dataclass(frozen=True)
class Work(Generic[T]):
    """
    One unit to run with its arguments: call it for a fresh generator, as
    many times as the driver retries.
    """

    unit: Callable[..., Unit[T]]
    args: tuple[Any, ...] = ()

    @property
    def writes(self) -> bool:
        """
        Whether the unit writes (every unit is marked with L{reader} or
        L{writer}; an unmarked one fails here, not silently).
        """
        return self.unit.writes  # type: ignore[attr-defined,no-any-return]

    def __call__(self) -> Unit[T]:
        return self.unit(*self.args)


def drive(unit: Unit[T], execute: Callable[[Query], Outcome]) -> T:
    """
    Run unit C{unit} synchronously, executing each query it yields with
    C{execute}; return its result.  If C{execute} raises, the
    generator is closed and the error propagates, for the driver to roll
    back (and maybe retry).
    """
    try:
        query = next(unit)
        while True:
            query = unit.send(execute(query))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    finally:
        unit.close()


def record(cls: type[R], columns: Iterable[Column[Any]], row: tuple) -> R:
    """
    Build record C{cls} from a row of C{columns}, matched by name.
    """
    return cls(**{column.key: value for column, value in zip(columns, row, strict=True)})
