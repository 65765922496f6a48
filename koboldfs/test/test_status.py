"""
The operators' views of real servers: the status page as a real headless
Chromium renders it, C{/status.json}, C{/metrics} as Prometheus parses
it, and the per-request log events as C{twistd --logger} writes them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from types import SimpleNamespace
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, task
from twisted.internet.threads import deferToThread
from twisted.logger import eventsFromJSONLogFile
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from koboldfs.client import DeferredClient
from koboldfs.errors import ErrorCode, Unavailable
from koboldfs.metadata.health import Health
from koboldfs.metrics import Metrics
from koboldfs.protocol import CHUNK_SIZE
from koboldfs.status import POLL, SPACING, Status
from koboldfs.testing import MemoryServer
from koboldfs.test.cluster import ClusterMixin, ServerProcess
from koboldfs.test.support import eventually

#: Debian's chromium, which .ci/run installs when missing.
CHROMIUM = os.environ.get("KOBOLDFS_TEST_CHROMIUM") or shutil.which("chromium")


def fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers.items()), e.read()


def chromium(*args: str) -> subprocess.CompletedProcess[bytes]:
    """
    Run headless Chromium with a profile of its own, thrown away after.
    """
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            raise AssertionError("no chromium: .ci/run should have installed it")
        raise SkipTest("no chromium (apt-get install chromium, as .ci/run does)")
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                *args,
            ],
            capture_output=True,
            timeout=120,
            env={**os.environ, "HOME": profile},
        )


async def two_servers(test: ClusterMixin) -> tuple[ServerProcess, ServerProcess]:
    base = os.path.abspath(test.mktemp())  # type: ignore[attr-defined]
    os.makedirs(base)
    db = f"sqlite:///{base}/shared.sqlite"
    a = await test.startServer("alpha", db=db)
    b = await test.startServer("bravo", db=db)
    return a, b


class StatusPageTests(ClusterMixin, TestCase):
    timeout = 240

    async def test_chromium(self) -> None:
        """
        A real browser renders the page: it lists every server with its
        state, and a phone-sized screenshot of it is written under
        _trial_temp/.
        """
        a, b = await two_servers(self)
        client = DeferredClient("default", [a.address])
        self.addCleanup(client.close)
        await client.put("hello.txt", b"hello\n")
        done = await deferToThread(chromium, "--dump-dom", a.http + "/")
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])
        dom = done.stdout.decode()
        self.assertIn("<h1>KoboldFS: alpha</h1>", dom)
        self.assertIn('<meta name="viewport" content="width=device-width, initial-scale=1">', dom)
        self.assertIn('<meta http-equiv="refresh"', dom)
        table = dom[dom.index('<table id="servers">') :]
        table = table[: table.index("</table>")]
        self.assertIn("<td>alpha</td>", table)
        self.assertIn("<td>bravo</td>", table)
        self.assertIn('<td class="ok">alive</td>', table)
        # Trial runs in _trial_temp (or a worker's folder in it).
        shot = os.path.abspath("status-page.png")
        if os.path.exists(shot):
            os.unlink(shot)
        done = await deferToThread(
            chromium, f"--screenshot={shot}", "--window-size=412,915", a.http + "/"
        )
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])
        self.assertIn("_trial_temp", shot)
        with open(shot, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        self.assertGreater(os.path.getsize(shot), 5000)

    async def test_status_json(self) -> None:
        """
        C{/status.json} has the page's data: the servers, a stopped one
        down, the cluster's counts, scrub progress; C{/} says DEGRADED.
        """
        a, b = await two_servers(self)
        client = DeferredClient("default", [a.address])
        self.addCleanup(client.close)
        await client.put("k", b"x" * 100)
        await b.stop()

        async def b_down() -> bool:
            status, headers, body = await deferToThread(fetch, a.http + "/status.json")
            self.assertEqual(status, 200)
            self.assertEqual(headers["Content-Type"], "application/json")
            self.snap = json.loads(body)
            return self.snap["down"] == ["bravo"] and self.snap["polled"] is not None

        await eventually(b_down, timeout=30, what="bravo down on alpha's status")
        snap = self.snap
        self.assertEqual([s["name"] for s in snap["servers"]], ["alpha", "bravo"])
        self.assertEqual(snap["server"], "alpha")
        self.assertFalse(snap["healthy"])
        self.assertTrue(snap["servers"][0]["up"])
        self.assertGreater(snap["me"]["disk_total"], 0)
        self.assertEqual(
            set(snap["scrub"]),
            {
                "running",
                "rate",
                "rounds",
                "cursor",
                "files_checked",
                "bytes_checked",
                "bad",
                "last_bad",
            },
        )
        self.assertTrue(snap["scrub"]["running"])
        self.assertEqual(
            set(snap["replication"]), {"retries", "under_replicated", "missing_copies", "lag"}
        )
        _, headers, page = await deferToThread(fetch, a.http + "/")
        self.assertEqual(headers["Content-Type"], "text/html; charset=utf-8")
        self.assertIn(b"DEGRADED", page)
        self.assertIn(b"bravo", page)
        # File serving is unchanged beside it.
        url = await client.get_url("k")
        self.assertEqual((await deferToThread(fetch, url))[2], b"x" * 100)

    async def test_metrics(self) -> None:
        """
        C{/metrics} parses as Prometheus text, and counts the requests just
        made: by operation and result, bytes in and out, latencies; with
        the gauges of replication, scrub, disk and connections.  One server:
        a peer's replicator would add GETs of its own.
        """
        a = await self.startServer("alpha")
        client = DeferredClient("default", [a.address])
        self.addCleanup(client.close)
        await client.put("k", b"y" * 5000)
        out = _Bytes()
        await client.get("k", out)
        self.assertIsNone(await client.stat("nonesuch"))
        url = await client.get_url("k")
        await deferToThread(fetch, url)
        status, headers, body = await deferToThread(fetch, a.http + "/metrics")
        self.assertEqual(status, 200)
        self.assertTrue(headers["Content-Type"].startswith("text/plain"), headers)
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}

        def value(family: str, sample: str, **labels: str) -> float:
            found = [
                s.value
                for s in families[family].samples
                if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
            ]
            self.assertEqual(len(found), 1, (sample, labels, families[family].samples))
            return found[0]

        requests = "koboldfs_requests"
        self.assertEqual(
            value(requests, "koboldfs_requests_total", operation="put", result="ok"), 1
        )
        self.assertEqual(
            value(requests, "koboldfs_requests_total", operation="get", result="ok"), 1
        )
        self.assertEqual(
            value(requests, "koboldfs_requests_total", operation="stat", result="not_found"), 1
        )
        self.assertEqual(
            value(
                "koboldfs_request_errors",
                "koboldfs_request_errors_total",
                operation="stat",
                error="not_found",
            ),
            1,
        )
        self.assertEqual(
            value(requests, "koboldfs_requests_total", protocol="http", operation="http_file"), 1
        )
        self.assertEqual(
            value("koboldfs_received_bytes", "koboldfs_received_bytes_total", operation="put"),
            5000,
        )
        self.assertEqual(
            value("koboldfs_sent_bytes", "koboldfs_sent_bytes_total", operation="get"), 5000
        )
        self.assertEqual(
            value("koboldfs_sent_bytes", "koboldfs_sent_bytes_total", operation="http_file"),
            5000,
        )
        latency = "koboldfs_request_duration_seconds"
        self.assertEqual(value(latency, latency + "_count", operation="put"), 1)
        self.assertEqual(value(latency, latency + "_bucket", operation="put", le="+Inf"), 1)
        self.assertGreaterEqual(
            value("koboldfs_open_connections", "koboldfs_open_connections", protocol="binary"), 1
        )
        # This very request's connection.
        self.assertGreaterEqual(
            value("koboldfs_open_connections", "koboldfs_open_connections", protocol="http"), 1
        )
        self.assertGreater(value("koboldfs_disk_free_bytes", "koboldfs_disk_free_bytes"), 0)
        for name in (
            "koboldfs_replication_backlog_files",
            "koboldfs_replication_lag_seconds",
            "koboldfs_replication_retries",
            "koboldfs_quarantined_copies",
        ):
            self.assertGreaterEqual(value(name, name), 0)
        self.assertIn("koboldfs_scrub_files_checked", families)
        self.assertGreaterEqual(value("koboldfs_scrub_errors", "koboldfs_scrub_errors_total"), 0)
        self.assertEqual(value("koboldfs_servers", "koboldfs_servers", state="alive"), 1)

    def test_registries_apart(self) -> None:
        """
        Two servers in one process count apart: each has its own registry.
        """
        one, two = Metrics("one"), Metrics("two")
        one.record("binary", "ping", None, None, 0, 0.001, "ok")
        self.assertIn(b'koboldfs_requests_total{operation="ping"', one.exposition())
        self.assertNotIn(b"koboldfs_requests_total{", two.exposition())


class SentBytesTests(SynchronousTestCase):
    def test_large_get(self) -> None:
        """
        A GET of several chunks, whose frames are built in worker threads,
        counts every body byte sent, like a GET of one chunk.
        """
        server = MemoryServer(os.path.abspath(self.mktemp()))
        server.start()
        self.addCleanup(server.stop)
        client = server.client()
        body = os.urandom(2 * CHUNK_SIZE + 10)
        self.assertTrue(server.flush(client.put("big", body)))
        out = _Bytes()
        self.assertTrue(server.flush(client.get("big", out)))
        server.flush(client.close())
        self.assertEqual(out.data, body)
        text = server.metrics.exposition().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        [sent] = [
            s.value
            for s in families["koboldfs_sent_bytes"].samples
            if s.name == "koboldfs_sent_bytes_total" and s.labels["operation"] == "get"
        ]
        self.assertEqual(sent, len(body))


class _Bytes:
    def __init__(self) -> None:
        self.data = b""

    def write(self, chunk: bytes) -> None:
        self.data += chunk


class RequestLogTests(ClusterMixin, TestCase):
    timeout = 120

    async def test_json_lines(self) -> None:
        """
        With C{twistd --logger koboldfs.logs.json_observer}, every request
        is a JSON event with its operation, namespace, key, size, duration
        and result.
        """
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        log = os.path.join(base, "events.json")
        self.patch(os, "environ", {**os.environ, "KOBOLDFS_LOG_FILE": log})
        server = ServerProcess(base, "logged")
        argv = server.argv
        server.argv = (
            lambda: [  # type: ignore[method-assign]
                *argv()[:5],
                "--logger=koboldfs.logs.json_observer",
                *argv()[5:],
            ]
        )
        self.addCleanup(lambda: defer.ensureDeferred(server.stop()))
        await server.start()
        client = DeferredClient("photos", [server.address])
        self.addCleanup(client.close)
        await client.put("cat.png", b"z" * 1234)
        self.assertIsNone(await client.stat("dog.png"))

        def requests() -> list[dict]:
            with open(log) as f:
                return [
                    e
                    for e in eventsFromJSONLogFile(f)
                    if e.get("log_namespace") == "koboldfs.requests"
                ]

        await eventually(lambda: len(requests()) >= 2, what="request events")
        put, stat = requests()[:2]
        self.assertEqual(
            {k: put[k] for k in ("operation", "namespace", "key", "size", "result", "server")},
            {
                "operation": "put",
                "namespace": "photos",
                "key": "cat.png",
                "size": 1234,
                "result": "ok",
                "server": "logged",
            },
        )
        self.assertGreaterEqual(put["duration"], 0)
        self.assertEqual((stat["operation"], stat["result"]), ("stat", "not_found"))


class _Store:
    """
    The two store calls a status poll makes, answered when the test says.
    """

    def __init__(self) -> None:
        self.calls: list[defer.Deferred[Any]] = []

    def health(self) -> defer.Deferred[Health]:
        d: defer.Deferred[Health] = defer.Deferred()
        self.calls.append(d)
        return d

    def files_held(self) -> defer.Deferred[dict[str, int]]:
        return defer.succeed({"me": 3})


class StatusPollTests(SynchronousTestCase):
    """
    The cluster-wide counts are polled in the background, spaced so that
    a slow database is not kept busy by status pages.
    """

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.store = _Store()
        node = SimpleNamespace(
            name="me",
            store=self.store,
            servers={},
            config=SimpleNamespace(down_after=30),
            storage=SimpleNamespace(free=None, total=0, reserve=0, full=False),
        )
        self.status = Status(node, None, None, self.clock)  # type: ignore[arg-type]

    def test_spacing(self) -> None:
        """
        A poll starts at once; the next one POLL seconds after it ended,
        or SPACING times its length if longer; none after stop.
        """
        self.status.startService()
        self.clock.advance(0)
        self.assertEqual(len(self.store.calls), 1)
        self.clock.advance(2)  # a slow database: 2 s
        self.store.calls[0].callback(Health(files=7))
        self.assertEqual(self.status.snapshot()["cluster"]["files"], 7)
        self.assertEqual(self.status.held, {"me": 3})
        self.clock.advance(SPACING * 2 - 1)
        self.assertEqual(len(self.store.calls), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.store.calls), 2)
        self.store.calls[1].callback(Health(files=8))  # fast: POLL apart
        self.clock.advance(POLL)
        self.assertEqual(len(self.store.calls), 3)
        self.status.stopService()
        self.store.calls[2].callback(Health())
        self.clock.advance(POLL * 10)
        self.assertEqual(len(self.store.calls), 3)

    def test_failure(self) -> None:
        """
        A poll that fails keeps the last counts, and polling goes on.
        """
        self.status.startService()
        self.clock.advance(0)
        self.store.calls[0].callback(Health(files=7))
        self.clock.advance(POLL)
        self.store.calls[1].errback(Unavailable(ErrorCode.UNAVAILABLE, "database down"))
        self.assertEqual(self.status.snapshot()["cluster"]["files"], 7)
        self.clock.advance(POLL)
        self.assertEqual(len(self.store.calls), 3)
        self.status.stopService()
