"""
KoboldFS's S3 endpoint beside its binary client and beside SeaweedFS's
S3 gateway: the benchmark of issue 15.

Starts two C{twistd koboldfs} servers on distinct hosts sharing one
PostgreSQL database, the namespace (bucket) C{bench} with 2 replicas and
C{min_copies=2} (benchmarks/peers.py's L{KoboldPair}), and a SeaweedFS
cluster with C{weed s3} (benchmarks/seaweed.py: replication 001, two
volume servers, fsync on under C{/buckets/}, where its buckets live).
Then puts and gets the same workloads through the three, from one load
generator of Python threads (a boto3 client per thread with its default
settings for both S3 endpoints; a blocking C{koboldfs.Client} per thread
for the binary protocol), checking every byte that comes back.

    python benchmarks/s3.py              # one run
    python benchmarks/s3.py --smoke      # seconds: does it still measure?

Output: rates per store and workload, the ratios KoboldFS-S3 /
SeaweedFS-S3 and KoboldFS-S3 / KoboldFS-binary, client CPU, one JSON
line per figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from loadgen import (
    IN_MEMORY,
    MIB,
    Bodies,
    HashingWriter,
    Workload,
    exit_on_signals,
    machine,
    reexec_under_postgres,
    run_ops,
)
from peers import NAMESPACE, KoboldPair
from seaweed import MISSING, S3_ACCESS_KEY, S3_SECRET_KEY, Seaweed, find_weed

import boto3
from botocore.config import Config

ACCESS_KEY = "AKIDKOBOLDBENCH"
SECRET = "koboldbench-s3-secret-0123456789abcdef"
#: Issue 15's workloads.
WORKLOADS = (Workload("4 KiB", 4096, 2000, 16), Workload("64 MiB", 64 * MIB, 8, 2))
SMOKE = (Workload("4 KiB", 4096, 40, 4), Workload("64 MiB", 4 * MIB, 2, 2))
KOBOLD_S3, KOBOLD_BINARY, SEAWEED_S3 = "KoboldFS S3", "KoboldFS binary", "SeaweedFS S3"


class S3Store:
    """
    An S3 endpoint through boto3 with its defaults: one client per thread.
    """

    def __init__(self, name: str, endpoint: str, key: str, secret: str) -> None:
        self.name = name
        self.endpoint = endpoint
        self.key = key
        self.secret = secret

    def connect(self) -> Any:
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret, region_name="us-east-1",
                            config=Config(max_pool_connections=4))

    def put(self, client: Any, key: str, body: bytes) -> None:
        client.put_object(Bucket=NAMESPACE, Key=key, Body=body)

    def get(self, client: Any, key: str, size: int) -> tuple[bytes, int]:
        body = client.get_object(Bucket=NAMESPACE, Key=key)["Body"]
        out = HashingWriter()
        if size <= IN_MEMORY:
            out.write(body.read())
        else:
            for chunk in body.iter_chunks(MIB):
                out.write(chunk)
        return out.result()


def measure(store: Any, w: Workload, prefix: str, bodies: Bodies) -> dict[str, float]:
    put = run_ops(store, "put", w, prefix, bodies)
    get = run_ops(store, "get", w, prefix, bodies)
    unit = 1 if w.size <= 64 * 1024 else w.size / 1e6
    return {"put": w.count * unit / put["seconds"], "get": w.count * unit / get["seconds"],
            "put_client_cpu_s": put["client_cpu_s"], "get_client_cpu_s": get["client_cpu_s"]}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres-url", default=os.environ.get("KOBOLDFS_TEST_POSTGRES_URL"))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--tmp", default=None, help="scratch directory parent")
    parser.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    exit_on_signals()
    if not args.postgres_url:
        reexec_under_postgres(__file__)
        print("s3.py: no PostgreSQL (give --postgres-url)", file=sys.stderr)
        return 2
    weed_binary = find_weed()
    if weed_binary is None:
        print(f"s3.py: {MISSING}", file=sys.stderr)
        return 2
    base = tempfile.mkdtemp(prefix="koboldfs-s3bench-", dir=args.tmp)
    credentials = os.path.join(base, "s3-credentials")
    with open(credentials, "w") as f:
        f.write(f"{ACCESS_KEY} {SECRET} {NAMESPACE}:rw\n")
    results: dict[str, dict[str, dict[str, float]]] = {}
    try:
        with contextlib.ExitStack() as stack:
            weed = Seaweed(base, weed=weed_binary, fsync_prefixes=("/buckets/",), s3=True)
            stack.callback(weed.stop)
            weed.start()
            kobold = KoboldPair(base, args.postgres_url,
                                extra=(f"--s3-credentials={credentials}",))
            stack.callback(kobold.stop)
            seaweed_s3 = S3Store(SEAWEED_S3, weed.s3_url or "", S3_ACCESS_KEY, S3_SECRET_KEY)
            seaweed_s3.connect().create_bucket(Bucket=NAMESPACE)
            stores = [S3Store(KOBOLD_S3, kobold.servers[0].s3, ACCESS_KEY, SECRET),
                      kobold.store, seaweed_s3]
            for w in SMOKE if args.smoke else WORKLOADS:
                bodies = Bodies(w.size)
                for store in stores:
                    name = store.name if store is not kobold.store else KOBOLD_BINARY
                    prefix = f"{name.replace(' ', '-')}/{w.size}/{time.time_ns()}"
                    print(f"s3.py: {name} {w.name} x {w.count} ...", file=sys.stderr, flush=True)
                    results.setdefault(w.name, {})[name] = measure(store, w, prefix, bodies)
            missing = kobold.missing()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"machine: {json.dumps(machine())}")
    print("| workload | store | put | get |\n| --- | --- | --- | --- |")
    for w in SMOKE if args.smoke else WORKLOADS:
        unit = "req/s" if w.size <= 64 * 1024 else "MB/s"
        for name, r in results[w.name].items():
            print(f"| {w.name} x {w.count}, {w.concurrency} threads | {name} | "
                  f"{r['put']:.1f} {unit} | {r['get']:.1f} {unit} |")
    print("\n| ratio | put | get |\n| --- | --- | --- |")
    for w in SMOKE if args.smoke else WORKLOADS:
        r = results[w.name]
        for other in (SEAWEED_S3, KOBOLD_BINARY):
            print(f"| {w.name}: {KOBOLD_S3} / {other} | {r[KOBOLD_S3]['put'] / r[other]['put']:.2f}"
                  f" | {r[KOBOLD_S3]['get'] / r[other]['get']:.2f} |")
    print(f"\ncopies missing on KoboldFS after the run (min_copies=2): {missing}")
    figures = [{"workload": w.name, "count": w.count, "threads": w.concurrency, "store": name, **r}
               for w in (SMOKE if args.smoke else WORKLOADS)
               for name, r in results[w.name].items()]
    for figure in figures:
        print(json.dumps(figure))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine(), "figures": figures, "missing_copies": missing}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
