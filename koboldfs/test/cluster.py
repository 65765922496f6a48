"""
Real KoboldFS servers for end-to-end tests: C{twistd koboldfs} processes
on free loopback ports, each with its own data directory; or, given a host
of a L{koboldfs.test.netns.Network}, in that host's namespace on its
address.

Processes run this checkout's code (PYTHONPATH points at it, which also
makes Twisted find the plugin in its twisted/plugins folder).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, reactor

import koboldfs
from koboldfs.test.support import free_port, sleep

if TYPE_CHECKING:
    from koboldfs.test.netns import Host

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(koboldfs.__file__)))

#: Where a test finds PostgreSQL: set by .ci/run (see .ci/postgres.sh).
POSTGRES_URL = os.environ.get("KOBOLDFS_TEST_POSTGRES_URL")


class ServerProcess:
    """
    One C{twistd -n koboldfs} process.

    @ivar address: C{INTERFACE:PORT} of its binary protocol.
    @ivar http: base URL of its HTTP server.
    @ivar netns: the host (network namespace) it runs in, or None for this
        machine's loopback.
    @ivar interface: the address it listens on: C{127.0.0.1}, or its
        host's.  Its C{--host} is the host's label unless given.
    @ivar checkout: the code it runs (this checkout's unless given: a
        benchmark compares another's beside it).
    """

    def __init__(
        self,
        base: str,
        name: str,
        db: str | None = None,
        host: str | None = None,
        extra: tuple[str, ...] = (),
        netns: Host | None = None,
        checkout: str = CHECKOUT,
    ) -> None:
        self.name = name
        self.checkout = checkout
        self.dir = os.path.join(base, name)
        os.makedirs(self.dir, exist_ok=True)
        self.data = os.path.join(self.dir, "data")
        self.port = free_port()
        self.http_port = free_port()
        self.s3_port = free_port()
        self.netns = netns
        self.interface = "127.0.0.1" if netns is None else netns.address
        self.address = f"{self.interface}:{self.port}"
        self.http = f"http://{self.interface}:{self.http_port}"
        self.s3 = f"http://{self.interface}:{self.s3_port}"
        self.db = db
        self.host = host or (name if netns is None else netns.label)
        self.extra = extra
        self.log = os.path.join(self.dir, "twistd.log")
        self.process: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        argv = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            f"--logfile={self.log}",
            "koboldfs",
            f"--name={self.name}",
            f"--host={self.host}",
            f"--data={self.data}",
            f"--listen=tcp:{self.port}:interface={self.interface}",
            f"--http=tcp:{self.http_port}:interface={self.interface}",
            f"--s3=tcp:{self.s3_port}:interface={self.interface}",
            "--heartbeat=1",
            "--down-after=5",
            *self.extra,
        ]
        if self.db:
            argv.append(f"--db={self.db}")
        return argv

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def spawn(self) -> None:
        """
        Start the process, without waiting for it to serve.
        """
        env = {**os.environ, "PYTHONPATH": self.checkout}
        prefix = [] if self.netns is None else self.netns.prefix
        self.process = subprocess.Popen([*prefix, *self.argv()], cwd=self.dir, env=env)

    def _started(self) -> bool:
        """
        Whether it serves yet; raise if it exited.
        """
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"server {self.name} exited: see {self.log}\n{self.tail()}")
        return self.listening()

    def _not_started(self, timeout: float) -> RuntimeError:
        self.kill()
        return RuntimeError(f"server {self.name} did not start in {timeout}s\n{self.tail()}")

    async def start(self, timeout: float = 30.0) -> None:
        """
        Start the process and wait until it accepts connections.
        """
        self.spawn()
        deadline = reactor.seconds() + timeout
        while reactor.seconds() < deadline:
            if self._started():
                return
            await sleep(0.05)
        raise self._not_started(timeout)

    def start_blocking(self, timeout: float = 30.0) -> None:
        """
        L{start} for scripts that run no reactor (the benchmarks).
        """
        self.spawn()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._started():
                return
            time.sleep(0.05)
        raise self._not_started(timeout)

    def listening(self) -> bool:
        """
        Whether every port accepts connections.  The HTTP port opens after
        the database is ready, so this means the server is serving.
        """
        connect = socket.create_connection if self.netns is None else self.netns.connect
        try:
            for port in (self.port, self.http_port, self.s3_port):
                connect((self.interface, port), timeout=0.5).close()
        except OSError:
            return False
        return True

    def tail(self, lines: int = 40) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def kill(self) -> None:
        """
        SIGKILL: the crash no code can react to.
        """
        self.signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait()

    def stop_blocking(self, timeout: float = 15.0) -> int | None:
        """
        L{stop} for scripts that run no reactor.
        """
        if self.process is None:
            return None
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        return self.process.returncode

    async def stop(self, timeout: float = 15.0) -> int | None:
        """
        SIGTERM, and wait for a clean exit; SIGKILL if it hangs.
        """
        if self.process is None:
            return None
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        deadline = reactor.seconds() + timeout
        while self.process.poll() is None and reactor.seconds() < deadline:
            await sleep(0.05)
        if self.process.poll() is None:
            self.kill()
        return self.process.returncode


class ClusterMixin:
    """
    For trial test cases: start servers that are stopped at cleanup.
    """

    def startServer(self, name: str, **kwargs: Any) -> defer.Deferred[ServerProcess]:
        base = getattr(self, "_clusterBase", None)
        if base is None:
            base = self._clusterBase = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
        server = ServerProcess(base, name, **kwargs)

        async def start() -> ServerProcess:
            self.addCleanup(lambda: defer.ensureDeferred(server.stop()))  # type: ignore[attr-defined]
            await server.start()
            return server

        return defer.ensureDeferred(start())
