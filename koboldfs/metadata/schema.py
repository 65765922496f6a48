"""
The metadata schema, defined once with SQLAlchemy Core for every database,
and L{create_schema}, the unit that creates or upgrades it.

Times are seconds since the epoch as floats (the reactor's clock), which
every database stores alike.  Keys sort in code-point order: SQLite's
default BINARY collation, and collation "C" on PostgreSQL.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    false,
    insert,
    select,
)
from sqlalchemy.schema import CreateIndex, CreateTable, ExecutableDDLElement

from koboldfs.metadata.units import Query, Unit, writer

#: Bumped with every change to the tables below; the store upgrades older
#: schemas at start.
SCHEMA_VERSION = 1

#: A 64-bit id that still autoincrements on SQLite (only INTEGER does there).
BigId = BigInteger().with_variant(Integer(), "sqlite")
KeyText = Text().with_variant(Text(collation="C"), "postgresql")

metadata = MetaData()

schema_version = Table(
    "kobold_schema",
    metadata,
    Column("version", Integer, nullable=False),
)
# Servers starting at once on an empty database both insert the version:
# the loser's integrity error makes its driver retry, and find the row.
Index("kobold_schema_version", schema_version.c.version, unique=True)

namespaces = Table(
    "namespaces",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("created", Float, nullable=False),
    Column("replicas", Integer),
    Column("min_copies", Integer),
    Column("url_template", Text),
    # A private namespace's files are served only by signed URLs, made with
    # its secret (docs/http.md).
    Column("private", Boolean, nullable=False, default=False, server_default=false()),
    Column("secret", Text),
)

files = Table(
    "files",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("fid", String(32), nullable=False, unique=True),
    Column("namespace_id", Integer, ForeignKey("namespaces.id"), nullable=False),
    Column("key", KeyText, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("created", Float, nullable=False),
    Column("path", Text, nullable=False),
    # live | deleted | pending (uploaded inside a transaction not yet
    # committed: invisible to readers, see the transactions table)
    Column("state", String(16), nullable=False),
    Column("deleted", Float),
    # Ids are never reused, even after the newest file is purged: the
    # replicator's cursor walks them in order.
    sqlite_autoincrement=True,
)

# One live version per key; deleted versions wait for the replicator.
Index(
    "files_live_key",
    files.c.namespace_id,
    files.c.key,
    unique=True,
    sqlite_where=files.c.state == "live",
    postgresql_where=files.c.state == "live",
)
Index("files_state_id", files.c.state, files.c.id)

replicas = Table(
    "replicas",
    metadata,
    Column("file_id", BigId, ForeignKey("files.id"), primary_key=True),
    Column("server", String(64), primary_key=True),
    # ok | quarantined
    Column("state", String(16), nullable=False),
    Column("created", Float, nullable=False),
)
Index("replicas_server_file", replicas.c.server, replicas.c.file_id)

# Client keys of a namespace (docs/security.md): only SHA-256 of the
# client's derived key is kept, never the key.  Added after version 1
# without a version bump: create_schema makes missing tables on every start,
# and older servers ignore it.
client_keys = Table(
    "client_keys",
    metadata,
    Column("key_id", String(32), primary_key=True),
    Column("namespace_id", Integer, ForeignKey("namespaces.id"), nullable=False),
    Column("stored_key", String(64), nullable=False),
    Column("readonly", Boolean, nullable=False),
    Column("created", Float, nullable=False),
)
Index("client_keys_namespace", client_keys.c.namespace_id)

servers = Table(
    "servers",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("address", String(255), nullable=False),
    Column("public_url", Text, nullable=False),
    # alive | readonly | drain | dead
    Column("state", String(16), nullable=False),
    Column("heartbeat", Float, nullable=False),
    Column("disk_free", BigInteger, nullable=False),
    Column("disk_total", BigInteger, nullable=False),
)

# Client transactions (docs/transactions.md): what they will publish or
# delete at commit.  Kept here, not in memory, so that any server can
# finish a transaction that another server prepared, and collect those that
# a vanished client left behind.
transactions = Table(
    "transactions",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("namespace_id", Integer, ForeignKey("namespaces.id"), nullable=False),
    # open | prepared | committed
    Column("state", String(16), nullable=False),
    Column("created", Float, nullable=False),
    # When the servers may abort it (open, prepared) or forget it (committed).
    Column("expires", Float, nullable=False),
)
Index("transactions_expires", transactions.c.expires)

txn_keys = Table(
    "txn_keys",
    metadata,
    Column("txn_id", String(32), ForeignKey("transactions.id"), primary_key=True),
    Column("key", KeyText, primary_key=True),
    # The pending file to publish under the key, or NULL to delete it.
    Column("file_id", BigId, ForeignKey("files.id")),
    # The server that vouched for the pending copy at PREPARE, or NULL.
    Column("voted", String(64)),
)


class NewerSchema(RuntimeError):
    """
    The database was created or upgraded by a newer KoboldFS: this code
    does not know its tables, so it must not touch them.
    """


def schema_ddl() -> list[ExecutableDDLElement]:
    """
    The statements that create every table and index that does not exist
    yet, tables in dependency order, each followed by its indexes.
    """
    ddl: list[ExecutableDDLElement] = []
    for table in metadata.sorted_tables:
        ddl.append(CreateTable(table, if_not_exists=True))
        for index in sorted(table.indexes, key=lambda index: str(index.name)):
            ddl.append(CreateIndex(index, if_not_exists=True))
    return ddl


_VERSION_TABLE = CreateTable(schema_version, if_not_exists=True)
_SCHEMA_DDL = tuple(Query(statement) for statement in schema_ddl())
_STORED_VERSION = select(schema_version.c.version)
_INSERT_VERSION = insert(schema_version).values(version=SCHEMA_VERSION)


@writer
def create_schema() -> Unit[int]:
    """
    Create the schema where missing and record its version; return the
    stored version.  Idempotent, and safe when several servers start at
    once: SQLite serializes writers, and a PostgreSQL catalog race fails
    with an integrity error, which drivers retry.

    @raise NewerSchema: the database's schema is newer than this code.
    """
    # The version table first, so that a newer schema is refused before
    # this code creates anything in it.
    yield Query(_VERSION_TABLE)
    out = yield Query(_STORED_VERSION)
    stored = max((row[0] for row in out.rows), default=None)
    if stored is not None and stored > SCHEMA_VERSION:
        raise NewerSchema(
            f"the metadata database has schema version {stored}, but this "
            f"KoboldFS knows only up to {SCHEMA_VERSION}: upgrade KoboldFS"
        )
    # Upgrades from older versions go here when SCHEMA_VERSION is bumped.
    for query in _SCHEMA_DDL:
        yield query
    if stored is None:
        yield Query(_INSERT_VERSION)
        stored = SCHEMA_VERSION
    return stored
