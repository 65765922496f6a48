"""
GET throughput over HTTP: the built-in server against nginx, same data.

Starts one real C{twistd koboldfs} server on loopback (SQLite, a temporary
data directory) and an nginx configured with docs/nginx.conf whose root is
that server's data directory (as koboldfs/test/nginx.py does for the
tests), stores one large file (default 256 MiB) and many 4 KiB files
(default 1,000), then loads both web servers with the same URLs, one after
the other, in the same run:

  - large: GET of the large file, over and over;
  - small: GETs cycling through the small files.

The load generator is wrk (Debian's C{wrk}: a Python client would saturate
first on small files), with 8 connections (C{--connections}) over 2
threads, keep-alive.  Each run lasts C{--seconds}; each workload is run
C{--repeat} times, alternating which server goes first, and the medians
are reported: requests/s, MB/s of file bodies, the CPU each server used
per request, and nginx's figure over the built-in server's.

    python benchmarks/http_serving.py [--large-mib 256] [--small 1000] [--seconds 10] [--repeat 3]

Output: a table, then one JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, CHECKOUT)

from koboldfs import Client  # noqa: E402
from koboldfs.test.cluster import ServerProcess  # noqa: E402
from koboldfs.test.nginx import NginxProcess  # noqa: E402

NAMESPACE = "bench"

# Cycles through the paths in the file named by the script's argument, and
# prints wrk's own counts as one JSON line at the end.
WRK_SCRIPT = """
local paths = {}
init = function(args)
  for line in io.lines(args[1]) do paths[#paths + 1] = line end
  i = 0
end
request = function()
  i = i % #paths + 1
  return wrk.format("GET", paths[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests": %d, "seconds": %f, "errors": %d, "non2xx": %d, "p99_ms": %f}\\n',
    summary.requests, summary.duration / 1e6,
    e.connect + e.read + e.write + e.timeout, e.status, latency:percentile(99) / 1000))
end
"""


def cpu_seconds(pids: list[int]) -> float:
    """
    User and system CPU time used so far by processes C{pids}.
    """
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """
    C{pid} and its children (nginx's workers).
    """
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [pid, *map(int, f.read().split())]


def wrk(args: argparse.Namespace, origin: str, paths_file: str, script: str) -> dict[str, Any]:
    """
    One wrk run against C{origin}: its counts, and the CPU it used.
    """
    before = os.times()
    out = subprocess.run(
        [
            "wrk",
            f"--connections={args.connections}",
            "--threads=2",
            f"--duration={args.seconds}s",
            "--timeout=120s",
            f"--script={script}",
            origin,
            "--",
            paths_file,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    after = os.times()
    match = re.search(r"^WRK (\{.*\})$", out, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"wrk gave no summary:\n{out}")
    result: dict[str, Any] = json.loads(match.group(1))
    if result["errors"] or result["non2xx"]:
        raise RuntimeError(f"wrk saw errors against {origin}: {result}")
    client_cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    result["client_cpu"] = client_cpu / result["seconds"]
    return result


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    nginx_binary = os.environ.get("KOBOLDFS_TEST_NGINX") or shutil.which("nginx")
    if nginx_binary is None and os.path.exists("/usr/sbin/nginx"):
        nginx_binary = "/usr/sbin/nginx"
    if nginx_binary is None:
        raise SystemExit("nginx not found: apt-get install nginx-light")
    base = tempfile.mkdtemp(prefix="koboldfs-bench-http-")
    script = os.path.join(base, "paths.lua")
    with open(script, "w") as f:
        f.write(WRK_SCRIPT)
    nginx = NginxProcess(os.path.join(base, "nginx"), base, binary=nginx_binary)
    server = ServerProcess(base, "server", extra=(f"--public-url={nginx.url}",))
    server.start_blocking()
    nginx.root = server.data
    nginx.launch()
    try:
        while not nginx.listening():
            time.sleep(0.02)
        client = Client(NAMESPACE, servers=[server.address])
        large = os.path.join(base, "large.bin")
        with open(large, "wb") as f:
            for _ in range(args.large_mib):
                f.write(os.urandom(1024 * 1024))
        client.put("large.bin", large)
        os.unlink(large)
        workloads = {"large": ["large.bin"], "small": [f"small/{i}.bin" for i in range(args.small)]}
        for key in workloads["small"]:
            client.put(key, os.urandom(4096))
        sizes = {"large": args.large_mib * 2**20, "small": 4096}
        paths_files = {}
        for name, keys in workloads.items():
            paths = [client.get_url(key).removeprefix(nginx.url) for key in keys]
            paths_files[name] = os.path.join(base, f"{name}.paths")
            with open(paths_files[name], "w") as f:
                f.writelines(path + "\n" for path in paths)
        client.close()

        origins = {
            "builtin": (server.http, lambda: [server.pid]),
            "nginx": (nginx.url, lambda: process_tree(nginx.process.pid)),  # type: ignore[union-attr]
        }
        results: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for repeat in range(args.repeat):
            for name in workloads:
                order = ["builtin", "nginx"] if repeat % 2 == 0 else ["nginx", "builtin"]
                for origin in order:
                    url, pids = origins[origin]
                    cpu = cpu_seconds(pids())
                    result = wrk(args, url, paths_files[name], script)
                    result["server_cpu"] = (cpu_seconds(pids()) - cpu) / result["seconds"]
                    results.setdefault((name, origin), []).append(result)
    finally:
        nginx.stop()
        server.stop_blocking()
        shutil.rmtree(base, ignore_errors=True)

    figures = []
    for name in workloads:
        row: dict[str, Any] = {"figure": name, "file_bytes": sizes[name]}
        for origin in origins:
            runs = results[name, origin]
            rps = statistics.median(r["requests"] / r["seconds"] for r in runs)
            row[origin] = {
                "requests_per_s": rps,
                "MB_per_s": rps * sizes[name] / 1e6,
                "server_cpu_cores": statistics.median(r["server_cpu"] for r in runs),
                "client_cpu_cores": statistics.median(r["client_cpu"] for r in runs),
                "p99_ms": statistics.median(r["p99_ms"] for r in runs),
            }
        row["nginx_over_builtin"] = (
            row["nginx"]["requests_per_s"] / row["builtin"]["requests_per_s"]
        )
        figures.append(row)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large-mib", type=int, default=256)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    figures = run(parser.parse_args())
    print(
        f"{'workload':<10}{'server':<9}{'req/s':>10}{'MB/s':>10}"
        f"{'server CPU':>12}{'wrk CPU':>9}{'p99 ms':>9}"
    )
    for fig in figures:
        for origin in ("builtin", "nginx"):
            o = fig[origin]
            print(
                f"{fig['figure']:<10}{origin:<9}{o['requests_per_s']:>10.1f}{o['MB_per_s']:>10.1f}"
                f"{o['server_cpu_cores']:>12.2f}{o['client_cpu_cores']:>9.2f}{o['p99_ms']:>9.1f}"
            )
        print(
            f"{fig['figure']:<10}{'ratio':<9}{fig['nginx_over_builtin']:>10.2f}  (nginx/built-in)"
        )
    for fig in figures:
        print(json.dumps(fig))


if __name__ == "__main__":
    main()
