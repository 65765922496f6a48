"""
The S3 front end (L{koboldfs.s3web}) of real C{twistd koboldfs}
processes, driven by boto3 with its default settings and by hand-made
HTTP requests: every operation, the errors clients act on, presigned
URLs, hostile bodies, and objects read across protocols.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import io
import os
import socket
import sqlite3
import time
import urllib.error
import urllib.request
from typing import Any, Callable

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from koboldfs.deferredclient import DeferredClient
from koboldfs.s3.headers import Headers, format_amz_date
from koboldfs.s3.sigv4 import (
    ChunkSigner,
    Scope,
    canonical_request,
    signing_key,
    string_to_sign,
)
from koboldfs.test.certs import TestCA
from koboldfs.test.cluster import ClusterMixin, ServerProcess
from koboldfs.test.support import eventually

ACCESS_KEY = "AKIDKOBOLDTEST"
SECRET = "kobold/test+secret/EXAMPLEKEY0123456789"
READER = "AKIDKOBOLDREADER"
READER_SECRET = "reader-secret-0123456789"
REGION = "us-east-1"


def _credentials_file(directory: str) -> str:
    path = os.path.join(directory, "s3-credentials")
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        f.write(f"# test credentials\n{ACCESS_KEY} {SECRET} *:rw\n"
                f"{READER} {READER_SECRET} bkt:ro\n")
    return path


def boto(endpoint: str, key: str = ACCESS_KEY, secret: str = SECRET, **config: Any) -> Any:
    config.setdefault("retries", {"max_attempts": 1})
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key,
                        aws_secret_access_key=secret, region_name=REGION,
                        config=Config(**config))


def sign(method: str, url: str, headers: dict[str, str], content_sha256: str,
         secret: str = SECRET, now: float | None = None) -> tuple[dict[str, str], bytes]:
    """
    Headers signed with SigV4 as a client would (for requests boto3
    cannot be made to send); returns them and the signing key.
    """
    host_path = url.split("://", 1)[1]
    host, _, rest = host_path.partition("/")
    path, _, query = ("/" + rest).partition("?")
    amz_date = format_amz_date(time.time() if now is None else now)
    out = {**headers, "host": host, "x-amz-date": amz_date,
           "x-amz-content-sha256": content_sha256}
    names = tuple(sorted(n.lower() for n in out))
    scope = Scope(amz_date[:8], REGION, "s3")
    canonical = canonical_request(method, path, query, Headers(list(out.items())), names,
                                  content_sha256)
    key = signing_key(secret, scope.date, REGION, "s3")
    signature = hmac.new(key, string_to_sign(amz_date, scope, canonical).encode(),
                         hashlib.sha256).hexdigest()
    out["authorization"] = (f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/{scope.date}/{REGION}/s3/"
                            f"aws4_request, SignedHeaders={';'.join(names)}, "
                            f"Signature={signature}")
    return out, key


def signed_chunks(key: bytes, headers: dict[str, str], chunks: list[bytes],
                  break_at: int | None = None) -> bytes:
    """
    An aws-chunked body whose chunk signatures chain from the request's
    seed signature (or, from chunk C{break_at}, do not).
    """
    seed = headers["authorization"].rsplit("Signature=", 1)[1]
    amz_date = headers["x-amz-date"]
    signer = ChunkSigner(key, amz_date, Scope(amz_date[:8], REGION, "s3"), seed)
    previous, out = seed, bytearray()
    for i, chunk in enumerate([*chunks, b""]):
        signature = signer.chunk(previous, hashlib.sha256(chunk).hexdigest())
        if break_at is not None and i >= break_at:
            signature = signer.chunk("0" * 64, hashlib.sha256(chunk).hexdigest())
        previous = signature
        out += b"%x;chunk-signature=%s\r\n%s\r\n" % (len(chunk), signature.encode(), chunk)
    return bytes(out)


def status_of(call: Callable[[], Any]) -> tuple[int, str]:
    """
    The HTTP status and S3 error code a boto3 call fails with.
    """
    try:
        call()
    except ClientError as e:
        return e.response["ResponseMetadata"]["HTTPStatusCode"], e.response["Error"]["Code"]
    raise AssertionError("the call succeeded")


class S3Tests(ClusterMixin, TestCase):
    """
    One real server per test, with a credentials file.
    """

    timeout = 180

    async def server(self, name: str = "s", **kwargs: Any) -> ServerProcess:
        base = getattr(self, "_clusterBase", None) or os.path.abspath(self.mktemp())
        self._clusterBase = base
        extra = (f"--s3-credentials={_credentials_file(base)}", *kwargs.pop("extra", ()))
        server: ServerProcess = await self.startServer(name, extra=extra, **kwargs)
        self.s3 = boto(server.s3)
        await deferToThread(self.s3.create_bucket, Bucket="bkt")
        return server

    def stored(self, server: ServerProcess) -> list[str]:
        """
        Every file under the server's data directory's files/ (bytes kept).
        """
        found = []
        for root, _, names in os.walk(os.path.join(server.data, "files")):
            found += [os.path.join(root, n) for n in names]
        return sorted(found)

    def test_buckets(self) -> defer.Deferred[None]:
        """
        CreateBucket, ListBuckets, HeadBucket, GetBucketLocation; a
        second create, a missing bucket, an invalid name, a bucket that
        is not empty are refused with S3's codes.
        """

        async def run() -> None:
            server = await self.server()
            s3 = self.s3

            def check() -> None:
                names = [b["Name"] for b in s3.list_buckets()["Buckets"]]
                self.assertEqual(names, ["bkt"])
                s3.head_bucket(Bucket="bkt")
                location = s3.get_bucket_location(Bucket="bkt")
                self.assertIsNone(location["LocationConstraint"])
                self.assertEqual(status_of(lambda: s3.create_bucket(Bucket="bkt")),
                                 (409, "BucketAlreadyOwnedByYou"))
                self.assertEqual(status_of(lambda: s3.head_bucket(Bucket="nope"))[0], 404)
                self.assertEqual(status_of(lambda: s3.list_objects_v2(Bucket="nope")),
                                 (404, "NoSuchBucket"))
                self.assertEqual(status_of(lambda: s3.put_object(Bucket="nope", Key="k",
                                                                 Body=b"x")),
                                 (404, "NoSuchBucket"))
                elsewhere = {"LocationConstraint": "eu-west-1"}
                self.assertEqual(status_of(lambda: s3.create_bucket(
                    Bucket="bucket2", CreateBucketConfiguration=elsewhere)),
                    (400, "InvalidLocationConstraint"))
                raw = urllib.request.Request(server.s3 + "/Bad_Name", method="GET")
                with self.assertRaises(urllib.error.HTTPError) as e:
                    urllib.request.urlopen(raw, timeout=30)
                self.assertEqual(e.exception.code, 400)
                self.assertIn(b"<Code>InvalidBucketName</Code>", e.exception.read())
                s3.put_object(Bucket="bkt", Key="k", Body=b"x")
                self.assertEqual(status_of(lambda: s3.delete_bucket(Bucket="bkt")),
                                 (409, "BucketNotEmpty"))

            await deferToThread(check)

        return defer.ensureDeferred(run())

    def test_objects(self) -> defer.Deferred[None]:
        """
        PutObject, GetObject (whole, Range, conditional, response-*
        overrides), HeadObject, DeleteObject, DeleteObjects: through
        boto3, byte-exact, with S3's codes when refused.
        """

        async def run() -> None:
            await self.server()
            s3 = self.s3
            data = os.urandom(3 * 1024 * 1024 + 17)
            key = "dir/ünïcode b+c%.bin"

            def check() -> None:
                put = s3.put_object(Bucket="bkt", Key=key, Body=data)
                self.assertEqual(put["ETag"], f'"{hashlib.md5(data).hexdigest()}"')
                got = s3.get_object(Bucket="bkt", Key=key)
                self.assertEqual(got["Body"].read(), data)
                self.assertEqual(got["ContentLength"], len(data))
                etag, modified = got["ETag"], got["LastModified"]
                head = s3.head_object(Bucket="bkt", Key=key)
                self.assertEqual((head["ContentLength"], head["ETag"]), (len(data), etag))
                part = s3.get_object(Bucket="bkt", Key=key, Range="bytes=100-199")
                self.assertEqual(part["Body"].read(), data[100:200])
                self.assertEqual(part["ContentRange"], f"bytes 100-199/{len(data)}")
                tail = s3.get_object(Bucket="bkt", Key=key, Range="bytes=-5")
                self.assertEqual(tail["Body"].read(), data[-5:])
                self.assertEqual(status_of(lambda: s3.get_object(
                    Bucket="bkt", Key=key, Range=f"bytes={len(data)}-")), (416, "InvalidRange"))
                self.assertEqual(status_of(lambda: s3.get_object(
                    Bucket="bkt", Key=key, IfNoneMatch=etag))[0], 304)
                self.assertEqual(status_of(lambda: s3.get_object(
                    Bucket="bkt", Key=key, IfMatch='"0000"')), (412, "PreconditionFailed"))
                self.assertEqual(status_of(lambda: s3.get_object(
                    Bucket="bkt", Key=key, IfModifiedSince=modified))[0], 304)
                s3.get_object(Bucket="bkt", Key=key, IfMatch=etag)["Body"].read()
                over = s3.get_object(Bucket="bkt", Key=key, ResponseContentType="text/x-kobold",
                                     ResponseContentDisposition="attachment; filename=x")
                over["Body"].read()
                self.assertEqual(over["ContentType"], "text/x-kobold")
                self.assertEqual(over["ContentDisposition"], "attachment; filename=x")
                self.assertEqual(status_of(lambda: s3.get_object(Bucket="bkt", Key="missing")),
                                 (404, "NoSuchKey"))
                s3.put_object(Bucket="bkt", Key="empty", Body=b"")
                self.assertEqual(s3.get_object(Bucket="bkt", Key="empty")["Body"].read(), b"")
                s3.delete_object(Bucket="bkt", Key=key)
                s3.delete_object(Bucket="bkt", Key=key)  # deleting nothing succeeds
                self.assertEqual(status_of(lambda: s3.head_object(Bucket="bkt", Key=key))[0], 404)
                for name in ("m/1", "m/2", "m/3"):
                    s3.put_object(Bucket="bkt", Key=name, Body=name.encode())
                quiet = s3.delete_objects(Bucket="bkt", Delete={
                    "Objects": [{"Key": "m/1"}], "Quiet": True})
                self.assertNotIn("Deleted", quiet)
                verbose = s3.delete_objects(Bucket="bkt", Delete={
                    "Objects": [{"Key": "m/2"}, {"Key": "m/3"}, {"Key": "never"}]})
                self.assertEqual(sorted(d["Key"] for d in verbose["Deleted"]),
                                 ["m/2", "m/3", "never"])
                self.assertNotIn("Contents", s3.list_objects_v2(Bucket="bkt", Prefix="m/"))

            await deferToThread(check)

        return defer.ensureDeferred(run())

    def test_listings(self) -> defer.Deferred[None]:
        """
        ListObjectsV2 (prefix, delimiter, max-keys and continuation,
        start-after, encoding-type=url), ListObjects v1 (marker) and
        ListObjectVersions (every object its own null version), and the
        paginators that follow them.
        """

        async def run() -> None:
            await self.server()
            s3 = self.s3
            keys = sorted([f"a/{i:02d}" for i in range(7)] + ["b/x/1", "b/y", "c", "d e&f"])

            def check() -> None:
                for key in keys:
                    s3.put_object(Bucket="bkt", Key=key, Body=key.encode())
                pages = s3.get_paginator("list_objects_v2").paginate(
                    Bucket="bkt", PaginationConfig={"PageSize": 3})
                listed = [o["Key"] for page in pages for o in page.get("Contents", [])]
                self.assertEqual(listed, keys)
                top = s3.list_objects_v2(Bucket="bkt", Delimiter="/")
                self.assertEqual([p["Prefix"] for p in top["CommonPrefixes"]], ["a/", "b/"])
                self.assertEqual([o["Key"] for o in top["Contents"]], ["c", "d e&f"])
                self.assertEqual(top["KeyCount"], 4)
                self.assertEqual(top["Contents"][0]["Size"], 1)
                short = s3.list_objects_v2(Bucket="bkt", Delimiter="/", MaxKeys=1)
                self.assertTrue(short["IsTruncated"])
                self.assertEqual([p["Prefix"] for p in short["CommonPrefixes"]], ["a/"])
                rest = s3.list_objects_v2(Bucket="bkt", Delimiter="/",
                                          ContinuationToken=short["NextContinuationToken"])
                self.assertEqual([p["Prefix"] for p in rest["CommonPrefixes"]], ["b/"])
                after = s3.list_objects_v2(Bucket="bkt", StartAfter="b/y")
                self.assertEqual([o["Key"] for o in after["Contents"]], ["c", "d e&f"])
                sub = s3.list_objects_v2(Bucket="bkt", Prefix="b/", Delimiter="/")
                self.assertEqual([o["Key"] for o in sub["Contents"]], ["b/y"])
                self.assertEqual([p["Prefix"] for p in sub["CommonPrefixes"]], ["b/x/"])
                v1 = s3.get_paginator("list_objects").paginate(
                    Bucket="bkt", PaginationConfig={"PageSize": 4})
                self.assertEqual([o["Key"] for page in v1 for o in page.get("Contents", [])],
                                 keys)
                marker = s3.list_objects(Bucket="bkt", Marker="a/05")
                self.assertEqual(marker["Contents"][0]["Key"], "a/06")
                versions = s3.list_object_versions(Bucket="bkt", Prefix="a/")
                self.assertEqual([(v["Key"], v["VersionId"], v["IsLatest"])
                                  for v in versions["Versions"]],
                                 [(f"a/{i:02d}", "null", True) for i in range(7)])
                self.assertEqual(status_of(lambda: s3.list_objects_v2(
                    Bucket="bkt", ContinuationToken="!!")), (400, "InvalidArgument"))

            await deferToThread(check)

        return defer.ensureDeferred(run())

    def test_presigned(self) -> defer.Deferred[None]:
        """
        Presigned URLs, both versions, fetched with a plain HTTP client:
        GET and PUT work, an expired one or one changed after signing is
        refused, and more than 7 days is refused.
        """

        async def run() -> None:
            server = await self.server()
            s3 = self.s3
            v4 = boto(server.s3, signature_version="s3v4")

            def check() -> None:
                s3.put_object(Bucket="bkt", Key="p", Body=b"presigned get")
                for client in (s3, v4):
                    url = client.generate_presigned_url(
                        "get_object", Params={"Bucket": "bkt", "Key": "p"})
                    self.assertEqual(urllib.request.urlopen(url, timeout=30).read(),
                                     b"presigned get")
                    with self.assertRaises(urllib.error.HTTPError) as e:
                        urllib.request.urlopen(url.replace("/p?", "/q?"), timeout=30)
                    self.assertEqual(e.exception.code, 403)
                url = v4.generate_presigned_url(
                    "put_object", Params={"Bucket": "bkt", "Key": "pp"}, ExpiresIn=60)
                put = urllib.request.Request(url, data=b"presigned put", method="PUT")
                urllib.request.urlopen(put, timeout=30).read()
                self.assertEqual(s3.get_object(Bucket="bkt", Key="pp")["Body"].read(),
                                 b"presigned put")
                expired = v4.generate_presigned_url(
                    "get_object", Params={"Bucket": "bkt", "Key": "p"}, ExpiresIn=1)
                old = s3.generate_presigned_url(
                    "get_object", Params={"Bucket": "bkt", "Key": "p"}, ExpiresIn=1)
                time.sleep(2.5)
                for url in (expired, old):
                    with self.assertRaises(urllib.error.HTTPError) as e:
                        urllib.request.urlopen(url, timeout=30)
                    self.assertEqual(e.exception.code, 403)
                    self.assertIn(b"<Code>AccessDenied</Code>", e.exception.read())
                week = v4.generate_presigned_url(
                    "get_object", Params={"Bucket": "bkt", "Key": "p"}, ExpiresIn=604801)
                with self.assertRaises(urllib.error.HTTPError) as e:
                    urllib.request.urlopen(week, timeout=30)
                self.assertIn(e.exception.code, (400, 403))

            await deferToThread(check)

        return defer.ensureDeferred(run())

    def test_authentication(self) -> defer.Deferred[None]:
        """
        A wrong secret, an unknown key, a read-only grant writing, an
        anonymous request, a clock 20 minutes off: refused with the code
        clients act on, and nothing is stored.
        """

        async def run() -> None:
            server = await self.server()
            s3 = self.s3
            kept = self.stored(server)

            def check() -> None:
                wrong = boto(server.s3, secret="not the secret")
                self.assertEqual(status_of(lambda: wrong.put_object(
                    Bucket="bkt", Key="x", Body=b"x" * 100000)), (403, "SignatureDoesNotMatch"))
                unknown = boto(server.s3, key="AKIDNOBODY")
                self.assertEqual(status_of(lambda: unknown.list_buckets()),
                                 (403, "InvalidAccessKeyId"))
                reader = boto(server.s3, key=READER, secret=READER_SECRET)
                self.assertEqual(status_of(lambda: reader.put_object(
                    Bucket="bkt", Key="x", Body=b"x")), (403, "AccessDenied"))
                self.assertEqual(status_of(lambda: reader.create_bucket(Bucket="other")),
                                 (403, "AccessDenied"))
                s3.put_object(Bucket="bkt", Key="r", Body=b"readable")
                self.assertEqual(reader.get_object(Bucket="bkt", Key="r")["Body"].read(),
                                 b"readable")
                self.assertEqual([b["Name"] for b in reader.list_buckets()["Buckets"]], ["bkt"])
                with self.assertRaises(urllib.error.HTTPError) as e:
                    urllib.request.urlopen(server.s3 + "/bkt/r", timeout=30)
                self.assertEqual(e.exception.code, 403)
                headers, _ = sign("PUT", server.s3 + "/bkt/skewed", {"content-length": "1"},
                                  hashlib.sha256(b"x").hexdigest(), now=time.time() - 1200)
                status, body = self.raw(server, "PUT", "/bkt/skewed", headers, b"x")
                self.assertEqual(status, 403)
                self.assertIn(b"RequestTimeTooSkewed", body)
                self.assertEqual(status_of(lambda: s3.head_object(Bucket="bkt", Key="x"))[0],
                                 404)

            await deferToThread(check)
            self.assertEqual(len(self.stored(server)), len(kept) + 1)  # "r" alone

        return defer.ensureDeferred(run())

    def raw(self, server: ServerProcess, method: str, path: str, headers: dict[str, str],
            body: bytes) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", server.s3_port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def test_hostile_bodies(self) -> defer.Deferred[None]:
        """
        A body that is not the one signed, fails its Content-MD5 or CRC32,
        ends before its declared length, or whose chunk signatures do not
        chain: refused, nothing stored, and the server keeps serving.
        """

        async def run() -> None:
            server = await self.server()
            kept = self.stored(server)
            url = server.s3

            def check() -> None:
                data = os.urandom(300000)
                lie = hashlib.sha256(b"other").hexdigest()
                headers, _ = sign("PUT", url + "/bkt/a", {"content-length": str(len(data))}, lie)
                status, body = self.raw(server, "PUT", "/bkt/a", headers, data)
                self.assertEqual((status, b"XAmzContentSHA256Mismatch" in body), (400, True))
                headers, _ = sign("PUT", url + "/bkt/b", {
                    "content-length": str(len(data)),
                    "content-md5": "1B2M2Y8AsgTpgAmY7PhCfg=="}, "UNSIGNED-PAYLOAD")
                status, body = self.raw(server, "PUT", "/bkt/b", headers, data)
                self.assertEqual((status, b"BadDigest" in body), (400, True))
                headers, _ = sign("PUT", url + "/bkt/c", {
                    "content-length": str(len(data)), "x-amz-checksum-crc32": "AAAAAA=="},
                    "UNSIGNED-PAYLOAD")
                status, body = self.raw(server, "PUT", "/bkt/c", headers, data)
                self.assertEqual((status, b"BadDigest" in body), (400, True))
                chunks = [os.urandom(70000), os.urandom(70000), os.urandom(123)]
                size = sum(map(len, chunks))
                base = {"content-encoding": "aws-chunked",
                        "x-amz-decoded-content-length": str(size)}
                headers, key = sign("PUT", url + "/bkt/d", base,
                                    "STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
                broken = signed_chunks(key, headers, chunks, break_at=1)
                status, body = self.raw(server, "PUT", "/bkt/d",
                                        {**headers, "content-length": str(len(broken))}, broken)
                self.assertEqual((status, b"SignatureDoesNotMatch" in body), (403, True))
                headers, key = sign("PUT", url + "/bkt/e", base,
                                    "STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
                good = signed_chunks(key, headers, chunks)
                status, body = self.raw(server, "PUT", "/bkt/e",
                                        {**headers, "content-length": str(len(good))}, good)
                self.assertEqual(status, 200, body)
                self.assertEqual(self.s3.get_object(Bucket="bkt", Key="e")["Body"].read(),
                                 b"".join(chunks))
                # Declared 300000 bytes, sent 1000, then the client goes away.
                headers, _ = sign("PUT", url + "/bkt/f", {"content-length": str(len(data))},
                                  "UNSIGNED-PAYLOAD")
                sock = socket.create_connection(("127.0.0.1", server.s3_port), timeout=30)
                head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                sock.sendall(f"PUT /bkt/f HTTP/1.1\r\n{head}\r\n".encode() + data[:1000])
                sock.close()

            await deferToThread(check)

            def head(key: str) -> int:
                return status_of(lambda: self.s3.head_object(Bucket="bkt", Key=key))[0]

            async def gone() -> bool:
                return await deferToThread(head, "f") == 404

            await eventually(gone, timeout=30, what="the short upload to be dropped")
            for key in "abcdf":
                self.assertEqual(await deferToThread(head, key), 404, key)
            self.assertEqual(len(self.stored(server)), len(kept) + 1)  # "e" alone
            tmp = os.path.join(server.data, "tmp")

            async def no_temp() -> bool:
                return not os.path.isdir(tmp) or os.listdir(tmp) == []

            await eventually(no_temp, timeout=30, what="temporary uploads to be removed")

        return defer.ensureDeferred(run())

    def test_expect_continue(self) -> defer.Deferred[None]:
        """
        With C{Expect: 100-continue}, a request that passes its checks
        gets 100 Continue before it sends its body; one that does not gets
        its error at once, and the body is never asked for.
        """

        async def run() -> None:
            server = await self.server()

            def exchange(headers: dict[str, str], body: bytes) -> bytes:
                sock = socket.create_connection(("127.0.0.1", server.s3_port), timeout=30)
                try:
                    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                    sock.sendall(f"PUT /bkt/x HTTP/1.1\r\nexpect: 100-continue\r\n{head}\r\n"
                                 .encode())
                    first = sock.recv(65536)
                    if first.startswith(b"HTTP/1.1 100"):
                        sock.sendall(body)
                        while b"\r\n\r\n" not in first[25:]:
                            more = sock.recv(65536)
                            if not more:
                                break
                            first += more
                    return first
                finally:
                    sock.close()

            def check() -> None:
                body = b"continue"
                headers, _ = sign("PUT", server.s3 + "/bkt/x",
                                  {"content-length": str(len(body))},
                                  hashlib.sha256(body).hexdigest())
                answer = exchange(headers, body)
                self.assertTrue(answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200"),
                                answer)
                headers, _ = sign("PUT", server.s3 + "/bkt/x",
                                  {"content-length": str(len(body))},
                                  hashlib.sha256(body).hexdigest(), secret="wrong")
                answer = exchange(headers, body)
                self.assertTrue(answer.startswith(b"HTTP/1.1 403"), answer)
                self.assertIn(b"SignatureDoesNotMatch", answer)

            await deferToThread(check)

        return defer.ensureDeferred(run())

    def test_https(self) -> defer.Deferred[None]:
        """
        Over HTTPS boto3 sends its uploads aws-chunked, unsigned, with a
        trailing CRC32 inside C{Transfer-Encoding: chunked}: taken, the
        checksum checked, the bytes stored as sent.
        """

        async def run() -> None:
            base = os.path.abspath(self.mktemp())
            self._clusterBase = base
            ca = TestCA(os.path.join(base, "ca"))
            pem = ca.server_pem("127.0.0.1")
            server = ServerProcess(base, "s")
            server.extra = (f"--s3-credentials={_credentials_file(base)}",
                            f"--s3=ssl:{server.s3_port}:privateKey={pem}:interface=127.0.0.1")
            self.addCleanup(lambda: defer.ensureDeferred(server.stop()))
            await server.start()
            s3 = boto3.client("s3", endpoint_url=f"https://127.0.0.1:{server.s3_port}",
                              aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET,
                              region_name=REGION, verify=ca.ca)
            await deferToThread(s3.create_bucket, Bucket="bkt")
            data = os.urandom(3 * 1024 * 1024 + 1)

            def check() -> None:
                s3.put_object(Bucket="bkt", Key="tls", Body=data)
                self.assertEqual(s3.get_object(Bucket="bkt", Key="tls")["Body"].read(), data)
                s3.put_object(Bucket="bkt", Key="tls-small", Body=b"small")
                listed = s3.list_objects_v2(Bucket="bkt", Prefix="tls")["Contents"]
                self.assertEqual([(o["Key"], o["Size"]) for o in listed],
                                 [("tls", len(data)), ("tls-small", 5)])

            await deferToThread(check)

        return defer.ensureDeferred(run())

    def test_cross_protocol(self) -> defer.Deferred[None]:
        """
        An object put through S3 is a file: read byte-exact by the binary
        client and through get_url; a file put by the binary client is an
        object, whose ETag no client would take for an MD5.
        """

        async def run() -> None:
            server = await self.server()
            client = DeferredClient("bkt", [server.address], reactor)
            self.addCleanup(client.close)
            data = os.urandom(2 * 1024 * 1024 + 5)
            await deferToThread(self.s3.put_object, Bucket="bkt", Key="from/s3", Body=data)
            out = io.BytesIO()
            self.assertTrue(await client.get("from/s3", out))
            self.assertEqual(out.getvalue(), data)
            url = await client.get_url("from/s3")
            assert url is not None
            fetched = await deferToThread(lambda: urllib.request.urlopen(url, timeout=30).read())
            self.assertEqual(fetched, data)
            other = os.urandom(1000)
            self.assertTrue(await client.put("from/binary", other))
            got = await deferToThread(self.s3.get_object, Bucket="bkt", Key="from/binary")
            self.assertEqual(await deferToThread(got["Body"].read), other)
            etag = got["ETag"].strip('"')
            self.assertNotRegex(etag, r"^[0-9a-f]{32}$")

        return defer.ensureDeferred(run())

    def test_two_copies_at_the_ack(self) -> defer.Deferred[None]:
        """
        An S3 put to a namespace with C{min_copies=2} is on two hosts
        when it is answered.
        """

        async def run() -> None:
            base = os.path.abspath(self.mktemp())
            self._clusterBase = base
            db = f"sqlite:///{os.path.join(base, 'shared.sqlite')}"
            os.makedirs(base, exist_ok=True)
            b = await self.startServer("b", db=db, host="host-b")
            a = await self.server("a", db=db, host="host-a")
            with sqlite3.connect(db[len("sqlite:///"):]) as conn:
                conn.execute("UPDATE namespaces SET min_copies = 2 WHERE name = 'bkt'")
            client = DeferredClient("bkt", [a.address], reactor)
            self.addCleanup(client.close)
            data = os.urandom(1024 * 1024)
            n = 0

            async def both() -> bool:
                nonlocal n
                n += 1
                try:
                    await deferToThread(self.s3.put_object, Bucket="bkt", Key=f"k{n}", Body=data)
                except ClientError:
                    return False  # a still thinks b is down
                stat = await client.stat(f"k{n}")
                assert stat is not None
                self.assertEqual(sorted(stat.servers), ["a", "b"])
                return True

            await eventually(both, timeout=60, what="a put to land on both hosts")
            self.assertTrue(any(open(p, "rb").read() == data for p in self.stored(b)))

        return defer.ensureDeferred(run())
