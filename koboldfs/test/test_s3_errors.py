"""
Tests for L{koboldfs.s3.errors} and L{koboldfs.s3.headers}: the error
document clients parse, and the date formats.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from botocore.parsers import RestXMLParser
from twisted.trial.unittest import SynchronousTestCase

from koboldfs.s3 import errors
from koboldfs.s3.headers import (
    Headers,
    format_amz_date,
    format_http_date,
    format_iso8601,
    parse_amz_date,
    parse_http_date,
)

#: The codes and statuses the brief and issue 15 name.
EXPECTED = {
    "NoSuchBucket": 404, "NoSuchKey": 404, "NoSuchUpload": 404, "BucketNotEmpty": 409,
    "BucketAlreadyOwnedByYou": 409, "BucketAlreadyExists": 409, "InvalidRange": 416,
    "PreconditionFailed": 412, "NotModified": 304, "SignatureDoesNotMatch": 403,
    "InvalidAccessKeyId": 403, "AccessDenied": 403, "RequestTimeTooSkewed": 403,
    "EntityTooSmall": 400, "EntityTooLarge": 400, "InvalidPart": 400, "InvalidPartOrder": 400,
    "MalformedXML": 400, "InvalidArgument": 400, "InvalidBucketName": 400,
    "KeyTooLongError": 400, "InvalidDigest": 400, "BadDigest": 400,
    "XAmzContentSHA256Mismatch": 400, "IncompleteBody": 400, "InvalidRequest": 400,
    "MissingContentLength": 411, "NotImplemented": 501, "MethodNotAllowed": 405,
    "AuthorizationHeaderMalformed": 400, "AuthorizationQueryParametersError": 400,
    "InternalError": 500, "SlowDown": 503, "ServiceUnavailable": 503,
}


class ErrorTests(SynchronousTestCase):
    def test_codes(self) -> None:
        for code, status in EXPECTED.items():
            cls = errors.error_class(code)
            self.assertEqual((cls.code, cls.status), (code, status))
            self.assertTrue(issubclass(cls, errors.S3Error))
        self.assertIs(errors.error_class("NoSuchThing"), errors.InternalError)
        self.assertIs(errors.error_class("AccessDenied"), errors.AccessDenied)

    def test_document(self) -> None:
        """
        Code, Message, the extra elements, Resource, RequestId, HostId, as
        AWS orders them, escaped.
        """
        e = errors.NoSuchKey(resource="/bkt/a<b>&c", Key="a<b>&c")
        body = e.body("REQ1", "host-1")
        self.assertTrue(body.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n<Error>'))
        root = ET.fromstring(body)
        self.assertEqual([c.tag for c in root],
                         ["Code", "Message", "Key", "Resource", "RequestId", "HostId"])
        self.assertEqual(root.findtext("Key"), "a<b>&c")
        self.assertEqual(root.findtext("RequestId"), "REQ1")

    def test_botocore_reads_it(self) -> None:
        """
        botocore's own parser finds the code and message, which boto3
        raises as ClientError (its request id it takes from the
        x-amz-request-id header, which the adapter sends).
        """
        e = errors.BucketNotEmpty(resource="/bkt", BucketName="bkt")
        parsed = RestXMLParser().parse(
            {"body": e.body("R"), "headers": {}, "status_code": e.status}, None
        )
        self.assertEqual(parsed["Error"]["Code"], "BucketNotEmpty")
        self.assertEqual(parsed["Error"]["Message"], e.default_message)

    def test_not_modified_has_no_body(self) -> None:
        self.assertFalse(errors.NotModified().has_body)
        self.assertEqual(errors.NotModified().body("R"), b"")

    def test_message_and_str(self) -> None:
        e = errors.InvalidArgument("bad thing", ArgumentName="x")
        self.assertEqual(e.message, "bad thing")
        self.assertEqual(str(e), "InvalidArgument: bad thing")
        self.assertEqual(errors.SlowDown().message, errors.SlowDown.default_message)


class HeadersTests(SynchronousTestCase):
    def test_case_and_repeats(self) -> None:
        h = Headers([(b"X-Amz-Meta-A", b"1"), ("x-amz-meta-a", "2"), ("Host", "h")])
        self.assertEqual(h.get("X-AMZ-META-A"), "1,2")
        self.assertEqual(h.all("x-amz-meta-a"), ["1", "2"])
        self.assertIn("HOST", h)
        self.assertNotIn("date", h)
        self.assertEqual(sorted(h), ["host", "x-amz-meta-a"])
        self.assertIsNone(h.get("date"))

    def test_bytes_kept(self) -> None:
        """
        Non-ASCII bytes survive as latin-1 text, byte for byte.
        """
        h = Headers.from_lists([(b"x-amz-meta-name", ["é".encode()])])
        self.assertEqual((h.get("x-amz-meta-name") or "").encode("latin-1"), "é".encode())


class DateTests(SynchronousTestCase):
    when = 1796662147.0  # 2026-12-07T16:49:07Z

    def test_http_dates(self) -> None:
        self.assertEqual(format_http_date(self.when), "Mon, 07 Dec 2026 16:49:07 GMT")
        for text in ("Mon, 07 Dec 2026 16:49:07 GMT", "Monday, 07-Dec-26 16:49:07 GMT",
                     "Mon Dec  7 16:49:07 2026"):
            self.assertEqual(parse_http_date(text), self.when, text)
        for bad in ("", "yesterday", "Mon, 07 Foo 2026 16:49:07 GMT",
                    "Mon, 07 Dec 2026 25:49:07 GMT", "2026-12-07T16:49:07Z"):
            self.assertIsNone(parse_http_date(bad), bad)

    def test_iso8601(self) -> None:
        self.assertEqual(format_iso8601(self.when), "2026-12-07T16:49:07.000Z")
        self.assertEqual(format_iso8601(self.when + 0.25), "2026-12-07T16:49:07.250Z")
        self.assertEqual(format_iso8601(self.when + 0.9999), "2026-12-07T16:49:08.000Z")

    def test_amz_date(self) -> None:
        self.assertEqual(format_amz_date(self.when), "20261207T164907Z")
        self.assertEqual(parse_amz_date("20261207T164907Z"), self.when)
        for bad in ("20261207T164907", "2026-12-07T16:49:07Z", "20261307T164907Z", ""):
            self.assertRaises(ValueError, parse_amz_date, bad)
