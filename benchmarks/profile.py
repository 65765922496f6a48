"""
Where the CPU goes: sums up the py-spy stacks that C{peers.py --profile
DIR} (or C{run.py --profile DIR}) recorded, as milliseconds of CPU per
request (or seconds per GB) for each process and each kind of work.

    python benchmarks/profile.py DIR            # every phase recorded
    python benchmarks/profile.py DIR --top 15   # ...and the busiest lines

Each sample is one thread found busy (py-spy leaves idle threads out;
the few it misses, parked in a poll or a condition wait, are dropped
here); each kind's share of them is scaled to the CPU the process used
in the phase (from /proc, which C{peers.py} writes beside the stacks).
Time in C (hashing, a
syscall) shows as the line of Python that called it, so a sample is put
in the kind of its innermost Python frame, by that frame's module and,
for the storage's thread jobs, by the text of the line (an C{os.fsync},
a hash update, a write).  See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import linecache
import os
import re
import sys

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Samples a second of each busy thread (loadgen.Profiler.RATE).
RATE = 250

#: Innermost frames that are a thread waiting, not working.
IDLE = re.compile(
    r"^(Condition\.wait|EPollReactor\.doPoll|Queue\.get|select|poll|sleep|Event\.wait"
    r"|Thread\.join|_wait_for_tstate_lock) "
)
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+):(?P<line>\d+)\)$")

#: The kinds, in the order of the tables.
KINDS = (
    "fsync",
    "file I/O (open, write, read, rename, mkdir)",
    "hashing (SHA-256)",
    "framing (codec, JSON)",
    "request handling (koboldfs)",
    "metadata (koboldfs SQL, rows)",
    "DB driver (txpostgres, psycopg2)",
    "Twisted (reactor, TCP, Deferreds)",
    "thread hand-offs",
    "logging",
    "metrics",
    "background (scrub, replicator, heartbeat)",
    "load generator (benchmark)",
    "other",
)


def storage_kind(text: str) -> str:
    """
    The kind of a line of koboldfs/storage.py run in a thread job.
    """
    if "fsync" in text:
        return "fsync"
    if re.search(r"hash|sha256|digest", text):
        return "hashing (SHA-256)"
    if re.search(r"os\.|_write|_rename|open\(|mkdir|isdir|realpath", text):
        return "file I/O (open, write, read, rename, mkdir)"
    return "request handling (koboldfs)"


#: What L{read_stacks} counts the background's samples as.
BACKGROUND_LEAF = "(background)"


def kind_of(frame: str) -> str:
    """
    The kind of work of the innermost Python frame of a sample.
    """
    if frame == BACKGROUND_LEAF:
        return "background (scrub, replicator, heartbeat)"
    m = _FRAME.match(frame)
    if m is None:
        return "other"
    func, path, line = m["func"], m["file"], int(m["line"])
    name = path.replace(os.sep, "/")
    if "koboldfs/" in name or name.startswith("koboldfs"):
        module = name[name.find("koboldfs") :]
        if module.endswith(("storage.py",)):
            text = linecache.getline(os.path.join(CHECKOUT, module), line)
            return storage_kind(text)
        if module.endswith(("protocol.py",)):
            return "framing (codec, JSON)"
        if "/metadata/" in module:
            return "metadata (koboldfs SQL, rows)"
        if module.endswith(("metrics.py", "logs.py")):
            return "metrics" if module.endswith("metrics.py") else "logging"
        return "request handling (koboldfs)"
    if "txpostgres" in name or "psycopg2" in name:
        return "DB driver (txpostgres, psycopg2)"
    if name.startswith("json/") or "/json/" in name:
        return "framing (codec, JSON)"
    if "twisted/logger" in name or "twisted/python/log" in name or name.startswith("logging/"):
        return "logging"
    if "twisted/python/logfile" in name or "_format.py" in name or "_tzhelper" in name:
        return "logging"
    if "twisted/_threads" in name or "twisted/python/threadpool" in name:
        return "thread hand-offs"
    if name in ("threading.py", "queue.py") or name.endswith(("/threading.py", "/queue.py")):
        return "thread hand-offs"
    if "twisted/internet/threads" in name or "twisted/python/context" in name:
        return "thread hand-offs"
    if "twisted/" in name:
        return "Twisted (reactor, TCP, Deferreds)"
    if "sqlalchemy" in name:
        return "metadata (koboldfs SQL, rows)"
    if name.endswith(("loadgen.py", "peers.py", "run.py")) or name == "hashlib.py":
        return "load generator (benchmark)"
    if func.startswith(("uuid", "_random")):
        return "request handling (koboldfs)"
    return "other"


#: Modules of a server's background work: a sample with one of their
#: frames anywhere in its stack is theirs, whatever it does.
BACKGROUND = re.compile(r"koboldfs/(replicator|orphans|status|periodic)\.py:|_heartbeat ")


def read_stacks(path: str) -> collections.Counter[str]:
    """
    The busy samples in py-spy's raw output, counted by innermost frame
    (by L{BACKGROUND} for the background's).
    """
    leaves: collections.Counter[str] = collections.Counter()
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            leaf = frames[-1]
            if IDLE.match(leaf):
                continue
            leaves[BACKGROUND_LEAF if BACKGROUND.search(stack) else leaf] += int(count)
    return leaves


def phases(directory: str) -> dict[str, dict[str, collections.Counter[str]]]:
    """
    {phase tag: {process: innermost frames counted}}, with each phase's
    C{TAG.json} (requests and bytes moved).
    """
    out: dict[str, dict[str, collections.Counter[str]]] = {}
    for meta in sorted(glob.glob(os.path.join(directory, "*.json"))):
        tag = os.path.basename(meta)[: -len(".json")]
        out[tag] = {}
        for path in sorted(glob.glob(os.path.join(directory, glob.escape(tag) + ".*.txt"))):
            process = os.path.basename(path)[len(tag) + 1 : -len(".txt")]
            out[tag][process] = read_stacks(path)
    return out


def table(directory: str, tag: str, processes: dict[str, collections.Counter[str]]) -> str:
    """
    A phase's table: for each process, each kind's share of the samples
    times the CPU the process used in the phase (from /proc, as
    C{peers.py} measured it), per request (small files) or per GB.

    Scaled, because on a loaded machine a thread waiting for a core
    looks busy to py-spy: the samples say where the CPU went, /proc how
    much there was.  Without the CPU figure, samples / rate.
    """
    with open(os.path.join(directory, tag + ".json")) as f:
        meta = json.load(f)
    if meta["bytes"] / max(1, meta["requests"]) > 1 << 20:
        amount, unit = meta["bytes"] / 1e9, "CPU s/GB"
    else:
        amount, unit = meta["requests"] / 1000.0, "CPU ms/request"
    cpu = meta.get("cpu", {})
    kinds: dict[str, collections.Counter[str]] = {p: collections.Counter() for p in processes}
    scale = {}
    for process, leaves in processes.items():
        for leaf, n in leaves.items():
            kinds[process][kind_of(leaf)] += n
        samples = sum(leaves.values())
        used = cpu.get(process)
        scale[process] = used / samples if used is not None and samples else 1 / RATE
    names = list(processes)
    lines = [f"| {tag}: {unit} | {' | '.join(names)} |", "|---" * (len(names) + 1) + "|"]
    for kind in KINDS:
        cells = [kinds[p][kind] * scale[p] / amount for p in names]
        if any(c >= 0.005 for c in cells):
            lines.append(f"| {kind} | {' | '.join(f'{c:.2f}' for c in cells)} |")
    totals = [sum(kinds[p].values()) * scale[p] / amount for p in names]
    lines.append(f"| all (/proc CPU) | {' | '.join(f'{c:.2f}' for c in totals)} |")
    samples = [sum(processes[p].values()) for p in names]
    lines.append(f"| (samples) | {' | '.join(str(n) for n in samples)} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--top", type=int, default=0, help="also the N busiest lines of each")
    args = parser.parse_args(argv)
    found = phases(args.directory)
    if not found:
        print(f"profile.py: no phases in {args.directory}", file=sys.stderr)
        return 1
    for tag, processes in found.items():
        print(table(args.directory, tag, processes))
        print()
        for process, leaves in processes.items():
            if args.top:
                print(f"{tag} {process}, busiest lines (samples):")
                for leaf, n in leaves.most_common(args.top):
                    print(f"  {n:6d}  {kind_of(leaf)[:12]:12}  {leaf}")
                print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
