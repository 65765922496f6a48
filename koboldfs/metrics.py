"""
What a server counts and logs about the requests it answers, and its
Prometheus metrics (C{GET /metrics} on the HTTP port, docs/operations.md).

Each server has its own L{Metrics}, with a registry of its own rather than
C{prometheus_client}'s global one: several servers in one process (tests)
must not count into each other.  The protocols call a L{RequestTracker}
per connection (binary) or L{Metrics.http} (HTTP) and know nothing else of
metrics or logs.  Every request ends in one C{twisted.logger} event in the
C{koboldfs.requests} namespace, with structured fields: C{operation},
C{namespace}, C{key}, C{size}, C{duration}, C{result}, C{protocol}, and
C{server}.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.logger import Logger

from koboldfs.interfaces import ServerState

#: The namespace of the per-request log events, to filter them by.
REQUEST_LOG_NAMESPACE = "koboldfs.requests"

requestLog = Logger(namespace=REQUEST_LOG_NAMESPACE)

#: Latency buckets, in seconds: from a cached STAT to a large file.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

#: The C{result} of a request that succeeded.
OK = "ok"


class Metrics:
    """
    A server's request counters and the gauges read from its state.

    @ivar registry: this server's own C{CollectorRegistry}.
    """

    def __init__(
        self,
        server: str = "",
        clock: Any = None,
        snapshot: Callable[[], dict[str, Any] | None] | None = None,
    ) -> None:
        """
        @param snapshot: called at each scrape for the state-derived
            figures: a dict as L{Status.snapshot
            <koboldfs.status.Status.snapshot>} returns, or None for none.
        """
        self.server = server
        self.clock = clock
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "koboldfs_requests",
            "Requests answered, by protocol, operation and result",
            ["protocol", "operation", "result"],
            registry=r,
        )
        self.errors = Counter(
            "koboldfs_request_errors",
            "Requests that failed, by protocol, operation and error",
            ["protocol", "operation", "error"],
            registry=r,
        )
        self.bytes_in = Counter(
            "koboldfs_received_bytes",
            "File bytes received (uploads), by protocol and operation",
            ["protocol", "operation"],
            registry=r,
        )
        self.bytes_out = Counter(
            "koboldfs_sent_bytes",
            "File bytes sent (downloads), by protocol and operation",
            ["protocol", "operation"],
            registry=r,
        )
        self.latency = Histogram(
            "koboldfs_request_duration_seconds",
            "Time from request to the end of its answer, by protocol and operation",
            ["protocol", "operation"],
            buckets=BUCKETS,
            registry=r,
        )
        self.connections = Gauge(
            "koboldfs_open_connections",
            "Client connections open now, by protocol (binary, http)",
            ["protocol"],
            registry=r,
        )
        self.snapshot: Callable[[], dict[str, Any] | None] = snapshot or (lambda: None)
        r.register(_StateCollector(self))

    def connection(self) -> RequestTracker:
        """
        A tracker for one new binary protocol connection.
        """
        return RequestTracker(self)

    def record(
        self,
        protocol: str,
        operation: str,
        namespace: str | None,
        key: str | None,
        size: int,
        duration: float,
        result: str,
        bytes_in: int = 0,
        bytes_out: int = 0,
    ) -> None:
        """
        Count one finished request, and log it.
        """
        self.requests.labels(protocol, operation, result).inc()
        if result != OK:
            self.errors.labels(protocol, operation, result).inc()
        if bytes_in:
            self.bytes_in.labels(protocol, operation).inc(bytes_in)
        if bytes_out:
            self.bytes_out.labels(protocol, operation).inc(bytes_out)
        self.latency.labels(protocol, operation).observe(max(duration, 0.0))
        requestLog.info(
            "{protocol} {operation} {namespace}/{key!r}: {result}, {size} bytes in {duration:.4f}s",
            protocol=protocol,
            operation=operation,
            namespace=namespace,
            key=key,
            size=size,
            duration=duration,
            result=result,
            server=self.server,
        )

    def http(self, request: Any, started: float | None) -> None:
        """
        Count and log a finished HTTP request (Twisted's C{Request}).
        """
        now = self.clock.seconds() if self.clock is not None else 0.0
        path = request.path.decode("ascii", "replace")
        if path.startswith(("/files/", "/private/")):
            operation, namespace = "http_file", None
            if path.startswith("/private/"):
                namespace = path.split("/")[2]
        else:
            operation, namespace = "http_" + (path.strip("/").replace(".", "_") or "status"), None
        code = request.code
        result = OK if code < 400 else f"http_{code}"
        sent = int(getattr(request, "sentLength", 0) or 0)
        self.record(
            "http",
            operation,
            namespace,
            path,
            sent,
            now - started if started is not None else 0.0,
            result,
            bytes_out=sent if operation == "http_file" else 0,
        )

    def exposition(self) -> bytes:
        """
        The metrics in Prometheus' text format.
        """
        return generate_latest(self.registry)


class RequestTracker:
    """
    One binary protocol connection's requests, as the protocol reports
    them: L{begin} when a request arrives, L{received} and L{sent} for body
    bytes, L{failed} for an error answer, L{end} once it is answered.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._current: dict[str, Any] | None = None
        metrics.connections.labels("binary").inc()

    def begin(self, operation: str, namespace: str | None, key: str | None) -> None:
        clock = self._metrics.clock
        self._current = {
            "operation": operation,
            "namespace": namespace,
            "key": key,
            "start": clock.seconds() if clock is not None else 0.0,
            "in": 0,
            "out": 0,
            "result": OK,
        }

    def received(self, n: int) -> None:
        if self._current is not None:
            self._current["in"] += n

    def sent(self, n: int) -> None:
        if self._current is not None:
            self._current["out"] += n

    def failed(self, error: str) -> None:
        if self._current is not None and self._current["result"] == OK:
            self._current["result"] = error.lower()

    def end(self) -> None:
        current, self._current = self._current, None
        if current is None:
            return
        clock = self._metrics.clock
        now = clock.seconds() if clock is not None else current["start"]
        self._metrics.record(
            "binary",
            current["operation"],
            current["namespace"],
            current["key"],
            current["in"] + current["out"],
            now - current["start"],
            current["result"],
            current["in"],
            current["out"],
        )

    def lost(self) -> None:
        """
        The connection closed: a request under way ends as C{disconnected}.
        """
        self.failed("disconnected")
        self.end()
        self._metrics.connections.labels("binary").dec()


class _StateCollector:
    """
    The figures read from the server's state at each scrape: replication,
    scrub, disk, the cluster's health (as last polled).
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        snap = self._metrics.snapshot()
        if not snap:
            return
        me = snap["me"]
        gauge = GaugeMetricFamily
        disk = snap["disk"]
        yield gauge("koboldfs_disk_free_bytes", "Free space on the data disk", value=disk["free"])
        yield gauge("koboldfs_disk_total_bytes", "Size of the data disk", value=disk["total"])
        yield gauge(
            "koboldfs_disk_reserve_bytes",
            "Free space kept on the data disk (--reserve)",
            value=disk["reserve"],
        )
        yield gauge(
            "koboldfs_disk_full",
            "1 while the data disk has no room above the reserve: puts and copies refused",
            value=int(disk["full"]),
        )
        repl = snap["replication"]
        yield gauge(
            "koboldfs_replication_retries",
            "Copies this server waits to try again (failed or deferred)",
            value=repl["retries"],
        )
        yield gauge(
            "koboldfs_replication_backlog_files",
            "Live files short of their copies, cluster-wide (as last polled)",
            value=repl["under_replicated"],
        )
        yield gauge(
            "koboldfs_replication_missing_copies",
            "Copies still to be made, cluster-wide (as last polled)",
            value=repl["missing_copies"],
        )
        yield gauge(
            "koboldfs_replication_lag_seconds",
            "Age of the oldest file short of its copies; 0 when none is",
            value=repl["lag"],
        )
        yield gauge(
            "koboldfs_quarantined_copies",
            "Copies found bad and not yet made again, cluster-wide",
            value=snap["cluster"]["quarantined"],
        )
        yield gauge(
            "koboldfs_deleted_files",
            "Deleted files whose copies are still to be reclaimed, cluster-wide",
            value=snap["cluster"]["deleted"],
        )
        yield gauge("koboldfs_files", "Live files, cluster-wide", value=snap["cluster"]["files"])
        yield gauge(
            "koboldfs_files_held", "Live files this server holds a good copy of", value=me["files"]
        )
        servers = gauge("koboldfs_servers", "Servers registered, by state", labels=["state"])
        counts: dict[str, int] = {}
        for s in snap["servers"]:
            state = "down" if not s["up"] and s["state"] != ServerState.DEAD else s["state"]
            counts[state] = counts.get(state, 0) + 1
        for state, n in sorted(counts.items()):
            servers.add_metric([state], n)
        yield servers
        scrub = snap["scrub"]
        yield gauge("koboldfs_scrub_running", "Whether the scrub runs", value=int(scrub["running"]))
        yield gauge(
            "koboldfs_scrub_cursor", "The last file id the scrub checked", value=scrub["cursor"]
        )
        for name, help, value in (
            ("koboldfs_scrub_files_checked", "Copies the scrub re-read", scrub["files_checked"]),
            ("koboldfs_scrub_bytes_checked", "Bytes the scrub re-read", scrub["bytes_checked"]),
            ("koboldfs_scrub_errors", "Copies the scrub found bad or missing", scrub["bad"]),
            ("koboldfs_scrub_rounds", "Complete scrub rounds", scrub["rounds"]),
        ):
            yield CounterMetricFamily(name, help, value=value)
