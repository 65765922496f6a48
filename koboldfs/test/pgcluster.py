"""
Real PostgreSQL clusters for end-to-end tests: restart one, build a
throwaway primary with a streaming standby, promote the standby.

Everything starts from what C{.ci/postgres.sh} exports:

    - C{KOBOLDFS_TEST_POSTGRES_URL}: the shared test cluster's database;
    - C{KOBOLDFS_TEST_PG_BIN}: PostgreSQL's bin directory (C{initdb},
      C{pg_ctl}, C{pg_basebackup});
    - C{KOBOLDFS_TEST_PGDATA}: the shared cluster's data directory;
    - C{KOBOLDFS_TEST_PG_USER}: the OS user that owns it.

PostgreSQL's server tools refuse to run as root, so when the tests run as
root every one of them goes through C{runuser -u OWNER --}, and the
directories made here are given to that user.

A throwaway cluster may run in a host of a L{koboldfs.test.netns.Network}
(C{netns=}): it listens on that host's address, trusts the network's
subnet in pg_hba.conf, and this process, which cannot reach that address,
talks to it through its Unix socket (L{PostgresCluster.local_url}).

Tests that stop or restart PostgreSQL should do it to a cluster of their
own (L{PostgresMixin.throwawayCluster}), not to the shared one: CI runs
trial with C{-j2}, and a test in the other worker may be using the shared
cluster at that very moment.

Commands run as child processes through the reactor
(C{getProcessOutputAndValue}) and psycopg2 calls run in the reactor's
thread pool, so the servers and clients under test keep running while a
cluster starts, stops or is promoted.
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
import uuid
from typing import TYPE_CHECKING, Any, NoReturn, Sequence
from urllib.parse import urlsplit

from twisted.internet import defer, reactor, utils
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from koboldfs.test.support import free_port, sleep

if TYPE_CHECKING:
    from koboldfs.test.netns import Host

#: The shared test cluster, as .ci/postgres.sh exports it.
POSTGRES_URL = os.environ.get("KOBOLDFS_TEST_POSTGRES_URL")
PG_BIN = os.environ.get("KOBOLDFS_TEST_PG_BIN")
PGDATA = os.environ.get("KOBOLDFS_TEST_PGDATA")
PG_USER = os.environ.get("KOBOLDFS_TEST_PG_USER")


def _missing() -> str | None:
    """
    Why these helpers cannot run here, or None when they can.
    """
    if not POSTGRES_URL or not PG_BIN:
        return (
            "no PostgreSQL: set KOBOLDFS_TEST_POSTGRES_URL and KOBOLDFS_TEST_PG_BIN "
            "(source .ci/postgres.sh, or run bash .ci/run)"
        )
    for tool in ("initdb", "pg_ctl", "pg_basebackup"):
        if not os.access(os.path.join(PG_BIN, tool), os.X_OK):
            return f"no {tool} in KOBOLDFS_TEST_PG_BIN={PG_BIN}"
    if os.getuid() == 0:
        if not shutil.which("runuser"):
            return "running as root, and runuser (to run PostgreSQL's tools) is missing"
        try:
            pwd.getpwnam(_owner())
        except KeyError:
            return f"running as root, and there is no OS user {_owner()!r} to run PostgreSQL"
    return None


def _owner() -> str:
    """
    The OS user that runs PostgreSQL's server tools.
    """
    if PG_USER:
        return PG_USER
    if os.getuid() == 0:
        return "postgres"
    return pwd.getpwuid(os.getuid()).pw_name


#: Why tests needing real clusters are skipped; None when they can run.
SKIP = _missing()


class CommandFailed(Exception):
    """
    A PostgreSQL tool exited with an error; the message holds its output.
    """


def as_owner(argv: Sequence[str]) -> list[str]:
    """
    C{argv} run as the cluster owner: through C{runuser} when we are root
    (C{initdb}, C{pg_ctl} and the server refuse to run as root).
    """
    if os.getuid() == 0:
        return ["runuser", "-u", _owner(), "--", *argv]
    return list(argv)


def tool(name: str) -> str:
    """
    The path of PostgreSQL program C{name}.
    """
    if PG_BIN is None:
        raise RuntimeError(SKIP or "KOBOLDFS_TEST_PG_BIN is not set")
    return os.path.join(PG_BIN, name)


async def run(argv: Sequence[str], cwd: str | None = None, check: bool = True) -> tuple[int, str]:
    """
    Run C{argv} as a child process without blocking the reactor; return
    its exit status and its output (stdout then stderr).

    @param cwd: the working directory; it must be readable by the user the
        command runs as (C{runuser} keeps ours).
    @raise CommandFailed: C{check} is set and the command failed.
    """

    def killed(failure: Failure) -> NoReturn:
        # getProcessOutputAndValue fails with a bare (out, err, signal) tuple.
        if isinstance(failure.value, tuple):
            signum = failure.value[-1]
            raise CommandFailed(f"{' '.join(argv)} killed by signal {signum}")
        failure.raiseException()

    d = utils.getProcessOutputAndValue(
        argv[0], list(argv[1:]), env=dict(os.environ), path=cwd or "/", reactor=reactor
    )
    out, err, code = await d.addErrback(killed)
    output = (out + err).decode("utf-8", "replace")
    if check and code != 0:
        raise CommandFailed(f"{' '.join(argv)} exited with {code}:\n{output}")
    return code, output


def _give_to_owner(path: str) -> None:
    """
    Let the cluster owner write in C{path} (we made it, maybe as root).
    """
    if os.getuid() == 0:
        owner = pwd.getpwnam(_owner())
        os.chown(path, owner.pw_uid, owner.pw_gid)


def _make_base(prefix: str) -> str:
    """
    A new directory for one cluster, owned by the cluster owner and in a
    place that user can reach (root's home and trial's temp dir under a
    checkout may not be).
    """
    parent = "/tmp" if os.getuid() == 0 else None
    base = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.chmod(base, 0o755)
    _give_to_owner(base)
    return base


def _append(path: str, text: str) -> None:
    """
    Append to a file of a cluster: appending keeps its owner and mode.
    """
    with open(path, "a") as f:
        f.write(text)


def database_url(url: str, database: str) -> str:
    """
    C{url} naming database C{database} instead (host, user and query kept).
    """
    return urlsplit(url)._replace(path="/" + database).geturl()


class PostgresCluster:
    """
    One PostgreSQL cluster on 127.0.0.1 or in a host of a network, driven
    with C{pg_ctl}.

    @ivar data: its data directory.
    @ivar port: the TCP port it listens on.
    @ivar log: the server log, where C{pg_ctl} sends its output.
    @ivar base: the directory made for it (data, log, socket), deleted by
        L{destroy}; None for the shared cluster, which is not ours to delete.
    @ivar netns: the host it runs in, or None for this machine's loopback.
    @ivar interface: the address it listens on.
    """

    def __init__(
        self, data: str, port: int, log: str, base: str | None = None, netns: Host | None = None
    ) -> None:
        self.data = data
        self.port = port
        self.log = log
        self.base = base
        self.netns = netns
        self.interface = "127.0.0.1" if netns is None else netns.address

    def __repr__(self) -> str:
        return f"<PostgresCluster {self.data} on {self.address}>"

    @property
    def address(self) -> str:
        return f"{self.interface}:{self.port}"

    def url(self, database: str = "postgres") -> str:
        """
        The URL servers use: TCP to its address.
        """
        return f"postgresql://postgres@{self.address}/{database}"

    def local_url(self, database: str = "postgres") -> str:
        """
        The URL this process uses: L{url}, or for a cluster in a network
        namespace its Unix socket (not bound to any network).
        """
        if self.netns is None or self.base is None:
            return self.url(database)
        return f"postgresql://postgres@/{database}?host={self.base}&port={self.port}"

    def tail(self, lines: int = 30) -> str:
        """
        The end of the server log, for failure messages.
        """
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- making clusters

    @classmethod
    async def initdb(
        cls, prefix: str = "koboldfs-pgtest-", netns: Host | None = None
    ) -> PostgresCluster:
        """
        A new, stopped cluster in a new directory, set up as .ci/postgres.sh
        sets up the shared one (trust authentication, C collation, loopback
        only), and ready to be a primary: C{wal_level=replica} and a trusted
        C{host replication} entry for 127.0.0.1, so that
        C{pg_basebackup} and a standby can connect.

        @param netns: run it in this host instead, listening on the host's
            address, trusting every address of the host's network.
        """
        base = _make_base(prefix)
        data = os.path.join(base, "data")
        cluster = cls(data, free_port(), os.path.join(base, "postgres.log"), base, netns)
        try:
            await run(
                as_owner(
                    [
                        tool("initdb"),
                        "-D",
                        data,
                        "-U",
                        "postgres",
                        "--auth=trust",
                        "-E",
                        "UTF8",
                        "--locale=C",
                        "--no-sync",
                    ]
                ),
                cwd=base,
            )
            # In postgresql.conf, not pg_ctl -o: a restart keeps them.
            _append(
                os.path.join(data, "postgresql.conf"),
                "\n# koboldfs throwaway test cluster\n"
                f"port = {cluster.port}\n"
                f"listen_addresses = '{cluster.interface}'\n"
                f"unix_socket_directories = '{base}'\n"
                "max_connections = 100\n"
                "wal_level = replica\n"
                "max_wal_senders = 5\n",
            )
            hba = os.path.join(data, "pg_hba.conf")
            with open(hba) as f:
                entries = [line.split() for line in f if not line.lstrip().startswith("#")]
            if ["host", "replication", "all", "127.0.0.1/32", "trust"] not in entries:
                _append(hba, "host replication all 127.0.0.1/32 trust\n")
            if netns is not None:
                subnet = netns.network.subnet
                _append(hba, f"host all all {subnet} trust\nhost replication all {subnet} trust\n")
        except BaseException:
            shutil.rmtree(base, ignore_errors=True)
            raise
        return cluster

    async def standby(
        self, prefix: str = "koboldfs-pgstandby-", netns: Host | None = None
    ) -> PostgresCluster:
        """
        A streaming standby of this running cluster, on another free port,
        started, and streaming once this returns.

        C{pg_basebackup -R} copies the data directory and writes
        C{standby.signal} and C{primary_conninfo}; the copy keeps this
        cluster's postgresql.conf, so its port, address and socket
        directory are set again after the copied ones (the last setting
        wins).

        @param netns: run it in this host (of the primary's network, when
            the primary is in one), streaming over that network.
        """
        base = _make_base(prefix)
        data = os.path.join(base, "data")
        standby = PostgresCluster(
            data, free_port(), os.path.join(base, "postgres.log"), base, netns
        )
        try:
            await run(
                standby._in_host(
                    [
                        tool("pg_basebackup"),
                        "-h",
                        self.interface,
                        "-p",
                        str(self.port),
                        "-U",
                        "postgres",
                        "-D",
                        data,
                        "-R",
                        "-X",
                        "stream",
                        "-c",
                        "fast",
                        "--no-sync",
                    ]
                ),
                cwd=base,
            )
            _append(
                os.path.join(data, "postgresql.conf"),
                "\n# koboldfs streaming standby\n"
                f"port = {standby.port}\n"
                f"listen_addresses = '{standby.interface}'\n"
                f"unix_socket_directories = '{base}'\n",
            )
            await standby.start()
            await self.wait_streaming()
        except BaseException:
            await standby.destroy()
            raise
        return standby

    # -- pg_ctl

    def _in_host(self, argv: Sequence[str]) -> list[str]:
        """
        C{argv} run as the cluster owner, in the cluster's host if it has one.
        """
        prefix = [] if self.netns is None else self.netns.prefix
        return [*prefix, *as_owner(argv)]

    def _pg_ctl(self, *args: str) -> list[str]:
        return self._in_host([tool("pg_ctl"), "-D", self.data, *args])

    async def start(self) -> None:
        """
        Start the cluster and wait until it accepts connections (a standby:
        until it accepts read-only ones).
        """
        try:
            await run(self._pg_ctl("-l", self.log, "-w", "-t", "60", "start"), cwd=self._cwd())
        except CommandFailed as e:
            raise CommandFailed(f"{e}\n{self.tail()}") from None

    async def stop(self, mode: str = "fast") -> None:
        """
        Stop the cluster: C{fast} rolls back open transactions and closes
        every session, as an administrator's stop or a failover does;
        C{immediate} is a crash.
        """
        await run(self._pg_ctl("-m", mode, "-w", "-t", "60", "stop"), cwd=self._cwd())

    async def restart(self, mode: str = "fast") -> None:
        """
        C{pg_ctl restart -m fast -w}: every session is closed, and the
        cluster accepts connections again when this returns.
        """
        try:
            await run(
                self._pg_ctl("-l", self.log, "-m", mode, "-w", "-t", "60", "restart"),
                cwd=self._cwd(),
            )
        except CommandFailed as e:
            raise CommandFailed(f"{e}\n{self.tail()}") from None

    async def promote(self) -> None:
        """
        Make this standby a primary, and wait until it takes writes.
        """
        await run(self._pg_ctl("-w", "-t", "60", "promote"), cwd=self._cwd())

    async def running(self) -> bool:
        """
        Whether a postmaster runs on this data directory (C{pg_ctl status}).
        """
        code, _ = await run(self._pg_ctl("status"), cwd=self._cwd(), check=False)
        return code == 0

    async def ensure_running(self) -> None:
        """
        Start the cluster if it is stopped: the cleanup of a test that
        stops a cluster it shares.
        """
        if not await self.running():
            await self.start()

    async def destroy(self) -> None:
        """
        Stop the cluster at once, if it runs, and delete its directory.
        Safe to call more than once, and on a cluster never started.
        """
        if self.base is None:
            raise RuntimeError(f"{self!r} is not a throwaway cluster")
        if os.path.isdir(self.data) and await self.running():
            await self.stop("immediate")
        await deferToThread(shutil.rmtree, self.base, True)

    def _cwd(self) -> str:
        # Readable by the cluster owner, unlike root's home or a checkout.
        return self.base or os.path.dirname(self.data)

    # -- SQL

    async def query(self, sql: str, database: str = "postgres") -> list[tuple[Any, ...]]:
        """
        Run one statement in autocommit mode (in a thread); its rows.
        """
        return await query(self.local_url(database), sql)

    async def wait_streaming(self, timeout: float = 30.0) -> None:
        """
        Wait until a standby streams from this primary.
        """
        deadline = reactor.seconds() + timeout
        while True:
            rows = await self.query("SELECT state FROM pg_stat_replication")
            if ("streaming",) in rows:
                return
            if reactor.seconds() > deadline:
                raise AssertionError(f"no standby streaming from {self!r}: {rows}")
            await sleep(0.1)


def shared_cluster() -> PostgresCluster:
    """
    The shared test cluster that .ci/postgres.sh started.  Restarting it
    closes the connections of every other test using it: see the module
    docstring.
    """
    if SKIP or PGDATA is None or POSTGRES_URL is None:
        raise RuntimeError(SKIP or "KOBOLDFS_TEST_PGDATA is not set")
    port = urlsplit(POSTGRES_URL).port or 5432
    # .ci/postgres.sh keeps the log beside the data directory.
    return PostgresCluster(PGDATA, port, os.path.join(os.path.dirname(PGDATA), "postgres.log"))


def _thdQuery(url: str, sql: str) -> list[tuple[Any, ...]]:
    import psycopg2

    connection = psycopg2.connect(url, connect_timeout=10)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchall() if cursor.description is not None else []
    finally:
        connection.close()


def query(url: str, sql: str) -> defer.Deferred[list[tuple[Any, ...]]]:
    """
    Run one statement on database C{url} in autocommit mode (CREATE
    DATABASE refuses to run in a transaction), in a thread; its rows.
    """
    return deferToThread(_thdQuery, url, sql)


async def create_database(url: str, prefix: str = "koboldfs_e2e") -> str:
    """
    A new, empty database with a unique name on the cluster of C{url};
    return its URL.
    """
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    await query(url, f'CREATE DATABASE "{name}"')
    return database_url(url, name)


async def drop_database(url: str) -> None:
    """
    Drop the database of C{url}, closing any session still on it.
    """
    name = urlsplit(url).path.lstrip("/")
    await query(database_url(url, "postgres"), f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class PostgresMixin:
    """
    For trial test cases: PostgreSQL clusters and databases that are gone
    at cleanup.  Clean-ups run last first, so make a cluster, then its
    database, then the servers that use it.
    """

    def throwawayCluster(self, netns: Host | None = None) -> defer.Deferred[PostgresCluster]:
        """
        A new cluster of this test's own, started, destroyed at cleanup;
        in host C{netns} if given.
        """

        async def make() -> PostgresCluster:
            cluster = await PostgresCluster.initdb(netns=netns)
            self.addCleanup(lambda: defer.ensureDeferred(cluster.destroy()))  # type: ignore[attr-defined]
            await cluster.start()
            return cluster

        return defer.ensureDeferred(make())

    def standbyOf(
        self, primary: PostgresCluster, netns: Host | None = None
    ) -> defer.Deferred[PostgresCluster]:
        """
        A streaming standby of C{primary}, destroyed at cleanup; in host
        C{netns} if given.
        """

        async def make() -> PostgresCluster:
            standby = await primary.standby(netns=netns)
            self.addCleanup(lambda: defer.ensureDeferred(standby.destroy()))  # type: ignore[attr-defined]
            return standby

        return defer.ensureDeferred(make())

    def freshDatabase(self, url: str) -> defer.Deferred[str]:
        """
        A new database on the cluster of C{url} (the shared test cluster's
        URL, or a throwaway cluster's), dropped at cleanup; its URL.
        """

        async def make() -> str:
            database = await create_database(url)
            self.addCleanup(lambda: defer.ensureDeferred(drop_database(database)))  # type: ignore[attr-defined]
            return database

        return defer.ensureDeferred(make())
