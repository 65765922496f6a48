"""
Statements compiled once for a DB-API driver, run on its cursor without
SQLAlchemy's execution machinery: the PostgreSQL store runs them through
txpostgres, the SQLite store on sqlite3's own cursor.
"""

from __future__ import annotations

from itertools import zip_longest
from typing import Any, Callable, Mapping

from sqlalchemy.engine import Dialect
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.compiler import SQLCompiler


class Shape:
    """
    A statement compiled for one DB-API driver (C{dialect}), with what
    running it again on that driver's cursor needs: compiling, and
    SQLAlchemy's execution around each statement, cost more than running
    it, and queries are built once (L{units}), so each is compiled once.
    The dialect must use a named paramstyle (psycopg2's C{%(name)s},
    sqlite3's C{:name}).
    """

    def __init__(self, statement: Executable, dialect: Dialect) -> None:
        self._dialect = dialect
        compiled = statement.compile(dialect=dialect)
        self.sql: str = compiled.string
        #: The values of parameters fixed in the statement.
        self.constants: dict[str, Any] = {}
        self.processors: dict[str, Callable[[Any], Any]] = {}
        self.escaped: Mapping[str, str] = {}
        # DDL has no parameters, but is run with a dict all the same: then
        # psycopg2 takes the "%%" it compiles to for "%", as in the rest.
        if isinstance(compiled, SQLCompiler):
            if compiled.post_compile_params or compiled.literal_execute_params:
                raise TypeError(f"expanding parameters are not supported: {self.sql}")
            self.constants = {
                name: bind.effective_value
                for bind, name in compiled.bind_names.items()
                if not bind.required
            }
            # Columns given no value take their Python-side default, which
            # SQLAlchemy's execution would fill in at each run.
            prefetch = [(column, column.default) for column in compiled.insert_prefetch]
            prefetch += [(column, column.onupdate) for column in compiled.update_prefetch]
            for column, default in prefetch:
                if not (default is not None and default.is_scalar):
                    raise TypeError(f"only constant Python-side defaults are supported: {column}")
                self.constants[column.key] = default.arg
            self.processors = dict(compiled._bind_processors)
            self.escaped = compiled.escaped_bind_names
        self._columns = getattr(statement, "exported_columns", ())
        #: Each result column's processor, found at the first result.
        self._results: list[Callable[[Any], Any] | None] | None = None

    def params(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """
        The parameters the driver runs this statement with, given C{values},
        converted by their types' bind processors as SQLAlchemy would.
        """
        params = {**self.constants, **values}
        for name, process in self.processors.items():
            params[name] = process(params[name])
        if self.escaped:
            params = {self.escaped.get(name, name): value for name, value in params.items()}
        return params

    def rows(self, cursor: Any) -> list[tuple]:
        """
        The rows C{cursor} fetched for this statement as tuples, each value
        converted by its column type's result processor, as SQLAlchemy does
        (drivers give most types as they are).
        """
        if cursor.description is None:
            return []
        rows = cursor.fetchall()
        if self._results is None:
            processors = [
                column.type.dialect_impl(self._dialect).result_processor(
                    self._dialect, described[1]
                )
                for column, described in zip(self._columns, cursor.description, strict=False)
            ]
            self._results = processors if any(processors) else []
        if not self._results:
            return rows  # type: ignore[no-any-return]
        return [
            tuple(
                value if process is None else process(value)
                for process, value in zip_longest(self._results, row)
            )
            for row in rows
        ]


#: Statements compiled, by identity and dialect.  Queries are built once,
#: so this holds a few dozen; the bound only guards against one built per
#: call.
_SHAPES: dict[tuple[Executable, int], Shape] = {}
_SHAPES_MAX = 500


def shape_for(statement: Executable, dialect: Dialect) -> Shape:
    """
    C{statement} compiled for C{dialect}, once.
    """
    key = (statement, id(dialect))
    shape = _SHAPES.get(key)
    if shape is None:
        shape = Shape(statement, dialect)
        if len(_SHAPES) >= _SHAPES_MAX:
            _SHAPES.clear()
        _SHAPES[key] = shape
    return shape
