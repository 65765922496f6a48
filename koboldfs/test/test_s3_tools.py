"""
The S3 tools people use, with their default settings, against the S3
front end of a real C{twistd koboldfs}: the AWS CLI, rclone (provider
C{Other}) and s3fs.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from koboldfs.test.cluster import ClusterMixin, ServerProcess
from koboldfs.test.test_s3_server import ACCESS_KEY, REGION, SECRET, _credentials_file, boto

#: Below the AWS CLI's 8 MiB multipart threshold, above rclone's and
#: botocore's single-chunk reads.
MEDIUM = 5 * 1024 * 1024 + 11


def tree(root: str) -> dict[str, bytes]:
    """
    A directory tree of a few files, written under C{root}.
    """
    rng = random.Random(root)
    files = {"small.txt": b"hello\n", "medium.bin": rng.randbytes(MEDIUM),
             "sub/one.bin": rng.randbytes(1000), "sub/deeper/two.bin": rng.randbytes(70000),
             "space and ünïcode.txt": b"names\n"}
    for name, data in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return files


class ToolTests(ClusterMixin, TestCase):
    timeout = 300

    async def server(self) -> ServerProcess:
        base = os.path.abspath(self.mktemp())
        self._clusterBase = base
        server: ServerProcess = await self.startServer(
            "s", extra=(f"--s3-credentials={_credentials_file(base)}",))
        self.s3 = boto(server.s3)
        await deferToThread(self.s3.create_bucket, Bucket="bkt")
        self.tmp = os.path.join(base, "work")
        os.makedirs(self.tmp)
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("AWS_") and k != "REQUESTS_CA_BUNDLE"}
        self.env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET,
                        AWS_DEFAULT_REGION=REGION,
                        AWS_CONFIG_FILE=os.path.join(self.tmp, "none"),
                        AWS_SHARED_CREDENTIALS_FILE=os.path.join(self.tmp, "none"))
        return server

    def keys(self, prefix: str = "") -> dict[str, bytes]:
        out = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket="bkt",
                                                                      Prefix=prefix):
            for o in page.get("Contents", []):
                body = self.s3.get_object(Bucket="bkt", Key=o["Key"])["Body"].read()
                out[o["Key"][len(prefix):]] = body
        return out

    def test_aws_cli(self) -> defer.Deferred[None]:
        """
        C{aws s3 cp}, C{ls}, C{sync} twice (the second copies nothing),
        C{rm --recursive}, and C{aws s3api} put/head/get/delete.
        """

        async def run() -> None:
            server = await self.server()

            def aws(*args: str) -> str:
                done = subprocess.run(
                    [sys.executable, "-m", "awscli", "--endpoint-url", server.s3, *args],
                    env=self.env, capture_output=True, text=True, timeout=180)
                if done.returncode:
                    raise AssertionError(f"aws {' '.join(args)}: {done.stderr}")
                return done.stdout

            def check() -> None:
                local = os.path.join(self.tmp, "tree")
                files = tree(local)
                aws("s3", "cp", os.path.join(local, "medium.bin"), "s3://bkt/cp/medium.bin")
                self.assertIn("medium.bin", aws("s3", "ls", "s3://bkt/cp/"))
                back = os.path.join(self.tmp, "back.bin")
                aws("s3", "cp", "s3://bkt/cp/medium.bin", back)
                with open(back, "rb") as f:
                    self.assertEqual(f.read(), files["medium.bin"])
                first = aws("s3", "sync", local, "s3://bkt/synced")
                self.assertEqual(first.count("upload:"), len(files))
                self.assertEqual(self.keys("synced/"), files)
                self.assertEqual(aws("s3", "sync", local, "s3://bkt/synced"), "")
                listing = aws("s3", "ls", "--recursive", "s3://bkt/synced/")
                self.assertEqual(len(listing.splitlines()), len(files))
                aws("s3", "rm", "--recursive", "s3://bkt/synced")
                self.assertEqual(self.keys("synced/"), {})
                small = os.path.join(local, "small.txt")
                aws("s3api", "put-object", "--bucket", "bkt", "--key", "api/x",
                    "--body", small)
                self.assertIn('"ContentLength": 6', aws("s3api", "head-object", "--bucket",
                                                        "bkt", "--key", "api/x"))
                out = os.path.join(self.tmp, "api.out")
                aws("s3api", "get-object", "--bucket", "bkt", "--key", "api/x", out)
                with open(out, "rb") as f:
                    self.assertEqual(f.read(), b"hello\n")
                aws("s3api", "delete-object", "--bucket", "bkt", "--key", "api/x")
                self.assertEqual(self.keys("api/"), {})

            await deferToThread(check)

        return defer.ensureDeferred(run())

    def test_rclone(self) -> defer.Deferred[None]:
        """
        rclone with an C{s3} remote, provider C{Other}: copy, sync, check,
        lsf, delete.
        """
        rclone = os.environ.get("KOBOLDFS_TEST_RCLONE") or shutil.which("rclone")
        if not rclone:
            raise SkipTest("rclone is not installed (.ci/run installs it)")

        async def run() -> None:
            server = await self.server()
            conf = os.path.join(self.tmp, "rclone.conf")
            with open(conf, "w") as f:
                f.write(f"[k]\ntype = s3\nprovider = Other\naccess_key_id = {ACCESS_KEY}\n"
                        f"secret_access_key = {SECRET}\nendpoint = {server.s3}\n"
                        f"region = {REGION}\n")
            env = {k: v for k, v in self.env.items() if k != "AWS_CA_BUNDLE"}

            def run_rclone(*args: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run([rclone, "--config", conf, *args], env=env,
                                      capture_output=True, text=True, timeout=180)

            def ok(*args: str) -> str:
                done = run_rclone(*args)
                if done.returncode:
                    raise AssertionError(f"rclone {' '.join(args)}: {done.stderr}")
                return done.stdout + done.stderr

            def check() -> None:
                local = os.path.join(self.tmp, "tree")
                files = tree(local)
                ok("copy", local, "k:bkt/tree")
                self.assertEqual(self.keys("tree/"), files)
                checked = ok("check", local, "k:bkt/tree")
                self.assertIn("0 differences found", checked)
                self.assertIn(f"{len(files)} matching files", checked)
                self.assertEqual(sorted(ok("lsf", "-R", "--files-only", "k:bkt/tree")
                                        .splitlines()), sorted(files))
                os.remove(os.path.join(local, "sub", "one.bin"))
                with open(os.path.join(local, "new.txt"), "wb") as f:
                    f.write(b"new\n")
                ok("sync", local, "k:bkt/tree")
                expected = {k: v for k, v in files.items() if k != "sub/one.bin"}
                expected["new.txt"] = b"new\n"
                self.assertEqual(self.keys("tree/"), expected)
                with open(os.path.join(local, "small.txt"), "wb") as f:
                    f.write(b"changed\n")
                self.assertNotEqual(run_rclone("check", local, "k:bkt/tree").returncode, 0)
                ok("delete", "k:bkt/tree")
                self.assertEqual(self.keys("tree/"), {})

            await deferToThread(check)

        return defer.ensureDeferred(run())

    def test_s3fs(self) -> defer.Deferred[None]:
        """
        s3fs: open for writing and reading, ls, info, rm.
        """

        async def run() -> None:
            import s3fs

            server = await self.server()

            def check() -> None:
                fs: Any = s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET,
                                            endpoint_url=server.s3, skip_instance_cache=True)
                data = random.Random(3).randbytes(MEDIUM)
                with fs.open("bkt/fs/data.bin", "wb") as f:
                    f.write(data)
                with fs.open("bkt/fs/small.txt", "wb") as f:
                    f.write(b"small")
                with fs.open("bkt/fs/data.bin", "rb") as f:
                    f.seek(1000)
                    self.assertEqual(f.read(5000), data[1000:6000])
                self.assertEqual(fs.cat("bkt/fs/data.bin"), data)
                self.assertEqual(sorted(fs.ls("bkt/fs")), ["bkt/fs/data.bin", "bkt/fs/small.txt"])
                self.assertEqual(fs.info("bkt/fs/data.bin")["size"], MEDIUM)
                fs.rm("bkt/fs/small.txt")
                fs.invalidate_cache()
                self.assertEqual(fs.ls("bkt/fs"), ["bkt/fs/data.bin"])

            await deferToThread(check)

        return defer.ensureDeferred(run())
