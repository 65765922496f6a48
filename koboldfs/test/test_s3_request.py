"""
Tests for L{koboldfs.s3.request}: every operation as boto3 serializes it
maps to its name, path-style and virtual-hosted; bucket and key rules;
Range; conditional requests with S3's precedence; overrides; copy
sources.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlsplit

import boto3
from botocore.config import Config
from twisted.trial.unittest import SynchronousTestCase

from koboldfs.names import is_bucket_name
from koboldfs.s3 import errors
from koboldfs.s3.headers import Headers, format_http_date
from koboldfs.s3.request import (
    CopySource,
    check_conditions,
    evaluate_conditions,
    list_params,
    metadata_directive,
    object_headers,
    parse_copy_range,
    parse_copy_source,
    parse_range,
    parse_request,
    part_number,
    payload_length,
    response_overrides,
)
from koboldfs.s3.sigv4 import PayloadMode


class _Stop(Exception):
    pass


def boto3_requests(calls: list[tuple[str, dict[str, Any]]], addressing: str = "path") -> list[Any]:
    """
    The requests boto3 would send for C{calls}, captured before sending
    (nothing leaves the process).
    """
    client = boto3.client(
        "s3", endpoint_url="http://s3.example.com", aws_access_key_id="a",
        aws_secret_access_key="b", region_name="us-east-1",
        config=Config(retries={"max_attempts": 0}, s3={"addressing_style": addressing}),
    )
    captured = []

    def grab(request: Any, **kw: Any) -> None:
        captured.append(request)
        raise _Stop()

    client.meta.events.register("before-send", grab)
    for name, kwargs in calls:
        try:
            getattr(client, name)(**kwargs)
        except _Stop:
            pass
    return captured


CALLS: list[tuple[str, str, dict[str, Any]]] = [
    ("ListBuckets", "list_buckets", {}),
    ("CreateBucket", "create_bucket", {"Bucket": "bkt"}),
    ("HeadBucket", "head_bucket", {"Bucket": "bkt"}),
    ("DeleteBucket", "delete_bucket", {"Bucket": "bkt"}),
    ("GetBucketLocation", "get_bucket_location", {"Bucket": "bkt"}),
    ("PutObject", "put_object", {"Bucket": "bkt", "Key": "a/b c", "Body": b"x"}),
    ("GetObject", "get_object", {"Bucket": "bkt", "Key": "k", "Range": "bytes=0-1",
                                 "ResponseContentType": "text/plain"}),
    ("GetObject", "get_object", {"Bucket": "bkt", "Key": "k", "PartNumber": 2}),
    ("HeadObject", "head_object", {"Bucket": "bkt", "Key": "k"}),
    ("DeleteObject", "delete_object", {"Bucket": "bkt", "Key": "k"}),
    ("DeleteObjects", "delete_objects",
     {"Bucket": "bkt", "Delete": {"Objects": [{"Key": "k"}], "Quiet": True}}),
    ("CopyObject", "copy_object",
     {"Bucket": "bkt", "Key": "k", "CopySource": {"Bucket": "src", "Key": "a b"}}),
    ("ListObjectsV2", "list_objects_v2", {"Bucket": "bkt", "Prefix": "p/", "Delimiter": "/"}),
    ("ListObjects", "list_objects", {"Bucket": "bkt", "Marker": "m"}),
    ("ListObjectVersions", "list_object_versions", {"Bucket": "bkt"}),
    ("CreateMultipartUpload", "create_multipart_upload", {"Bucket": "bkt", "Key": "k"}),
    ("UploadPart", "upload_part",
     {"Bucket": "bkt", "Key": "k", "UploadId": "u", "PartNumber": 1, "Body": b"x"}),
    ("UploadPartCopy", "upload_part_copy",
     {"Bucket": "bkt", "Key": "k", "UploadId": "u", "PartNumber": 1, "CopySource": "src/x"}),
    ("CompleteMultipartUpload", "complete_multipart_upload",
     {"Bucket": "bkt", "Key": "k", "UploadId": "u",
      "MultipartUpload": {"Parts": [{"PartNumber": 1, "ETag": '"e"'}]}}),
    ("AbortMultipartUpload", "abort_multipart_upload",
     {"Bucket": "bkt", "Key": "k", "UploadId": "u"}),
    ("ListParts", "list_parts", {"Bucket": "bkt", "Key": "k", "UploadId": "u"}),
    ("ListMultipartUploads", "list_multipart_uploads", {"Bucket": "bkt"}),
]

UNSUPPORTED_CALLS: list[tuple[str, dict[str, Any]]] = [
    ("get_bucket_acl", {"Bucket": "bkt"}),
    ("put_bucket_policy", {"Bucket": "bkt", "Policy": "{}"}),
    ("get_object_tagging", {"Bucket": "bkt", "Key": "k"}),
    ("put_bucket_versioning",
     {"Bucket": "bkt", "VersioningConfiguration": {"Status": "Enabled"}}),
    ("delete_bucket_lifecycle", {"Bucket": "bkt"}),
    ("get_bucket_cors", {"Bucket": "bkt"}),
]


def parsed(request: Any, domain: str | None = None) -> Any:
    url = urlsplit(request.url)
    headers = Headers([(k, v) for k, v in request.headers.items()] + [("Host", url.netloc)])
    return parse_request(request.method, url.netloc, url.path, url.query, headers, domain=domain)


class OperationTests(SynchronousTestCase):
    def test_boto3_path_style(self) -> None:
        requests = boto3_requests([(name, kw) for _, name, kw in CALLS])
        self.assertEqual(len(requests), len(CALLS))
        for (operation, _, kwargs), request in zip(CALLS, requests, strict=True):
            result = parsed(request)
            self.assertEqual(result.operation, operation, request.url)
            self.assertFalse(result.virtual_hosted)
            if operation != "ListBuckets":
                self.assertEqual(result.bucket, "bkt")
            self.assertEqual(result.key, kwargs.get("Key"))

    def test_boto3_virtual_hosted(self) -> None:
        requests = boto3_requests([(name, kw) for _, name, kw in CALLS], "virtual")
        for (operation, _, kwargs), request in zip(CALLS, requests, strict=True):
            result = parsed(request, domain="s3.example.com")
            self.assertEqual(result.operation, operation, request.url)
            if operation != "ListBuckets":
                # botocore sends GetBucketLocation path-style whatever the style.
                self.assertEqual(result.virtual_hosted, "//bkt." in request.url)
                self.assertEqual(result.bucket, "bkt")
            self.assertEqual(result.key, kwargs.get("Key"))

    def test_unsupported(self) -> None:
        for request in boto3_requests(UNSUPPORTED_CALLS):
            e = self.assertRaises(errors.NotImplementedS3, parsed, request)
            self.assertEqual((e.code, e.status), ("NotImplemented", 501))

    def test_domain_only_for_its_hosts(self) -> None:
        h = Headers()
        for host, bucket, key in [
            ("bkt.s3.example.com", "bkt", "k"),
            ("BKT.S3.Example.COM:9000", "bkt", "k"),
            ("s3.example.com", "kkk", None),
            ("127.0.0.1:9000", "kkk", None),
            ("[::1]:9000", "kkk", None),
            ("bkt.other.com", "kkk", None),
        ]:
            result = parse_request("GET", host, "/kkk", "", h, domain="s3.example.com")
            self.assertEqual((result.bucket, result.key), (bucket, key and "kkk"), host)
        self.assertEqual(parse_request("GET", "bkt.s3.example.com", "/kkk", "", h).bucket, "kkk")

    def test_methods(self) -> None:
        h = Headers()
        self.assertRaises(errors.MethodNotAllowed, parse_request, "PUT", "h", "/", "", h)
        self.assertRaises(errors.MethodNotAllowed, parse_request, "PATCH", "h", "/bkt/k", "", h)
        self.assertRaises(errors.NotImplementedS3, parse_request, "OPTIONS", "h", "/bkt/k", "", h)
        self.assertRaises(errors.NotImplementedS3, parse_request, "POST", "h", "/bkt", "", h)
        self.assertRaises(errors.InvalidRequest, parse_request, "PUT", "h", "/bkt/k",
                          "partNumber=1", h)
        self.assertRaises(errors.InvalidArgument, parse_request, "GET", "h", "/bkt",
                          "list-type=3", h)
        self.assertRaises(errors.InvalidArgument, parse_request, "GET", "h", "/bkt",
                          "prefix=a&prefix=b", h)
        self.assertEqual(parse_request("GET", "h", "/bkt/", "", h).operation, "ListObjects")

    def test_keys(self) -> None:
        h = Headers()
        r = parse_request("GET", "h", "/bkt/a%20b/%E2%9C%93+%2B", "", h)
        self.assertEqual(r.key, "a b/✓++")
        self.assertEqual(parse_request("GET", "h", "/bkt/a//b/../c", "", h).key, "a//b/../c")
        # The path arrives as bytes, taken as latin-1: raw UTF-8 or escaped.
        raw = ("é" * 512).encode("utf-8").decode("latin-1")
        self.assertEqual(parse_request("GET", "h", "/bkt/" + raw, "", h).key, "é" * 512)
        self.assertEqual(parse_request("GET", "h", "/bkt/" + quote("é" * 512), "", h).key,
                         "é" * 512)
        self.assertRaises(errors.KeyTooLongError, parse_request, "GET", "h",
                          "/bkt/" + raw + "x", "", h)
        self.assertRaises(errors.KeyTooLongError, parse_request, "GET", "h",
                          "/bkt/" + "k" * 1025, "", h)
        self.assertRaises(errors.InvalidURI, parse_request, "GET", "h", "/bkt/%zz", "", h)
        self.assertRaises(errors.InvalidURI, parse_request, "GET", "h", "/bkt/%ff", "", h)
        self.assertRaises(errors.InvalidURI, parse_request, "GET", "h", "/bkt", "prefix=%", h)
        self.assertRaises(errors.InvalidArgument, parse_request, "GET", "h", "bkt", "", h)


class BucketNameTests(SynchronousTestCase):
    def test_valid(self) -> None:
        for name in ("abc", "a" * 63, "my-bucket.2026", "1bucket", "b-1.a-2"):
            self.assertTrue(is_bucket_name(name), name)

    def test_invalid(self) -> None:
        for name in ("ab", "a" * 64, "Bucket", "bucket_x", "-bucket", "bucket-", ".bucket",
                     "bucket.", "a..b", "192.168.5.4", "xn--bucket", "sthree-x",
                     "amzn-s3-demo-x", "b-s3alias", "b--ol-s3", "b.mrap", "b--x-s3",
                     "b--table-s3", "bück", "a b", ""):
            self.assertFalse(is_bucket_name(name), name)
        e = self.assertRaises(errors.InvalidBucketName, parse_request, "GET", "h", "/Bkt", "",
                              Headers())
        self.assertEqual(e.extra["BucketName"], "Bkt")


class ParamTests(SynchronousTestCase):
    def test_list_params(self) -> None:
        p = list_params({"prefix": "a/", "delimiter": "/", "max-keys": "5000",
                         "encoding-type": "url", "fetch-owner": "true",
                         "continuation-token": "t", "start-after": "s"})
        self.assertEqual((p.prefix, p.delimiter, p.max_keys, p.url, p.fetch_owner,
                          p.continuation_token, p.start_after), ("a/", "/", 1000, True, True,
                                                                 "t", "s"))
        d = list_params({})
        self.assertEqual((d.prefix, d.delimiter, d.max_keys, d.url, d.marker),
                         ("", None, 1000, False, ""))
        for bad in ({"max-keys": "-1"}, {"max-keys": "x"}, {"encoding-type": "base64"},
                    {"fetch-owner": "yes"}, {"max-keys": "99999999999"}):
            self.assertRaises(errors.InvalidArgument, list_params, bad)

    def test_part_number(self) -> None:
        self.assertEqual(part_number({"partNumber": "10000"}), 10000)
        for bad in ("0", "10001", "-1", "1.5", "", "²", "１"):
            self.assertRaises(errors.InvalidArgument, part_number, {"partNumber": bad})

    def test_copy_source(self) -> None:
        """
        As botocore sends it: bucket/key URL-encoded, the version id after
        C{?versionId=}; a leading slash is allowed.
        """
        request = boto3_requests([("copy_object", {
            "Bucket": "bkt", "Key": "k",
            "CopySource": {"Bucket": "src", "Key": "a b/c+d?e%f", "VersionId": "v 1"}})])[0]
        value = request.headers["x-amz-copy-source"]
        value = value.decode() if isinstance(value, bytes) else value
        self.assertEqual(parse_copy_source(value), CopySource("src", "a b/c+d?e%f", "v 1"))
        self.assertEqual(parse_copy_source("/src/k%2Fz"), CopySource("src", "k/z"))
        for bad in ("src", "src/", "/k", "Src/k", "src/k?other=1", "src/%zz"):
            self.assertRaises((errors.InvalidArgument, errors.InvalidBucketName,
                               errors.InvalidURI), parse_copy_source, bad)

    def test_metadata_directive(self) -> None:
        self.assertEqual(metadata_directive(Headers()), "COPY")
        self.assertEqual(metadata_directive(Headers([("x-amz-metadata-directive", "replace")])),
                         "REPLACE")
        self.assertRaises(errors.InvalidArgument, metadata_directive,
                          Headers([("x-amz-metadata-directive", "MERGE")]))

    def test_overrides(self) -> None:
        params = {"response-content-type": "text/plain", "response-expires": "0",
                  "response-content-disposition": 'attachment; filename="a.txt"', "other": "x"}
        self.assertEqual(response_overrides(params), {
            "Content-Type": "text/plain", "Expires": "0",
            "Content-Disposition": 'attachment; filename="a.txt"'})
        self.assertEqual(response_overrides({}), {})
        self.assertRaises(errors.InvalidRequest, response_overrides, params, anonymous=True)
        self.assertRaises(errors.InvalidArgument, response_overrides,
                          {"response-content-type": "text/plain\r\nSet-Cookie: a=b"})

    def test_object_headers(self) -> None:
        h = Headers([("Content-Type", "text/plain"), ("Content-Encoding", "aws-chunked,gzip"),
                     ("Cache-Control", "no-cache"), ("x-amz-meta-Colour", "blue"),
                     ("x-amz-content-sha256", "x"), ("Authorization", "y")])
        self.assertEqual(object_headers(h), {
            "content-type": "text/plain", "content-encoding": "gzip",
            "cache-control": "no-cache", "x-amz-meta-colour": "blue"})
        self.assertEqual(object_headers(Headers([("Content-Encoding", "aws-chunked")])), {})
        self.assertRaises(errors.MetadataTooLarge, object_headers,
                          Headers([("x-amz-meta-a", "x" * 2048)]))

    def test_payload_length(self) -> None:
        h = Headers([("Content-Length", "10"), ("x-amz-decoded-content-length", "7")])
        self.assertEqual(payload_length(h, PayloadMode.SHA256), 10)
        self.assertEqual(payload_length(h, PayloadMode.STREAMING_UNSIGNED_TRAILER), 7)
        self.assertRaises(errors.MissingContentLength, payload_length,
                          Headers([("Transfer-Encoding", "chunked")]), PayloadMode.UNSIGNED)
        self.assertRaises(errors.MissingContentLength, payload_length,
                          Headers([("Content-Length", "10")]), PayloadMode.STREAMING_SIGNED)
        self.assertRaises(errors.InvalidArgument, payload_length,
                          Headers([("Content-Length", "-1")]), PayloadMode.UNSIGNED)


class RangeTests(SynchronousTestCase):
    def test_ranges(self) -> None:
        for value, size, expected in [
            ("bytes=0-0", 10, (0, 0)),
            ("bytes=0-", 10, (0, 9)),
            ("bytes=3-5", 10, (3, 5)),
            ("bytes=3-500", 10, (3, 9)),
            ("bytes=-3", 10, (7, 9)),
            ("bytes=-30", 10, (0, 9)),
            (" bytes = 1 - 2 ", 10, (1, 2)),
        ]:
            self.assertEqual(parse_range(value, size), expected, value)

    def test_whole_object(self) -> None:
        """
        No Range, one that does not parse, or several: the whole object.
        """
        for value in (None, "bytes=5-3", "bytes=", "bytes=-", "items=0-1", "bytes=0-1,3-4",
                      "bytes=a-b"):
            self.assertIsNone(parse_range(value, 10), value)

    def test_unsatisfiable(self) -> None:
        for value, size in (("bytes=10-", 10), ("bytes=10-20", 10), ("bytes=0-", 0),
                            ("bytes=-0", 10), ("bytes=-5", 0)):
            e = self.assertRaises(errors.InvalidRange, parse_range, value, size)
            self.assertEqual(e.status, 416)
            self.assertEqual(e.extra["ActualObjectSize"], str(size))


    def test_copy_range(self) -> None:
        """
        x-amz-copy-source-range: both ends given, within the source.
        """
        [request] = boto3_requests([("upload_part_copy", {
            "Bucket": "bkt", "Key": "k", "UploadId": "u", "PartNumber": 1,
            "CopySource": "src/x", "CopySourceRange": "bytes=0-9"})])
        value = request.headers["x-amz-copy-source-range"]
        value = value.decode() if isinstance(value, bytes) else value
        self.assertEqual(parse_copy_range(value, 10), (0, 9))
        self.assertIsNone(parse_copy_range(None, 10))
        for bad in ("bytes=0-10", "bytes=5-4", "bytes=0-", "bytes=-5", "0-9", "bytes=0-1,2-3"):
            self.assertRaises(errors.InvalidArgument, parse_copy_range, bad, 10)


class ConditionTests(SynchronousTestCase):
    etag = "0123456789abcdef0123456789abcdef"
    modified = 1796662147.5  # Last-Modified shows 1796662147

    def status(self, **headers: str) -> int:
        h = Headers([(name.replace("_", "-"), value) for name, value in headers.items()])
        return evaluate_conditions(h, self.etag, self.modified)

    def test_single(self) -> None:
        before = format_http_date(self.modified - 10)
        same = format_http_date(self.modified)
        after = format_http_date(self.modified + 10)
        quoted = f'"{self.etag}"'
        for headers, status in [
            ({}, 200),
            ({"if_match": quoted}, 200),
            ({"if_match": self.etag}, 200),
            ({"if_match": f'"x", {quoted}'}, 200),
            ({"if_match": "*"}, 200),
            ({"if_match": '"x"'}, 412),
            ({"if_none_match": quoted}, 304),
            ({"if_none_match": f'W/{quoted}'}, 304),
            ({"if_none_match": "*"}, 304),
            ({"if_none_match": '"x"'}, 200),
            ({"if_modified_since": before}, 200),
            ({"if_modified_since": same}, 304),
            ({"if_modified_since": after}, 304),
            ({"if_modified_since": "garbage"}, 200),
            ({"if_unmodified_since": before}, 412),
            ({"if_unmodified_since": same}, 200),
            ({"if_unmodified_since": after}, 200),
        ]:
            self.assertEqual(self.status(**headers), status, headers)

    def test_precedence(self) -> None:
        """
        S3's documented pairs: If-Match true wins over If-Unmodified-Since
        false (200); If-None-Match false wins over If-Modified-Since true
        (304); and a 412 over a 304.
        """
        before = format_http_date(self.modified - 10)
        after = format_http_date(self.modified + 10)
        quoted = f'"{self.etag}"'
        self.assertEqual(self.status(if_match=quoted, if_unmodified_since=before), 200)
        self.assertEqual(self.status(if_none_match=quoted, if_modified_since=before), 304)
        self.assertEqual(self.status(if_none_match='"x"', if_modified_since=after), 200)
        self.assertEqual(self.status(if_match='"x"', if_none_match=quoted), 412)
        self.assertEqual(self.status(if_unmodified_since=before, if_modified_since=after), 412)

    def test_conditional_writes(self) -> None:
        """
        PutObject with If-None-Match: * is write-once: 412 when there is
        an object; If-Match needs one (404 without).
        """
        star = Headers([("If-None-Match", "*")])
        self.assertEqual(evaluate_conditions(star, None, None, write=True), 200)
        self.assertEqual(evaluate_conditions(star, self.etag, self.modified, write=True), 412)
        match = Headers([("If-Match", self.etag)])
        self.assertEqual(evaluate_conditions(match, self.etag, self.modified, write=True), 200)
        self.assertEqual(evaluate_conditions(match, None, None, write=True), 404)
        self.assertEqual(evaluate_conditions(Headers([("If-Match", "x")]), self.etag,
                                             self.modified, write=True), 412)

    def test_copy_source_conditions(self) -> None:
        """
        The x-amz-copy-source-if-* headers only ever fail with 412, and
        name the condition.
        """
        h = Headers([("x-amz-copy-source-if-none-match", self.etag)])
        e = self.assertRaises(errors.PreconditionFailed, check_conditions, h, self.etag,
                              self.modified, prefix="x-amz-copy-source-")
        self.assertEqual(e.extra["Condition"], "x-amz-copy-source-If-None-Match")
        h = Headers([("x-amz-copy-source-if-modified-since", format_http_date(self.modified))])
        self.assertRaises(errors.PreconditionFailed, check_conditions, h, self.etag,
                          self.modified, prefix="x-amz-copy-source-")
        # A plain If-None-Match does not concern the source.
        check_conditions(Headers([("If-None-Match", self.etag)]), self.etag, self.modified,
                         prefix="x-amz-copy-source-")
