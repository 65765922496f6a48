"""
A server's picture of itself and of its cluster, for people and monitors:
the status page (C{GET /} on the HTTP port), C{GET /status.json}, and the
state-derived figures of C{GET /metrics}.

The page must be fast and must not load the database however often it is
fetched: the counts over every file (L{Health<koboldfs.metadata.health.Health>},
files held by each server) are polled every L{POLL} seconds into memory;
the servers' states and heartbeats are those the heartbeat refreshes, and
replication and scrub progress are read from the running objects.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet import defer

from koboldfs import __version__
from koboldfs.interfaces import ServerState
from koboldfs import humanize
from koboldfs.metadata.health import Health
from koboldfs.periodic import logged

if TYPE_CHECKING:
    from koboldfs.interfaces import INode
    from koboldfs.replicator import Replicator, Scrubber


#: Seconds between polls of the cluster-wide counts, at least.
POLL = 10.0
#: Polls wait at least this many times as long as the last one took, so
#: that a large database spends at most 1/SPACING of its time on them.
SPACING = 20
#: Seconds the status page waits before it reloads itself.
REFRESH = 10


class Status(Service):
    """
    The status of one server, assembled on demand from what it knows; as
    a service, it polls the cluster-wide counts while it runs.
    """

    def __init__(
        self,
        node: INode,
        replicator: Replicator | None,
        scrubber: Scrubber | None,
        clock: Any,
        interval: float = POLL,
    ) -> None:
        self.node = node
        self.replicator = replicator
        self.scrubber = scrubber
        self.clock = clock
        self.health: Health | None = None
        self.held: dict[str, int] = {}
        self.polled: float | None = None
        self._interval = interval
        self._call: Any = None

    def startService(self) -> None:
        """
        Poll now, then again after each poll ends: every L{POLL} seconds,
        or L{SPACING} times as long as a poll took if that is longer (so
        not a fixed-interval L{Periodic<koboldfs.periodic.Periodic>}).
        """
        super().startService()
        self._schedule(0)

    def stopService(self) -> None:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self, delay: float) -> None:
        if self.running:
            self._call = self.clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        started = self.clock.seconds()

        def again(_: object) -> None:
            took = self.clock.seconds() - started
            self._schedule(max(self._interval, SPACING * took))

        defer.ensureDeferred(self.poll()).addBoth(again)

    async def poll(self) -> None:
        """
        Refresh the cluster-wide counts.  Errors are logged, never raised:
        a raise would stop the loop for good.
        """

        async def read() -> tuple[Health, dict[str, int]]:
            return await self.node.store.health(), await self.node.store.files_held()

        polled = await logged(f"status poll on {self.node.name}", read, None)
        if polled is not None:
            self.health, self.held = polled
            self.polled = self.clock.seconds()

    def snapshot(self) -> dict[str, Any]:
        """
        Everything the page shows, as plain data (C{/status.json}).
        """
        node, now = self.node, self.clock.seconds()
        down_after = node.config.down_after
        health = self.health or Health()
        servers = []
        for s in sorted(node.servers.values(), key=lambda s: s.name):
            up = s.is_up(now, down_after)
            servers.append(
                {
                    "name": s.name,
                    "host": s.host,
                    "address": s.address,
                    "public_url": s.public_url,
                    "state": s.state,
                    "up": up,
                    "heartbeat": s.heartbeat,
                    "heartbeat_age": max(0.0, now - s.heartbeat),
                    "disk_free": s.disk_free,
                    "disk_total": s.disk_total,
                    "disk_used": max(0, s.disk_total - s.disk_free),
                    "full": s.full,
                    "files": self.held.get(s.name, 0),
                }
            )
        down = [s["name"] for s in servers if not s["up"] and s["state"] != ServerState.DEAD]
        me = next((s for s in servers if s["name"] == node.name), None) or {
            "name": node.name,
            "disk_free": 0,
            "disk_total": 0,
            "files": 0,
        }
        scrub = self.scrubber
        lag = 0.0 if health.oldest_short is None else max(0.0, now - health.oldest_short)
        storage = node.storage
        disk = {
            "free": storage.free or 0,
            "total": storage.total,
            "reserve": storage.reserve,
            "full": storage.full,
        }
        problems = []
        if storage.full:
            problems.append(
                f"disk full: {humanize.size(disk['free'])} free, reserve "
                f"{humanize.size(storage.reserve)}; this server takes no new files or copies"
            )
        others_full = [s["name"] for s in servers if s["name"] != node.name and s["full"]]
        if others_full:
            problems.append(f"disk full on {', '.join(others_full)}")
        if down:
            problems.append(f"{len(down)} of {len(servers)} servers down: {', '.join(down)}")
        if health.lost:
            problems.append(f"{health.lost} files have no good copy")
        if health.under_replicated:
            problems.append(f"{health.under_replicated} files short of their copies")
        if health.quarantined:
            problems.append(f"{health.quarantined} copies quarantined")
        return {
            "server": node.name,
            "version": __version__,
            "time": now,
            "polled": self.polled,
            "healthy": not problems,
            "problems": problems,
            "me": me,
            "disk": disk,
            "servers": servers,
            "down": down,
            "cluster": asdict(health),
            "replication": {
                "retries": len(self.replicator.retries) if self.replicator is not None else 0,
                "under_replicated": health.under_replicated,
                "missing_copies": health.missing_copies,
                "lag": lag,
            },
            "scrub": {
                "running": bool(scrub is not None and scrub.running),
                "rate": scrub.rate if scrub is not None else 0,
                "rounds": scrub.rounds if scrub is not None else 0,
                "cursor": scrub.cursor if scrub is not None else 0,
                "files_checked": scrub.files_checked if scrub is not None else 0,
                "bytes_checked": scrub.bytes_checked if scrub is not None else 0,
                "bad": scrub.bad if scrub is not None else 0,
                "last_bad": scrub.last_bad if scrub is not None else None,
            },
        }

    def json(self) -> bytes:
        return json.dumps(self.snapshot(), indent=1, sort_keys=True).encode() + b"\n"

    def html(self) -> bytes:
        return render_html(self.snapshot())


_STYLE = """
body{font-family:system-ui,sans-serif;margin:0;padding:1em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .3em}h2{font-size:1.05em;margin:1.2em 0 .4em}
.ok{color:#1a7f37}.bad{color:#b42318;font-weight:600}
.scroll{overflow-x:auto}table{border-collapse:collapse;min-width:100%;font-size:.9em}
th,td{padding:.35em .6em;border-bottom:1px solid #ddd;text-align:left;white-space:nowrap}
td.n{text-align:right}dl{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1em;margin:0}
dt{color:#555}dd{margin:0}small{color:#666}
"""


def render_html(snap: dict[str, Any]) -> bytes:
    """
    The status page: plain HTML with no script, readable on a phone
    (viewport, tables that scroll sideways), reloading itself.
    """
    e = html.escape
    rows = []
    for s in snap["servers"]:
        dead = s["state"] == ServerState.DEAD
        state = s["state"] if s["up"] or dead else f"{s['state']}, down"
        if s["full"]:
            state += ", disk full"
        cls = "bad" if "down" in state or dead or s["full"] else "ok"
        rows.append(
            "<tr>"
            f"<td>{e(s['name'])}</td><td>{e(s['host'])}</td>"
            f'<td class="{cls}">{e(state)}</td>'
            f"<td>{e(humanize.age(s['heartbeat_age']))}</td>"
            f'<td class="n">{e(humanize.size(s["disk_used"]))}</td>'
            f'<td class="n">{e(humanize.size(s["disk_free"]))}</td>'
            f'<td class="n">{s["files"]}</td>'
            f"<td>{e(s['address'])}</td>"
            "</tr>"
        )
    cluster, repl, scrub = snap["cluster"], snap["replication"], snap["scrub"]
    if snap["healthy"]:
        verdict = '<p class="ok">OK</p>'
    else:
        items = "".join(f"<li>{e(p)}</li>" for p in snap["problems"])
        verdict = f'<p class="bad">DEGRADED</p><ul class="bad">{items}</ul>'
    polled = "not yet" if snap["polled"] is None else humanize.age(snap["time"] - snap["polled"])
    scrub_state = f"running at {humanize.size(scrub['rate'])}/s" if scrub["running"] else "off"
    when = datetime.fromtimestamp(snap["time"], timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="{REFRESH}">
<title>KoboldFS {e(snap["server"])}</title><style>{_STYLE}</style></head>
<body>
<h1>KoboldFS: {e(snap["server"])}</h1>
<small>{e(when)}, KoboldFS {e(snap["version"])}; counts polled {e(polled)};
also <a href="status.json">status.json</a>, <a href="metrics">metrics</a></small>
{verdict}
<h2>Servers</h2>
<div class="scroll"><table id="servers">
<tr><th>Name</th><th>Host</th><th>State</th><th>Heartbeat</th><th>Used</th>
<th>Free above reserve</th><th>Files</th><th>Address</th></tr>
{"".join(rows)}
</table></div>
<h2>Files</h2>
<dl>
<dt>Live files</dt><dd>{cluster["files"]} ({e(humanize.size(cluster["bytes"]))})</dd>
<dt>Short of copies</dt><dd>{repl["under_replicated"]} files,
{repl["missing_copies"]} copies to make{
        ("; oldest written " + e(humanize.age(repl["lag"]))) if repl["under_replicated"] else ""
    }</dd>
<dt>No good copy</dt><dd>{cluster["lost"]}</dd>
<dt>Quarantined copies</dt><dd>{cluster["quarantined"]}</dd>
<dt>Deleted, to reclaim</dt><dd>{cluster["deleted"]}</dd>
<dt>Copies to retry here</dt><dd>{repl["retries"]}</dd>
</dl>
<h2>Scrub on this server</h2>
<dl>
<dt>State</dt><dd>{e(scrub_state)}</dd>
<dt>Rounds done</dt><dd>{scrub["rounds"]}; now past file {scrub["cursor"]}</dd>
<dt>Checked</dt><dd>{scrub["files_checked"]} copies, {e(humanize.size(scrub["bytes_checked"]))}</dd>
<dt>Found bad</dt><dd>{scrub["bad"]}{
        (" (last: " + e(scrub["last_bad"]) + ")") if scrub["last_bad"] else ""
    }</dd>
</dl>
</body></html>
"""
    return page.encode("utf-8")
