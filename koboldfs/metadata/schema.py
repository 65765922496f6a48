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
    bindparam,
    case,
    delete,
    exists,
    false,
    func,
    insert,
    literal,
    literal_column,
    select,
    update,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.schema import CreateIndex, CreateTable, ExecutableDDLElement
from sqlalchemy.sql.compiler import DDLCompiler

from koboldfs import attributes as attrs
from koboldfs.metadata.units import Query, Unit, writer
from koboldfs.placement import UNCOUNTED_STATES

#: Bumped with every change to the tables below; the store upgrades older
#: schemas at start (L{create_schema}).  2: file_counts and its triggers,
#: copy_queue, and replicas_server_good instead of replicas_server_file
#: (docs/scale.md).  3: for S3, files.md5, parts, part_size, attributes and
#: namespaces.public_read (docs/s3-store.md).
SCHEMA_VERSION = 3

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
#: A good copy.  A literal, not a parameter, so that the planners see that
#: a query's condition implies replicas_server_good's.
GOOD = replicas.c.state == literal_column("'ok'")
# A server's good copies, by file id: what its replicator and scrubber page
# through and probe (index-only).  Version 1 had replicas_server_file, on
# every copy; the copies that are not good are few, and are found by file.
Index(
    "replicas_server_good",
    replicas.c.server,
    replicas.c.file_id,
    sqlite_where=GOOD,
    postgresql_where=GOOD,
)

# The operators' counts, kept by triggers on files and replicas (below) in
# the same database transaction as every change to their rows, whoever
# writes them: health reads a few hundred rows, never the files.  One row
# per namespace, server and stripe: server '' counts the namespace's files
# (files, bytes: live; deleted: deleted, their copies to reclaim), a
# server's row its copies (files, bytes: good copies of live files;
# deleted: copies of deleted files still to reclaim; quarantined: copies
# set aside).  Stripes (a file's id & STRIPE_MASK) spread concurrent puts
# of one namespace over rows, so that they do not queue on one row lock.
STRIPES = 16
file_counts = Table(
    "file_counts",
    metadata,
    Column("namespace_id", Integer, primary_key=True),
    Column("server", String(64), primary_key=True),
    Column("stripe", Integer, primary_key=True),
    Column("files", BigInteger, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("deleted", BigInteger, nullable=False),
    Column("quarantined", BigInteger, nullable=False),
)

# Live files that may be short of copies (docs/replication.md): a row is
# added in the database transaction of every change that can make a file
# short (a put or publish with too few copies, a copy removed or set aside,
# a server draining or dead), and removed once a look finds the file has
# its copies, or at its purge.  The replicators read it by id, so work is
# found in time proportional to the work.
copy_queue = Table(
    "copy_queue",
    metadata,
    Column("file_id", BigId, ForeignKey("files.id"), primary_key=True),
)

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


# -- file_counts, kept by triggers ------------------------------------------------
#
# Each trigger adds what a row changed to its counters: a file row counts
# in its namespace's row (server ''), a replica row in its server's row,
# both in the file's stripe.  Written once for both databases (upserts,
# CASE, &); PostgreSQL runs them from PL/pgSQL functions, SQLite from one
# trigger per event.

STRIPE_MASK = STRIPES - 1
_INTO_COUNTS = (
    "INSERT INTO file_counts (namespace_id, server, stripe, files, bytes, deleted, quarantined) "
)
_ADD_TO_COUNTS = (
    " ON CONFLICT (namespace_id, server, stripe) DO UPDATE SET"
    " files = file_counts.files + excluded.files,"
    " bytes = file_counts.bytes + excluded.bytes,"
    " deleted = file_counts.deleted + excluded.deleted,"
    " quarantined = file_counts.quarantined + excluded.quarantined"
)


def _is(row: str, column: str, value: str) -> str:
    return f"(CASE WHEN {row}.{column} = '{value}' THEN 1 ELSE 0 END)"


def _good_live(replica: str, file: str) -> str:
    return f"(CASE WHEN {replica}.state = 'ok' AND {file}.state = 'live' THEN 1 ELSE 0 END)"


def _file_change(new: str | None, old: str | None) -> list[str]:
    """
    The statements counting a file row's change from C{old} to C{new}
    (OLD, NEW, or None when there is none: an insert or a delete).
    """

    def net(term: Any) -> str:
        parts = [term(new) if new else "0", term(old) if old else "0"]
        return f"({parts[0]} - {parts[1]})"

    row = new or old
    own = (
        f"{_INTO_COUNTS}SELECT {row}.namespace_id, '', {row}.id & {STRIPE_MASK}, "
        f"{net(lambda f: _is(f, 'state', 'live'))}, "
        f"{net(lambda f: _is(f, 'state', 'live'))} * {row}.size, "
        f"{net(lambda f: _is(f, 'state', 'deleted'))}, 0 WHERE true{_ADD_TO_COUNTS}"
    )
    if new is None or old is None:
        # A file's replicas are inserted after it and deleted before it.
        return [own]
    copies = (
        f"{_INTO_COUNTS}SELECT {row}.namespace_id, r.server, {row}.id & {STRIPE_MASK}, "
        f"{net(lambda f: _good_live('r', f))}, {net(lambda f: _good_live('r', f))} * {row}.size, "
        f"{net(lambda f: _is(f, 'state', 'deleted'))}, 0 "
        f"FROM replicas r WHERE r.file_id = {row}.id{_ADD_TO_COUNTS}"
    )
    return [own, copies]


def _replica_change(new: str | None, old: str | None) -> list[str]:
    """
    The statement counting a replica row's change from C{old} to C{new}.
    """

    def net(term: Any) -> str:
        return f"({term(new) if new else '0'} - {term(old) if old else '0'})"

    row = new or old
    return [
        f"{_INTO_COUNTS}SELECT f.namespace_id, {row}.server, f.id & {STRIPE_MASK}, "
        f"{net(lambda r: _good_live(r, 'f'))}, {net(lambda r: _good_live(r, 'f'))} * f.size, "
        f"{net(lambda r: _is('f', 'state', 'deleted'))}, "
        f"{net(lambda r: _is(r, 'state', 'quarantined'))} "
        f"FROM files f WHERE f.id = {row}.file_id{_ADD_TO_COUNTS}"
    ]


class Dialectal(ExecutableDDLElement):
    """
    A DDL statement written for each database, by dialect name; on a
    database it names no text for, a statement that does nothing (units
    know no dialect, so each database runs every one).
    """

    inherit_cache = False

    def __init__(self, **by_dialect: str) -> None:
        self.by_dialect = by_dialect


@compiles(Dialectal)
def _compile_dialectal(element: Dialectal, compiler: Any, **kw: Any) -> str:
    return element.by_dialect.get(compiler.dialect.name, "SELECT 1")


def _pg_function(name: str, change: Any, table: str) -> list[Dialectal]:
    body = "; ".join(
        [
            f"IF TG_OP = 'INSERT' THEN {'; '.join(change('NEW', None))}",
            f"ELSIF TG_OP = 'DELETE' THEN {'; '.join(change(None, 'OLD'))}",
            "ELSIF NEW.state IS DISTINCT FROM OLD.state THEN " + "; ".join(change("NEW", "OLD")),
        ]
    )
    return [
        Dialectal(
            postgresql=f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql "
            f"AS $$ BEGIN {body}; END IF; RETURN NULL; END $$"
        ),
        Dialectal(
            postgresql=f"CREATE OR REPLACE TRIGGER {name} AFTER INSERT OR DELETE OR UPDATE OF "
            f"state ON {table} FOR EACH ROW EXECUTE FUNCTION {name}()"
        ),
    ]


def _sqlite_triggers(name: str, change: Any, table: str) -> list[Dialectal]:
    made = []
    for event, new, old in (
        ("INSERT", "NEW", None),
        ("DELETE", None, "OLD"),
        ("UPDATE OF state", "NEW", "OLD"),
    ):
        when = " WHEN OLD.state IS NOT NEW.state" if new and old else ""
        statements = "".join(f"{sql}; " for sql in change(new, old))
        made.append(
            Dialectal(
                sqlite=f"CREATE TRIGGER IF NOT EXISTS {name}_{event.split()[0].lower()} "
                f"AFTER {event} ON {table} FOR EACH ROW{when} BEGIN {statements}END"
            )
        )
    return made


def count_triggers(dialect: str) -> list[Dialectal]:
    """
    The statements that make the triggers keeping file_counts, for
    C{dialect} ("postgresql" or "sqlite").
    """
    make = _pg_function if dialect == "postgresql" else _sqlite_triggers
    return [
        *make("kobold_count_files", _file_change, "files"),
        *make("kobold_count_replicas", _replica_change, "replicas"),
    ]


# The same counts, taken from every row at once: for a database made
# before the triggers (the upgrade from version 1), and for bulk loads.
_STRIPE = files.c.id.op("&")(literal_column(str(STRIPE_MASK)))


def _flag(condition: Any) -> Any:
    return case((condition, 1), else_=0)


_LIVE_FLAG = _flag(files.c.state == "live")
_DELETED_FLAG = _flag(files.c.state == "deleted")
_GOOD_LIVE_FLAG = _flag((replicas.c.state == "ok") & (files.c.state == "live"))
_COUNT_COLUMNS = ["namespace_id", "server", "stripe", "files", "bytes", "deleted", "quarantined"]
RECOUNT = (
    Query(delete(file_counts)),
    Query(
        insert(file_counts).from_select(
            _COUNT_COLUMNS,
            select(
                files.c.namespace_id,
                literal(""),
                _STRIPE,
                func.sum(_LIVE_FLAG),
                func.sum(_LIVE_FLAG * files.c.size),
                func.sum(_DELETED_FLAG),
                literal(0),
            ).group_by(files.c.namespace_id, _STRIPE),
        )
    ),
    Query(
        insert(file_counts).from_select(
            _COUNT_COLUMNS,
            select(
                files.c.namespace_id,
                replicas.c.server,
                _STRIPE,
                func.sum(_GOOD_LIVE_FLAG),
                func.sum(_GOOD_LIVE_FLAG * files.c.size),
                func.sum(_DELETED_FLAG),
                func.sum(_flag(replicas.c.state == "quarantined")),
            )
            .select_from(replicas.join(files, files.c.id == replicas.c.file_id))
            .group_by(files.c.namespace_id, replicas.c.server, _STRIPE),
        )
    ),
)


# -- what "short of copies" is, in SQL (koboldfs.placement says it in Python) ---

#: Literals, not parameters: PostgreSQL's driver takes no expanding IN.
_UNCOUNTED_SERVERS = select(servers.c.name).where(
    servers.c.state.in_([literal_column(f"'{state}'") for state in UNCOUNTED_STATES])
)
#: A live file's good copies that count: on servers neither draining nor
#: dead (one the metadata does not list counts, as in placement).
GOOD_COUNTED = (
    select(func.count())
    .select_from(replicas)
    .where(
        replicas.c.file_id == files.c.id,
        replicas.c.state == literal_column("'ok'"),
        replicas.c.server.not_in(_UNCOUNTED_SERVERS),
    )
    # Its own replicas, even in a query that joins replicas itself.
    .correlate_except(replicas)
    .scalar_subquery()
)
ANY_GOOD = (
    select(func.count())
    .select_from(replicas)
    .where(replicas.c.file_id == files.c.id, replicas.c.state == literal_column("'ok'"))
    .correlate_except(replicas)
    .scalar_subquery()
)
ALIVE_COUNT = (
    select(func.count())
    .select_from(servers)
    .where(servers.c.state == literal_column("'alive'"))
    .scalar_subquery()
)
#: The copies a file of the joined namespace wants: its count, or one on
#: every alive server.
WANTED = func.coalesce(namespaces.c.replicas, ALIVE_COUNT)
#: A live file of the joined namespace is short of copies.
SHORT = GOOD_COUNTED < WANTED
# Not correlated with the copy_queue an INSERT writes into.
QUEUED = exists().where(copy_queue.c.file_id == files.c.id).correlate_except(copy_queue)
_FILES_IN_NAMESPACES = files.join(namespaces, namespaces.c.id == files.c.namespace_id)


def _queue_server_files(*conditions: Any) -> Any:
    return insert(copy_queue).from_select(
        ["file_id"],
        select(files.c.id)
        .select_from(_FILES_IN_NAMESPACES.join(replicas, replicas.c.file_id == files.c.id))
        .where(
            replicas.c.server == bindparam("b_server"),
            GOOD,
            files.c.state == literal_column("'live'"),
            ~QUEUED,
            *conditions,
        ),
    )


#: Every live file short of copies with a good copy on server C{b_server},
#: not yet queued, into the queue: when the server's copies stopped
#: counting (drain, dead).  In time proportional to its files.
QUEUE_SERVER_FILES = _queue_server_files(SHORT)
#: Every live file with a good copy on server C{b_server}, not yet queued,
#: into the queue: before they are all set aside (quarantine_server).
QUEUE_ALL_SERVER_FILES = _queue_server_files()
#: Every live file short of copies, not yet queued, into the queue.
QUEUE_SHORT = Query(
    insert(copy_queue).from_select(
        ["file_id"],
        select(files.c.id)
        .select_from(_FILES_IN_NAMESPACES)
        .where(files.c.state == literal_column("'live'"), SHORT, ~QUEUED),
    )
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


#: The columns schema version 3 added to tables that existed before.
ADDED_IN_3 = (
    namespaces.c.public_read,
    files.c.md5,
    files.c.parts,
    files.c.part_size,
    files.c.attributes,
)
_ADD_COLUMN = {column: Query(AddColumn(column)) for column in ADDED_IN_3}
_COLUMNS_OF = {
    table.name: Query(
        Dialectal(
            postgresql="SELECT column_name FROM information_schema.columns WHERE "
            f"table_schema = current_schema() AND table_name = '{table.name}'",
            sqlite=f"SELECT name FROM pragma_table_info('{table.name}')",
        )
    )
    for table in {column.table for column in ADDED_IN_3}
}


def add_missing_columns(columns: tuple[Column[Any], ...]) -> Unit[None]:
    """
    A step: give existing tables those of C{columns} they lack (an older
    schema's), asking each database which it has, so that running it
    again (a version set back, a rerun upgrade) adds nothing twice.
    """
    by_table: dict[str, list[Column[Any]]] = {}
    for column in columns:
        by_table.setdefault(column.table.name, []).append(column)
    for table, wanted in by_table.items():
        out = yield _COLUMNS_OF[table]
        have = {row[0] for row in out.rows}
        for column in wanted:
            if column.name not in have:
                yield _ADD_COLUMN[column]


_VERSION_TABLE = CreateTable(schema_version, if_not_exists=True)
_SCHEMA_DDL = tuple(Query(statement) for statement in schema_ddl())
_STORED_VERSION = select(schema_version.c.version)
_INSERT_VERSION = insert(schema_version).values(version=SCHEMA_VERSION)
_SET_VERSION = update(schema_version).values(version=SCHEMA_VERSION)
_DROP_V1_INDEX = Query(
    Dialectal(
        postgresql="DROP INDEX IF EXISTS replicas_server_file",
        sqlite="DROP INDEX IF EXISTS replicas_server_file",
    )
)
# Both databases' triggers: each runs its own (and the other's as no-ops).
_TRIGGERS = tuple(
    Query(statement)
    for dialect in ("postgresql", "sqlite")
    for statement in count_triggers(dialect)
)


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
    if stored is not None and stored < 3:
        yield from add_missing_columns(ADDED_IN_3)
    for query in _SCHEMA_DDL:
        yield query
    yield _DROP_V1_INDEX
    for trigger in _TRIGGERS:
        yield trigger
    if stored is not None and stored < 2:
        # Counters and queue from every row, once (O(files), under the
        # store's schema lock): the triggers keep them from now on.
        for query in RECOUNT:
            yield query
        yield QUEUE_SHORT
    if stored is None:
        yield Query(_INSERT_VERSION)
    elif stored < SCHEMA_VERSION:
        yield Query(_SET_VERSION)
    return SCHEMA_VERSION
