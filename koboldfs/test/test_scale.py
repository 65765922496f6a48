"""
benchmarks/scale.py's bulk load against real puts: the rows it loads must
be the rows the store writes, or its figures would measure another
database.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from koboldfs.metadata.pgstore import PostgresStore
from koboldfs.metadata.schema import metadata
from koboldfs.test.pgcluster import PostgresMixin

_POSTGRES_URL = os.environ.get("KOBOLDFS_TEST_POSTGRES_URL")
_BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")


def _scale() -> Any:
    """
    benchmarks/scale.py as a module (benchmarks/ is no package).
    """
    sys.path.insert(0, os.path.abspath(_BENCHMARKS))
    try:
        if "scale" not in sys.modules:
            spec = importlib.util.spec_from_file_location(
                "scale", os.path.join(_BENCHMARKS, "scale.py")
            )
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            # Registered first: dataclasses look their module up.
            sys.modules["scale"] = module
            spec.loader.exec_module(module)
        return sys.modules["scale"]
    finally:
        sys.path.remove(os.path.abspath(_BENCHMARKS))


def _dump(url: str) -> dict[str, list[tuple]]:
    """
    Every row of every table of the schema, in a stable order, and the
    next file id.
    """
    import psycopg2

    conn = psycopg2.connect(url)
    try:
        cursor = conn.cursor()
        tables: dict[str, list[tuple]] = {}
        for table in metadata.sorted_tables:
            columns = ", ".join(f'"{c.name}"' for c in table.columns)
            cursor.execute(f'SELECT {columns} FROM "{table.name}" ORDER BY {columns}')
            tables[table.name] = cursor.fetchall()
        cursor.execute("SELECT last_value FROM files_id_seq")
        tables["files_id_seq"] = cursor.fetchall()
        return tables
    finally:
        conn.close()


class BulkLoadTests(PostgresMixin, unittest.TestCase):
    """
    The loader of benchmarks/scale.py, and real puts through a
    L{PostgresStore}, fill two databases alike.
    """

    if _POSTGRES_URL is None:
        skip = "no PostgreSQL: set KOBOLDFS_TEST_POSTGRES_URL"

    #: More than the namespaces, and churn's deletes and quarantine in it.
    FILES = 57

    async def _realPuts(self, url: str, scale: Any) -> None:
        store = PostgresStore(url, reactor)
        await store.start()
        try:
            for name in scale.HOLDERS:
                await store.register_server(scale.server_info(name))
            for i in range(1, self.FILES + 1):
                spec = scale.file_spec(i)
                await store.add_file(
                    spec["namespace"],
                    spec["key"],
                    spec["fid"],
                    spec["path"],
                    spec["size"],
                    spec["sha256"],
                    spec["created"],
                    scale.HOLDERS[0],
                    scale.HOLDERS[1:],
                )
            for i in range(1, self.FILES // 2 + 1):
                await store.add_replica(i, scale.NEW_SERVER, scale.file_spec(i)["created"])
            deletes, (quarantined, server) = scale.churn(self.FILES)
            for namespace, key, when in deletes:
                self.assertTrue(await store.delete(namespace, key, when))
            self.assertTrue(await store.quarantine_replica(quarantined, server))
        finally:
            await store.stop()

    def _bulk(self, url: str, scale: Any) -> None:
        scale.load(url, self.FILES)
        db = scale.Sync(url)
        try:
            scale.do_churn(db, self.FILES)
        finally:
            db.close()

    async def _compare(self) -> None:
        assert _POSTGRES_URL is not None
        scale = _scale()
        real = await self.freshDatabase(_POSTGRES_URL)
        bulk = await self.freshDatabase(_POSTGRES_URL)
        await self._realPuts(real, scale)
        await deferToThread(self._bulk, bulk, scale)
        written, loaded = await deferToThread(lambda: (_dump(real), _dump(bulk)))
        self.assertEqual(len(written["files"]), self.FILES)
        self.assertEqual(len(written["replicas"]), 2 * self.FILES + self.FILES // 2)
        self.assertEqual(
            sorted(name for name, rows in written.items() if rows),
            sorted(name for name, rows in loaded.items() if rows),
        )
        for name in written:
            self.assertEqual(written[name], loaded[name], f"table {name} differs")

    def test_loadedAsPut(self) -> Any:
        """
        Every table's rows, and the next file id, are the same after the
        bulk load as after real puts of the same files, deletes and a
        quarantined copy included.
        """
        return ensureDeferred(self._compare())
