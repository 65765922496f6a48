"""
Tests for L{koboldfs.s3.xml}: the bodies botocore serializes parse, XML
attacks and oversized bodies are refused, and every response renders to
what botocore's own parser, with S3's service model, reads back.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import unquote_plus

import botocore.session
from botocore import handlers
from botocore.awsrequest import AWSResponse
from botocore.parsers import RestXMLParser
from twisted.trial.unittest import SynchronousTestCase

from koboldfs.s3 import errors
from koboldfs.s3 import xml as s3xml
from koboldfs.test.test_s3_request import boto3_requests

S3_MODEL = botocore.session.get_session().get_service_model("s3")
OWNER = s3xml.Owner("kobold-id", "kobold")
WHEN = 1796662147.0
WHEN_TEXT = "2026-12-07T16:49:07.000Z"


def botocore_parse(operation: str, body: bytes) -> dict[str, Any]:
    """
    What boto3 returns for C{body} as the answer to C{operation}.
    """
    shape = S3_MODEL.operation_model(operation).output_shape
    return RestXMLParser().parse({"body": body, "headers": {}, "status_code": 200}, shape)


def body_of(call: str, **kwargs: Any) -> bytes:
    [request] = boto3_requests([(call, kwargs)])
    return bytes(request.body)


class ParseTests(SynchronousTestCase):
    def test_complete_from_boto3(self) -> None:
        parts = [{"PartNumber": n, "ETag": f'"etag{n}"'} for n in (1, 2, 10000)]
        parts[1]["ChecksumCRC32"] = "AAAAAA=="
        body = body_of("complete_multipart_upload", Bucket="bkt", Key="k", UploadId="u",
                       MultipartUpload={"Parts": parts})
        self.assertIn(s3xml.NAMESPACE.encode(), body)
        self.assertEqual(s3xml.parse_complete_multipart_upload(body), [
            s3xml.CompletedPart(1, "etag1"),
            s3xml.CompletedPart(2, "etag2", {"ChecksumCRC32": "AAAAAA=="}),
            s3xml.CompletedPart(10000, "etag10000"),
        ])

    def test_complete_refusals(self) -> None:
        def doc(*numbers: str) -> bytes:
            return ("<CompleteMultipartUpload>" + "".join(
                f"<Part><PartNumber>{n}</PartNumber><ETag>e</ETag></Part>" for n in numbers)
                + "</CompleteMultipartUpload>").encode()

        self.assertRaises(errors.InvalidPartOrder, s3xml.parse_complete_multipart_upload,
                          doc("2", "1"))
        self.assertRaises(errors.InvalidPartOrder, s3xml.parse_complete_multipart_upload,
                          doc("1", "1"))
        self.assertRaises(errors.InvalidArgument, s3xml.parse_complete_multipart_upload,
                          doc("10001"))
        self.assertRaises(errors.InvalidArgument, s3xml.parse_complete_multipart_upload,
                          doc("0"))
        for bad in (doc(), doc("one"), doc("-1"), doc(" "), b"<Other/>", b"<Complete",
                    b"<CompleteMultipartUpload><Part><ETag>e</ETag></Part>"
                    b"</CompleteMultipartUpload>",
                    b"<CompleteMultipartUpload><Part><PartNumber>1</PartNumber>"
                    b"<PartNumber>2</PartNumber><ETag>e</ETag></Part></CompleteMultipartUpload>"):
            self.assertRaises(errors.MalformedXML, s3xml.parse_complete_multipart_upload, bad)
        self.assertRaises(errors.MissingRequestBodyError, s3xml.parse_complete_multipart_upload,
                          b"  ")
        self.assertRaises(errors.MalformedXML, s3xml.parse_complete_multipart_upload,
                          doc(*[str(n) for n in range(1, 10002)]))

    def test_delete_from_boto3(self) -> None:
        body = body_of("delete_objects", Bucket="bkt", Delete={
            "Objects": [{"Key": "a&b<c>"}, {"Key": "v", "VersionId": "null"}], "Quiet": True})
        self.assertEqual(s3xml.parse_delete(body),
                         s3xml.DeleteRequest([("a&b<c>", None), ("v", "null")], True))
        body = body_of("delete_objects", Bucket="bkt", Delete={"Objects": [{"Key": "k"}]})
        self.assertFalse(s3xml.parse_delete(body).quiet)

    def test_delete_refusals(self) -> None:
        many = "<Delete>" + "<Object><Key>k</Key></Object>" * 1001 + "</Delete>"
        for bad in (b"<Delete></Delete>", b"<Delete><Quiet>maybe</Quiet>"
                    b"<Object><Key>k</Key></Object></Delete>",
                    b"<Delete><Object><VersionId>1</VersionId></Object></Delete>",
                    many.encode()):
            self.assertRaises(errors.MalformedXML, s3xml.parse_delete, bad)

    def test_create_bucket(self) -> None:
        body = body_of("create_bucket", Bucket="bkt",
                       CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
        self.assertEqual(s3xml.parse_create_bucket(body), "eu-west-1")
        self.assertIsNone(s3xml.parse_create_bucket(b""))
        self.assertIsNone(s3xml.parse_create_bucket(
            b"<CreateBucketConfiguration></CreateBucketConfiguration>"))

    def test_attacks(self) -> None:
        """
        DTDs, entities (billion laughs) and external entities are refused
        before anything expands.
        """
        laughs = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
                  b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>'
                  b"<Delete><Object><Key>&lol2;</Key></Object></Delete>")
        external = (b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                    b"<Delete><Object><Key>&x;</Key></Object></Delete>")
        dtd = b'<!DOCTYPE Delete SYSTEM "http://127.0.0.1:1/d.dtd"><Delete/>'
        for body in (laughs, external, dtd):
            self.assertRaises(errors.MalformedXML, s3xml.parse_delete, body)

    def test_size_limit(self) -> None:
        body = b"<Delete><Object><Key>" + b"k" * 2000 + b"</Key></Object></Delete>"
        self.assertRaises(errors.MaxMessageLengthExceeded, s3xml.parse_delete, body, 1000)
        self.assertRaises(errors.MaxMessageLengthExceeded, s3xml.check_length, 1001, 1000)
        s3xml.check_length(1000, 1000)
        s3xml.check_length(None)


class RenderTests(SynchronousTestCase):
    def test_list_buckets(self) -> None:
        body = s3xml.list_buckets(OWNER, [s3xml.Bucket("a-bucket", WHEN)])
        parsed = botocore_parse("ListBuckets", body)
        self.assertEqual(parsed["Buckets"][0]["Name"], "a-bucket")
        self.assertEqual(parsed["Buckets"][0]["CreationDate"].timestamp(), WHEN)
        self.assertEqual(parsed["Owner"], {"ID": "kobold-id", "DisplayName": "kobold"})
        self.assertIn(f"<CreationDate>{WHEN_TEXT}</CreationDate>".encode(), body)
        self.assertTrue(body.startswith(
            b'<?xml version="1.0" encoding="UTF-8"?>\n<ListAllMyBucketsResult xmlns="'
            + s3xml.NAMESPACE.encode() + b'">'))

    def listing(self, url: bool = False) -> s3xml.Listing:
        return s3xml.Listing(
            "bkt", prefix="p/", delimiter="/", max_keys=2, truncated=True, url=url,
            objects=[s3xml.ObjectEntry("p/a b+c&<d>", WHEN, "abc123", 5, owner=OWNER),
                     s3xml.ObjectEntry("p/é\x01", WHEN + 0.5, "def-2", 0)],
            common_prefixes=["p/sub/"],
        )

    def test_list_objects_v2(self) -> None:
        body = s3xml.list_objects_v2(self.listing(), continuation_token="t1",
                                     next_continuation_token="t2", start_after="p/0",
                                     fetch_owner=True)
        root = ET.fromstring(body.replace(b"&#x1;", b""))
        self.assertEqual([c.tag.split("}")[1] for c in root][:10], [
            "Name", "Prefix", "ContinuationToken", "NextContinuationToken", "StartAfter",
            "KeyCount", "MaxKeys", "Delimiter", "IsTruncated", "Contents"])
        self.assertIn(b"<ETag>&quot;abc123&quot;</ETag>", body)
        self.assertIn(b"<Key>p/\xc3\xa9&#x1;</Key>", body)
        parsed = botocore_parse("ListObjectsV2", body.replace(b"&#x1;", b""))
        self.assertEqual(parsed["KeyCount"], 3)
        self.assertTrue(parsed["IsTruncated"])
        self.assertEqual(parsed["NextContinuationToken"], "t2")
        self.assertEqual(parsed["Contents"][0]["Key"], "p/a b+c&<d>")
        self.assertEqual(parsed["Contents"][0]["ETag"], '"abc123"')
        self.assertEqual(parsed["Contents"][0]["Owner"]["ID"], "kobold-id")
        self.assertEqual(parsed["Contents"][1]["LastModified"].timestamp(), WHEN + 0.5)
        self.assertEqual(parsed["CommonPrefixes"], [{"Prefix": "p/sub/"}])
        self.assertNotIn(b"<Owner>", s3xml.list_objects_v2(self.listing()))

    def test_url_encoding(self) -> None:
        """
        With encoding-type=url keys come percent-encoded, and what
        botocore's decoding (unquote_plus) gives back is the key.
        """
        body = s3xml.list_objects_v2(self.listing(url=True), start_after="p/ x")
        root = ET.fromstring(body)
        ns = {"s": s3xml.NAMESPACE}
        keys = [e.text or "" for e in root.findall("s:Contents/s:Key", ns)]
        self.assertEqual([unquote_plus(k) for k in keys], ["p/a b+c&<d>", "p/é\x01"])
        self.assertEqual(root.findtext("s:EncodingType", namespaces=ns), "url")
        self.assertEqual(unquote_plus(root.findtext("s:StartAfter", namespaces=ns) or ""), "p/ x")
        for key in ("a+b", "a b", "%", "?&=#", "ü/ß", "\x00\x1f"):
            self.assertEqual(unquote_plus(s3xml.url_encode(key)), key)

    def test_list_objects_v1(self) -> None:
        body = s3xml.list_objects_v1(self.listing(), marker="m", next_marker="p/sub/")
        parsed = botocore_parse("ListObjects", body.replace(b"&#x1;", b""))
        self.assertEqual((parsed["Marker"], parsed["NextMarker"]), ("m", "p/sub/"))
        self.assertEqual(parsed["Contents"][0]["Owner"]["DisplayName"], "kobold")
        listing = self.listing()
        listing.delimiter = None
        self.assertNotIn(b"NextMarker", s3xml.list_objects_v1(listing, next_marker="x"))

    def test_list_versions(self) -> None:
        body = s3xml.list_object_versions(self.listing(), next_key_marker="p/é",
                                          next_version_id_marker="null")
        parsed = botocore_parse("ListObjectVersions", body.replace(b"&#x1;", b""))
        self.assertEqual([v["VersionId"] for v in parsed["Versions"]], ["null", "null"])
        self.assertTrue(all(v["IsLatest"] for v in parsed["Versions"]))
        self.assertEqual(parsed["NextKeyMarker"], "p/é")

    def test_multipart(self) -> None:
        parsed = botocore_parse("CreateMultipartUpload",
                                s3xml.initiate_multipart_upload("bkt", "k&", "up-1"))
        self.assertEqual((parsed["Bucket"], parsed["Key"], parsed["UploadId"]),
                         ("bkt", "k&", "up-1"))
        parsed = botocore_parse("CompleteMultipartUpload", s3xml.complete_multipart_upload(
            "http://h/bkt/k", "bkt", "k", "abc-3", {"ChecksumCRC32": "AAAAAA=="}))
        self.assertEqual((parsed["ETag"], parsed["ChecksumCRC32"]), ('"abc-3"', "AAAAAA=="))
        parts = [s3xml.PartEntry(1, WHEN, "e1", 5 * 1024 * 1024), s3xml.PartEntry(2, WHEN, "e2", 1)]
        parsed = botocore_parse("ListParts", s3xml.list_parts(
            "bkt", "k", "up-1", parts, owner=OWNER, truncated=True, max_parts=2))
        self.assertEqual([p["PartNumber"] for p in parsed["Parts"]], [1, 2])
        self.assertEqual(parsed["NextPartNumberMarker"], 2)
        self.assertEqual(parsed["Initiator"]["ID"], "kobold-id")
        self.assertTrue(parsed["IsTruncated"])
        parsed = botocore_parse("ListMultipartUploads", s3xml.list_multipart_uploads(
            "bkt", [s3xml.UploadEntry("k", "up-1", WHEN)], owner=OWNER, prefix="",
            common_prefixes=["d/"]))
        self.assertEqual(parsed["Uploads"][0]["UploadId"], "up-1")
        self.assertEqual(parsed["Uploads"][0]["Initiated"].timestamp(), WHEN)
        self.assertEqual(parsed["NextKeyMarker"], "k")
        self.assertEqual(parsed["CommonPrefixes"], [{"Prefix": "d/"}])

    def test_copy(self) -> None:
        parsed = botocore_parse("CopyObject", s3xml.copy_object("abc", WHEN))
        self.assertEqual(parsed["CopyObjectResult"]["ETag"], '"abc"')
        self.assertEqual(parsed["CopyObjectResult"]["LastModified"].timestamp(), WHEN)
        parsed = botocore_parse("UploadPartCopy", s3xml.copy_part("def", WHEN))
        self.assertEqual(parsed["CopyPartResult"]["ETag"], '"def"')

    def test_delete_result(self) -> None:
        error = s3xml.DeleteError("bad", "AccessDenied", "Access Denied")
        parsed = botocore_parse("DeleteObjects", s3xml.delete_result(
            [("a", None), ("b", "null")], [error]))
        self.assertEqual(parsed["Deleted"], [{"Key": "a"}, {"Key": "b", "VersionId": "null"}])
        self.assertEqual(parsed["Errors"],
                         [{"Key": "bad", "Code": "AccessDenied", "Message": "Access Denied"}])
        quiet = botocore_parse("DeleteObjects", s3xml.delete_result([("a", None)], quiet=True))
        self.assertNotIn("Deleted", quiet)

    def test_location(self) -> None:
        """
        botocore reads GetBucketLocation with a handler of its own: None
        (us-east-1) for the empty element.
        """
        for region, expected in (("eu-west-1", "eu-west-1"), ("us-east-1", None)):
            parsed: dict[str, Any] = {}
            response = AWSResponse("http://h/bkt?location", 200, {}, raw=True)
            response._content = s3xml.location_constraint(region)
            handlers.parse_get_bucket_location(parsed, response)
            self.assertEqual(parsed, {"LocationConstraint": expected})
        body = s3xml.location_constraint("us-east-1")
        self.assertTrue(body.endswith(b'<LocationConstraint xmlns="' + s3xml.NAMESPACE.encode()
                                      + b'"/>'))
