"""
The metadata schema, defined once with SQLAlchemy Core for every database,
and L{create_schema}, the unit that creates or upgrades it.

Times are seconds since the epoch as floats (the reactor's clock), which
every database stores alike.  Keys sort in code-point order: SQLite's
default BINARY collation, and collation "C" on PostgreSQL.
"""

from __future__ import annotations

from typing import Any, Mapping

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
    TypeDecorator,
    false,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.schema import CreateIndex, CreateTable, ExecutableDDLElement
from sqlalchemy.sql.compiler import DDLCompiler

from koboldfs import attributes as attrs
from koboldfs.metadata.units import Query, Unit, writer

#: Bumped with every change to the tables below; the store upgrades older
#: schemas at start (L{UPGRADES}).
SCHEMA_VERSION = 2

#: A 64-bit id that still autoincrements on SQLite (only INTEGER does there).
BigId = BigInteger().with_variant(Integer(), "sqlite")
KeyText = Text().with_variant(Text(collation="C"), "postgresql")



class AttributesText(TypeDecorator[Mapping[str, str]]):
    """
    A file's attributes (L{koboldfs.attributes}), stored as JSON text.
    """

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else attrs.encode(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> Mapping[str, str] | None:
        return attrs.decode(value)


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
    # Served to anonymous S3 GET and HEAD (version 2).
    Column("public_read", Boolean, nullable=False, default=False, server_default=false()),
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
    # committed: invisible to readers, see the transactions table) | part
    # (a part of a multipart upload, invisible too: s3_parts)
    Column("state", String(16), nullable=False),
    Column("deleted", Float),
    # Version 2, for S3: the MD5 (of a multipart object, of its parts'
    # MD5s), the number of parts, the size of each but the last when they
    # are all alike (GetObject's partNumber), and the front end's attributes.
    Column("md5", String(32)),
    Column("parts", Integer),
    Column("part_size", BigInteger),
    Column("attributes", AttributesText),
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

# S3 credentials (docs/security.md): the secret is kept sealed under a key
# derived from the cluster secret (koboldfs.auth.seal_s3_secret), since
# SigV4 needs it in the clear to check a signature.  C{cluster}: may
# administer buckets (create, delete, list all) and use every namespace.
s3_credentials = Table(
    "s3_credentials",
    metadata,
    Column("access_key", String(32), primary_key=True),
    Column("sealed", Text, nullable=False),
    Column("cluster", Boolean, nullable=False),
    Column("created", Float, nullable=False),
    Column("last_used", Float),
)

# What a credential may use: by namespace name, so that a grant may name a
# bucket before it is created.
s3_grants = Table(
    "s3_grants",
    metadata,
    Column(
        "access_key", String(32), ForeignKey("s3_credentials.access_key"), primary_key=True
    ),
    Column("namespace", String(64), primary_key=True),
    Column("readonly", Boolean, nullable=False),
)

# Multipart uploads under way (docs/s3-store.md): their parts are file rows in
# state "part", kept until the upload completes, is aborted or expires.
s3_uploads = Table(
    "s3_uploads",
    metadata,
    Column("upload_id", String(32), primary_key=True),
    Column("namespace_id", Integer, ForeignKey("namespaces.id"), nullable=False),
    Column("key", KeyText, nullable=False),
    Column("attributes", AttributesText),
    Column("created", Float, nullable=False),
)
Index("s3_uploads_key", s3_uploads.c.namespace_id, s3_uploads.c.key, s3_uploads.c.upload_id)
Index("s3_uploads_created", s3_uploads.c.created)

s3_parts = Table(
    "s3_parts",
    metadata,
    Column("upload_id", String(32), ForeignKey("s3_uploads.upload_id"), primary_key=True),
    Column("number", Integer, primary_key=True),
    Column("file_id", BigId, ForeignKey("files.id"), nullable=False),
)

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


class AddColumn(ExecutableDDLElement):
    """
    C{ALTER TABLE ... ADD COLUMN}, which SQLAlchemy Core does not have:
    how an upgrade gives an existing table a column of L{metadata}'s.
    """

    def __init__(self, column: Column[Any]) -> None:
        self.column = column


@compiles(AddColumn)
def _add_column(element: AddColumn, compiler: DDLCompiler, **kw: Any) -> str:
    column = element.column
    table = compiler.preparer.format_table(column.table)
    return f"ALTER TABLE {table} ADD COLUMN {compiler.get_column_specification(column)}"


#: What upgrades a schema of each version to the next: the statements run
#: before the missing tables are created.
UPGRADES: dict[int, tuple[Query, ...]] = {
    1: tuple(
        Query(AddColumn(column))
        for column in (
            namespaces.c.public_read,
            files.c.md5,
            files.c.parts,
            files.c.part_size,
            files.c.attributes,
        )
    ),
}

_VERSION_TABLE = CreateTable(schema_version, if_not_exists=True)
_SCHEMA_DDL = tuple(Query(statement) for statement in schema_ddl())
_STORED_VERSION = select(schema_version.c.version)
_INSERT_VERSION = insert(schema_version).values(version=SCHEMA_VERSION)
_UPDATE_VERSION = update(schema_version).values(version=SCHEMA_VERSION)


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
    if stored is not None:
        for version in range(stored, SCHEMA_VERSION):
            for query in UPGRADES[version]:
                yield query
    for query in _SCHEMA_DDL:
        yield query
    if stored is None:
        yield Query(_INSERT_VERSION)
    elif stored < SCHEMA_VERSION:
        yield Query(_UPDATE_VERSION)
    return SCHEMA_VERSION
