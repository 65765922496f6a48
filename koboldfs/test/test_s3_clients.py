"""
Real S3 clients with their default settings against a small in-memory S3
server on 127.0.0.1 built from the L{koboldfs.s3} codec alone: every
request they send must authenticate, parse, decode and verify, and what
each client sends (payload mode, framing, checksums) is what
docs/s3-wire.md says.

This is the codec's ground truth, not the S3 front end: the server here
is a test fixture (threads, a dict for a store) that the adapter will
replace.  Set C{KOBOLDFS_S3_CAPTURE=FILE} to append every request with a
small body to FILE as JSON lines, the source of test_s3_vectors.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import boto3
from botocore.config import Config
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from koboldfs.s3 import xml as s3xml
from koboldfs.s3.checksums import BodyVerifier, multipart_etag
from koboldfs.s3.chunked import ChunkedDecoder
from koboldfs.s3.errors import NoSuchKey, NoSuchUpload, S3Error
from koboldfs.s3.headers import Headers, format_http_date
from koboldfs.s3.request import (
    content_range,
    list_params,
    parse_range,
    parse_request,
    payload_length,
)
from koboldfs.s3.sigv4 import PayloadMode, Verifier
from koboldfs.test.certs import TestCA

ACCESS_KEY = "AKIDKOBOLDCLIENTS"
SECRET = "kobold/clients+secret/EXAMPLEKEY0123456789"
OWNER = s3xml.Owner("kobold", "kobold")
BIG = 9 * 1024 * 1024  # over the 8 MiB multipart threshold of boto3 and the AWS CLI
BODY_OPS = {"PutObject", "UploadPart", "DeleteObjects", "CompleteMultipartUpload",
            "CreateBucket"}


@dataclass
class Seen:
    """
    One request as the fixture received it.
    """

    client: str
    operation: str
    mode: str | None
    scheme: str | None
    framing: str
    headers: list[tuple[str, str]]
    method: str
    path: str
    raw_body: bytes
    when: float


@dataclass
class FakeS3:
    """
    The fixture's state: objects, uploads, what was seen, what failed.
    """

    client: str = ""
    objects: dict[tuple[str, str], bytes] = field(default_factory=dict)
    uploads: dict[str, dict[int, bytes]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    verifier: Verifier = field(default_factory=lambda: Verifier(
        {ACCESS_KEY: SECRET}.get, time.time, "us-east-1"))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, *args: object) -> None:
        pass

    def _raw_body(self) -> tuple[bytes, str]:
        """
        The body with HTTP's own framing removed (what twisted.web gives
        the adapter).
        """
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    return bytes(out), "Transfer-Encoding: chunked"
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length), "Content-Length"

    def handle_request(self) -> None:
        fake: FakeS3 = self.server.fake
        raw, framing = self._raw_body()
        path, _, query = self.path.partition("?")
        headers = Headers(self.headers.items())
        operation, mode, scheme = "?", None, None
        try:
            auth = fake.verifier.verify(self.command, path, query, headers)
            if auth is None:
                raise S3Error("anonymous")
            scheme = auth.scheme.name
            request = parse_request(self.command, headers.get("host"), path, query, headers)
            operation = request.operation
            payload = b""
            if operation in BODY_OPS:
                mode = auth.payload
                length = payload_length(headers, mode) if operation != "CreateBucket" else 0
                payload, trailers = self._decode(raw, length, mode, auth, headers)
                verifier = BodyVerifier.for_request(headers, auth.content_sha256)
                verifier.update(payload)
                digests = verifier.finish(trailers)
            with fake.lock:
                fake.seen.append(Seen(fake.client, operation, mode.name if mode else None, scheme,
                                      framing, list(self.headers.items()), self.command,
                                      self.path, raw, time.time()))
        except S3Error as e:
            # The codec refused what a real client sent: the failure tested.
            with fake.lock:
                fake.failures.append(f"{fake.client} {self.command} {self.path}: {e}")
            status, out_headers, body = e.status, {}, e.body("req")
        else:
            try:
                status, out_headers, body = self._answer(fake, request, payload,
                                                         digests.md5 if payload else "", headers)
            except S3Error as e:  # NoSuchKey and the like: answers, not failures
                status, out_headers, body = e.status, {}, e.body("req")
        self.send_response(status)
        for name, value in out_headers.items():
            if name != "Content-Length":
                self.send_header(name, value)
        self.send_header("x-amz-request-id", "req")
        self.send_header("Content-Length", out_headers.get("Content-Length", str(len(body))))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_request

    def _decode(self, raw: bytes, length: int, mode: PayloadMode, auth: Any,
                headers: Headers) -> tuple[bytes, dict[str, str]]:
        if not mode.streaming:
            if len(raw) != length:
                raise S3Error("length")
            return raw, {}
        decoder = ChunkedDecoder.for_request(auth, headers, length)
        rng = random.Random(len(raw))
        out, i = [], 0
        while i < len(raw):
            n = rng.choice((1, 7, 4096, 65536))
            out += decoder.feed(raw[i:i + n])
            i += n
        return b"".join(out), decoder.finish().trailers

    def _answer(self, fake: FakeS3, request: Any, payload: bytes, md5: str,
                headers: Headers) -> tuple[int, dict[str, str], bytes]:
        op, bucket, key = request.operation, request.bucket, request.key
        with fake.lock:
            if op == "ListBuckets":
                return 200, {}, s3xml.list_buckets(OWNER, [s3xml.Bucket("bkt", 0.0)])
            if op in ("CreateBucket", "HeadBucket"):
                return 200, {}, b""
            if op == "PutObject":
                fake.objects[(bucket, key)] = payload
                return 200, {"ETag": f'"{md5}"'}, b""
            if op in ("GetObject", "HeadObject"):
                data = fake.objects.get((bucket, key))
                if data is None:
                    raise NoSuchKey(Key=key)
                out = {"ETag": f'"{hashlib.md5(data).hexdigest()}"',
                       "Last-Modified": format_http_date(0), "Content-Length": str(len(data))}
                span = parse_range(headers.get("range"), len(data))
                if span is None:
                    return 200, out, data
                start, end = span
                out.update({"Content-Range": content_range(start, end, len(data)),
                            "Content-Length": str(end - start + 1)})
                return 206, out, data[start:end + 1]
            if op == "DeleteObject":
                fake.objects.pop((bucket, key), None)
                return 204, {}, b""
            if op == "DeleteObjects":
                delete = s3xml.parse_delete(payload)
                for name, _ in delete.objects:
                    fake.objects.pop((bucket, name), None)
                return 200, {}, s3xml.delete_result(delete.objects, quiet=delete.quiet)
            if op == "CreateMultipartUpload":
                upload_id = f"up{len(fake.uploads)}"
                fake.uploads[upload_id] = {}
                return 200, {}, s3xml.initiate_multipart_upload(bucket, key, upload_id)
            if op == "UploadPart":
                fake.uploads[request.params["uploadId"]][int(request.params["partNumber"])] = (
                    payload)
                return 200, {"ETag": f'"{md5}"'}, b""
            if op == "CompleteMultipartUpload":
                parts = s3xml.parse_complete_multipart_upload(payload)
                stored = fake.uploads.pop(request.params["uploadId"], None)
                if stored is None:
                    raise NoSuchUpload()
                fake.objects[(bucket, key)] = b"".join(stored[p.number] for p in parts)
                etag = multipart_etag([hashlib.md5(stored[p.number]).digest() for p in parts])
                return 200, {}, s3xml.complete_multipart_upload("", bucket, key, etag)
            if op in ("ListObjectsV2", "ListObjects"):
                return 200, {}, self._listing(fake, request)
        raise S3Error(f"the fixture does not answer {op}")

    def _listing(self, fake: FakeS3, request: Any) -> bytes:
        p = list_params(request.params)
        entries, prefixes = [], []
        for (bucket, key), data in sorted(fake.objects.items()):
            if bucket != request.bucket or not key.startswith(p.prefix):
                continue
            rest = key[len(p.prefix):]
            if p.delimiter and p.delimiter in rest:
                common = p.prefix + rest.split(p.delimiter)[0] + p.delimiter
                if common not in prefixes:
                    prefixes.append(common)
                continue
            entries.append(s3xml.ObjectEntry(key, 0.0, hashlib.md5(data).hexdigest(), len(data),
                                             owner=OWNER))
        listing = s3xml.Listing(request.bucket, p.prefix, p.delimiter, p.max_keys, False,
                                entries, prefixes, p.url)
        if request.operation == "ListObjectsV2":
            return s3xml.list_objects_v2(listing, fetch_owner=p.fetch_owner)
        return s3xml.list_objects_v1(listing, marker=p.marker)


class ClientTests(SynchronousTestCase):
    """
    Each client with its defaults: everything it sends verifies.
    """

    def setUp(self) -> None:
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        self.fake = FakeS3()
        self.small = random.Random(1).randbytes(100)
        self.big = random.Random(2).randbytes(BIG)
        for name, data in (("small.bin", self.small), ("big.bin", self.big)):
            with open(os.path.join(self.tmp, name), "wb") as f:
                f.write(data)
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("AWS_") and k not in ("REQUESTS_CA_BUNDLE",)}
        self.env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET,
                        AWS_DEFAULT_REGION="us-east-1",
                        AWS_CONFIG_FILE=os.path.join(self.tmp, "none"),
                        AWS_SHARED_CREDENTIALS_FILE=os.path.join(self.tmp, "none"))

    def serve(self, client: str, tls: bool = False) -> str:
        self.fake.client = client
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.fake = self.fake  # type: ignore[attr-defined]
        scheme = "http"
        if tls:
            ca = TestCA(os.path.join(self.tmp, "ca"))
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(ca.server_pem("127.0.0.1"))
            server.socket = context.wrap_socket(server.socket, server_side=True)
            self.ca = ca.ca
            scheme = "https"
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 10)
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        return f"{scheme}://127.0.0.1:{server.server_address[1]}"

    def tearDown(self) -> None:
        capture = os.environ.get("KOBOLDFS_S3_CAPTURE")
        if capture:
            with open(capture, "a") as f:
                for s in self.fake.seen:
                    if len(s.raw_body) <= 400:
                        f.write(json.dumps({
                            "client": s.client, "operation": s.operation, "method": s.method,
                            "path": s.path, "headers": s.headers, "when": s.when,
                            "body": base64.b64encode(s.raw_body).decode(),
                        }) + "\n")

    def modes(self, operation: str) -> set[tuple[str | None, str]]:
        return {(s.mode, s.framing) for s in self.fake.seen if s.operation == operation}

    def headers_of(self, operation: str) -> set[str]:
        return {name.lower() for s in self.fake.seen if s.operation == operation
                for name, _ in s.headers}

    def boto3_client(self, endpoint: str, **config: Any) -> Any:
        return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET, region_name="us-east-1",
                            verify=getattr(self, "ca", None), config=Config(**config))

    def test_boto3(self) -> None:
        """
        Over HTTP boto3 signs the payload's SHA-256 and sends a CRC32
        header, in one body (Content-Length) with Expect: 100-continue;
        presigned URLs are signature version 2 by default.
        """
        s3 = self.boto3_client(self.serve("boto3"))
        s3.create_bucket(Bucket="bkt")
        s3.put_object(Bucket="bkt", Key="dir/a b+c%.txt", Body=self.small)
        s3.upload_file(os.path.join(self.tmp, "big.bin"), "bkt", "big.bin")
        self.assertEqual(s3.get_object(Bucket="bkt", Key="big.bin")["Body"].read(), self.big)
        self.assertEqual(
            [o["Key"] for o in s3.list_objects_v2(Bucket="bkt", Prefix="dir/")["Contents"]],
            ["dir/a b+c%.txt"])
        s3.delete_objects(Bucket="bkt", Delete={"Objects": [{"Key": "big.bin"}], "Quiet": True})
        url = s3.generate_presigned_url("get_object",
                                        Params={"Bucket": "bkt", "Key": "dir/a b+c%.txt"})
        self.assertIn("AWSAccessKeyId=", url)
        self.assertEqual(urllib.request.urlopen(url, timeout=30).read(), self.small)
        url = s3.generate_presigned_url("put_object", Params={"Bucket": "bkt", "Key": "pp"},
                                        ExpiresIn=60)
        urllib.request.urlopen(urllib.request.Request(url, data=b"presigned", method="PUT",
                                                      headers={"Content-Type": ""}), timeout=30)
        v4 = self.boto3_client(s3.meta.endpoint_url, signature_version="s3v4")
        url = v4.generate_presigned_url("get_object", Params={"Bucket": "bkt", "Key": "pp"})
        self.assertIn("X-Amz-Signature=", url)
        self.assertEqual(urllib.request.urlopen(url, timeout=30).read(), b"presigned")
        self.assertEqual(self.fake.failures, [])
        self.assertEqual(self.modes("PutObject"), {("SHA256", "Content-Length"),
                                                   ("UNSIGNED", "Content-Length")})
        self.assertEqual(self.modes("UploadPart"), {("SHA256", "Content-Length")})
        self.assertIn("x-amz-checksum-crc32", self.headers_of("UploadPart"))
        self.assertIn("expect", self.headers_of("PutObject"))
        self.assertEqual({s.scheme for s in self.fake.seen if s.operation == "GetObject"},
                         {"HEADER", "V2_PRESIGNED", "PRESIGNED"})

    def test_boto3_https(self) -> None:
        """
        Over HTTPS boto3 sends aws-chunked, unsigned, with a trailing CRC32
        (STREAMING-UNSIGNED-PAYLOAD-TRAILER), inside Transfer-Encoding:
        chunked and with no Content-Length.
        """
        s3 = self.boto3_client(self.serve("boto3-https", tls=True))
        s3.put_object(Bucket="bkt", Key="small", Body=self.small)
        s3.upload_file(os.path.join(self.tmp, "big.bin"), "bkt", "big.bin")
        self.assertEqual(s3.get_object(Bucket="bkt", Key="big.bin")["Body"].read(), self.big)
        self.assertEqual(self.fake.failures, [])
        expected = {("STREAMING_UNSIGNED_TRAILER", "Transfer-Encoding: chunked")}
        self.assertEqual(self.modes("PutObject"), expected)
        self.assertEqual(self.modes("UploadPart"), expected)
        self.assertNotIn("content-length", self.headers_of("PutObject"))

    def aws(self, endpoint: str, *args: str) -> None:
        subprocess.run([sys.executable, "-m", "awscli", "--endpoint-url", endpoint, *args],
                       env=self.env, check=True, capture_output=True, timeout=120)

    def test_aws_cli(self) -> None:
        """
        The AWS CLI sends what boto3 sends over HTTP (it is botocore).
        """
        endpoint = self.serve("awscli")
        small, big = os.path.join(self.tmp, "small.bin"), os.path.join(self.tmp, "big.bin")
        self.aws(endpoint, "s3", "cp", small, "s3://bkt/small.bin")
        self.aws(endpoint, "s3", "cp", big, "s3://bkt/big.bin")
        self.aws(endpoint, "s3api", "put-object", "--bucket", "bkt", "--key", "api.bin",
                 "--body", small)
        self.aws(endpoint, "s3", "ls", "s3://bkt/")
        self.aws(endpoint, "s3", "cp", "s3://bkt/big.bin", os.path.join(self.tmp, "back.bin"))
        self.aws(endpoint, "s3", "rm", "--recursive", "s3://bkt/")
        with open(os.path.join(self.tmp, "back.bin"), "rb") as f:
            self.assertEqual(f.read(), self.big)
        self.assertEqual(self.fake.failures, [])
        self.assertEqual(self.fake.objects, {})
        self.assertEqual(self.modes("PutObject"), {("SHA256", "Content-Length")})
        self.assertEqual(self.modes("UploadPart"), {("SHA256", "Content-Length")})

    def test_rclone(self) -> None:
        """
        rclone (provider Other) sends UNSIGNED-PAYLOAD with Content-MD5,
        one PUT up to its 200 MiB cutoff, and lists with ListObjects v1.
        """
        rclone = os.environ.get("KOBOLDFS_TEST_RCLONE") or shutil.which("rclone")
        if not rclone:
            raise SkipTest("rclone is not installed (.ci/run installs it)")
        endpoint = self.serve("rclone")
        conf = os.path.join(self.tmp, "rclone.conf")
        with open(conf, "w") as f:
            f.write(f"[k]\ntype = s3\nprovider = Other\naccess_key_id = {ACCESS_KEY}\n"
                    f"secret_access_key = {SECRET}\nendpoint = {endpoint}\n"
                    "region = us-east-1\n")
        tree = os.path.join(self.tmp, "tree")
        os.makedirs(os.path.join(tree, "sub"))
        for name in ("small.bin", "big.bin"):
            shutil.copy(os.path.join(self.tmp, name), os.path.join(tree, name))
        with open(os.path.join(tree, "sub", "x.txt"), "w") as f:
            f.write("hi\n")

        def run(*args: str) -> str:
            return subprocess.run([rclone, "--config", conf, *args], env=self.env, check=True,
                                  capture_output=True, text=True, timeout=120).stdout

        run("copy", tree, "k:bkt/tree")
        run("check", tree, "k:bkt/tree")
        self.assertEqual(sorted(run("lsf", "-R", "k:bkt/tree").split()),
                         ["big.bin", "small.bin", "sub/", "sub/x.txt"])
        run("delete", "k:bkt/tree")
        self.assertEqual(self.fake.failures, [])
        self.assertEqual(self.modes("PutObject"), {("UNSIGNED", "Content-Length")})
        self.assertIn("content-md5", self.headers_of("PutObject"))
        self.assertIn("ListObjects", {s.operation for s in self.fake.seen})

    def test_s3fs(self) -> None:
        """
        s3fs (aiobotocore) sends what boto3 sends over HTTP; 9 MiB fits
        its 50 MiB block in one PUT.
        """
        import s3fs

        fs = s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET,
                               endpoint_url=self.serve("s3fs"), skip_instance_cache=True)
        with fs.open("bkt/small.bin", "wb") as f:
            f.write(self.small)
        with fs.open("bkt/big.bin", "wb") as f:
            f.write(self.big)
        self.assertEqual(fs.cat("bkt/big.bin"), self.big)
        self.assertEqual(sorted(fs.ls("bkt")), ["bkt/big.bin", "bkt/small.bin"])
        fs.rm("bkt/small.bin")
        self.assertEqual(self.fake.failures, [])
        self.assertEqual(self.modes("PutObject"), {("SHA256", "Content-Length")})
