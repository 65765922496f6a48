# ruff: noqa: E501
"""
Requests real S3 clients sent with their default settings (captured by
test_s3_clients.py with KOBOLDFS_S3_CAPTURE, test credentials only;
docs/s3-wire.md): each must verify and decode at the time it was sent,
and refuse once tampered with.  Bodies are base64.
"""

from __future__ import annotations

import base64
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from koboldfs.s3 import errors
from koboldfs.s3.checksums import BodyVerifier
from koboldfs.s3.chunked import ChunkedDecoder
from koboldfs.s3.headers import Headers
from koboldfs.s3.request import parse_request, payload_length
from koboldfs.s3.sigv4 import PayloadMode, Verifier
from koboldfs.test.test_s3_clients import ACCESS_KEY, BODY_OPS, SECRET

VECTORS = [{'body': '9bFlIkpYt5HfavHYMD5hzcS7hsPRxCcQPDRMQYnrLx571dR+RG/OwqPYEXNhEOV4G8zOppZ2LmEWxunJLZm/NYwuBxiCLOR8qMdBB+ZssOSys/TVjYLKY4bSyW52DoGbhckkww==',
  'client': 'boto3',
  'headers': [['Accept-Encoding', 'identity'],
              ['User-Agent',
               'Boto3/1.43.117 md/Botocore#1.43.117 md/awscrt#0.38.1 ua/2.1 '
               'os/linux#6.18.44-fc-v1300 md/arch#x86_64 lang/python#3.11.7 md/pyimpl#CPython '
               'm/U,N,b,D,Z,e cfg/retry-mode#legacy Botocore/1.43.117'],
              ['Expect', '100-continue'],
              ['x-amz-checksum-crc32', '9aKbYA=='],
              ['x-amz-sdk-checksum-algorithm', 'CRC32'],
              ['host', '127.0.0.1:45635'],
              ['X-Amz-Date', '20261207T175514Z'],
              ['x-amz-content-sha256',
               '8cbb1a4c7f41e90ae66253df9677c92b47b1378744de56490b156bbaa1544bb4'],
              ['Authorization',
               'AWS4-HMAC-SHA256 '
               'Credential=AKIDKOBOLDCLIENTS/20261207/us-east-1/s3/aws4_request, '
               'SignedHeaders=host;x-amz-checksum-crc32;x-amz-content-sha256;x-amz-date;x-amz-sdk-checksum-algorithm, '
               'Signature=a929c18e24fe41f459439448a608799bb6b469522e1a035c05e673f4a71ef913'],
              ['amz-sdk-invocation-id', '1fc0e148-f868-4196-b861-f5f4d53e9825'],
              ['amz-sdk-request', 'attempt=1'],
              ['Content-Length', '100']],
  'method': 'PUT',
  'operation': 'PutObject',
  'path': '/bkt/dir/a%20b%2Bc%25.txt',
  'when': 1796666114.9617038},
 {'body': 'PERlbGV0ZSB4bWxucz0iaHR0cDovL3MzLmFtYXpvbmF3cy5jb20vZG9jLzIwMDYtMDMtMDEvIj48T2JqZWN0PjxLZXk+YmlnLmJpbjwvS2V5PjwvT2JqZWN0PjxRdWlldD50cnVlPC9RdWlldD48L0RlbGV0ZT4=',
  'client': 'boto3',
  'headers': [['Accept-Encoding', 'identity'],
              ['User-Agent',
               'Boto3/1.43.117 md/Botocore#1.43.117 md/awscrt#0.38.1 ua/2.1 '
               'os/linux#6.18.44-fc-v1300 md/arch#x86_64 lang/python#3.11.7 md/pyimpl#CPython '
               'm/U,N,b,D,Z,e cfg/retry-mode#legacy Botocore/1.43.117'],
              ['x-amz-checksum-crc32', 'AgaZEA=='],
              ['x-amz-sdk-checksum-algorithm', 'CRC32'],
              ['host', '127.0.0.1:45635'],
              ['X-Amz-Date', '20261207T175515Z'],
              ['x-amz-content-sha256',
               '4d14a0a5413cbcc36a39faf6c66c2fe0f377de18f24b25311ba872256d06dcc9'],
              ['Authorization',
               'AWS4-HMAC-SHA256 '
               'Credential=AKIDKOBOLDCLIENTS/20261207/us-east-1/s3/aws4_request, '
               'SignedHeaders=host;x-amz-checksum-crc32;x-amz-content-sha256;x-amz-date;x-amz-sdk-checksum-algorithm, '
               'Signature=02bbae85c6aba5435f15c3ef9232ebfae05e640f2f5283594f45f29391d66930'],
              ['amz-sdk-invocation-id', 'db4c890b-ab57-421a-a421-d868d69aff07'],
              ['amz-sdk-request', 'attempt=1'],
              ['Content-Length', '119']],
  'method': 'POST',
  'operation': 'DeleteObjects',
  'path': '/bkt?delete',
  'when': 1796666115.284146},
 {'body': '',
  'client': 'boto3',
  'headers': [['Accept-Encoding', 'identity'],
              ['Host', '127.0.0.1:45635'],
              ['User-Agent', 'Python-urllib/3.11'],
              ['Connection', 'close']],
  'method': 'GET',
  'operation': 'GetObject',
  'path': '/bkt/dir/a%20b%2Bc%25.txt?AWSAccessKeyId=AKIDKOBOLDCLIENTS&Signature=ocPeOsFSb06fmh5g%2FxMJdYAkEzo%3D&Expires=1796669715',
  'when': 1796666115.3399258},
 {'body': '',
  'client': 'boto3',
  'headers': [['Accept-Encoding', 'identity'],
              ['Host', '127.0.0.1:45635'],
              ['User-Agent', 'Python-urllib/3.11'],
              ['Connection', 'close']],
  'method': 'GET',
  'operation': 'GetObject',
  'path': '/bkt/pp?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDKOBOLDCLIENTS%2F20261207%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20261207T175515Z&X-Amz-SignedHeaders=host&X-Amz-Expires=3600&X-Amz-Signature=deac19d428e878f2c685c3220b4272fbac90285b6ee5891a7e31e22fa5d18572',
  'when': 1796666115.367229},
 {'body': 'cHJlc2lnbmVk',
  'client': 'boto3',
  'headers': [['Accept-Encoding', 'identity'],
              ['Content-Length', '9'],
              ['Host', '127.0.0.1:45635'],
              ['User-Agent', 'Python-urllib/3.11'],
              ['Content-Type', ''],
              ['Connection', 'close']],
  'method': 'PUT',
  'operation': 'PutObject',
  'path': '/bkt/pp?AWSAccessKeyId=AKIDKOBOLDCLIENTS&Signature=IM86HXPdixedQ7ogw65kOYh1vaY%3D&Expires=1796666175',
  'when': 1796666115.3519459},
 {'body': 'PENvbXBsZXRlTXVsdGlwYXJ0VXBsb2FkIHhtbG5zPSJodHRwOi8vczMuYW1hem9uYXdzLmNvbS9kb2MvMjAwNi0wMy0wMS8iPjxQYXJ0PjxFVGFnPiIwNGMyZjAxZGZjMWI4MTU5MzMxYTE1NzY3YTVkMjZjZSI8L0VUYWc+PFBhcnROdW1iZXI+MTwvUGFydE51bWJlcj48L1BhcnQ+PFBhcnQ+PEVUYWc+IjkxNDQxNmE5ZjRkNDk2MDM1ZjhlYWNlZDE4MDZjYTZiIjwvRVRhZz48UGFydE51bWJlcj4yPC9QYXJ0TnVtYmVyPjwvUGFydD48L0NvbXBsZXRlTXVsdGlwYXJ0VXBsb2FkPg==',
  'client': 'boto3',
  'headers': [['Accept-Encoding', 'identity'],
              ['User-Agent',
               'Boto3/1.43.117 md/Botocore#1.43.117 md/awscrt#0.38.1 ua/2.1 '
               'os/linux#6.18.44-fc-v1300 md/arch#x86_64 lang/python#3.11.7 md/pyimpl#CPython '
               'm/N,b,D,Z,e,G cfg/retry-mode#legacy Botocore/1.43.117'],
              ['host', '127.0.0.1:45635'],
              ['X-Amz-Date', '20261207T175515Z'],
              ['x-amz-content-sha256',
               '3e37772c5f27f7aa64ecc78f537b37ffb6a8606c958483d4bb9b1d6a0e98fbe4'],
              ['Authorization',
               'AWS4-HMAC-SHA256 '
               'Credential=AKIDKOBOLDCLIENTS/20261207/us-east-1/s3/aws4_request, '
               'SignedHeaders=host;x-amz-content-sha256;x-amz-date, '
               'Signature=d95777850e5fbaec96f303862dfa305291c880e5d58869d2af99f548aa0c4d71'],
              ['amz-sdk-invocation-id', '29ca70d6-7b52-415a-9961-0812329c4590'],
              ['amz-sdk-request', 'attempt=1'],
              ['Content-Length', '271']],
  'method': 'POST',
  'operation': 'CompleteMultipartUpload',
  'path': '/bkt/big.bin?uploadId=up0',
  'when': 1796666115.135994},
 {'body': 'NjQNCvWxZSJKWLeR32rx2DA+Yc3Eu4bD0cQnEDw0TEGJ6y8ee9XUfkRvzsKj2BFzYRDleBvMzqaWdi5hFsbpyS2ZvzWMLgcYgizkfKjHQQfmbLDksrP01Y2CymOG0sludg6Bm4XJJMMNCjANCngtYW16LWNoZWNrc3VtLWNyYzMyOjlhS2JZQT09DQoNCg==',
  'client': 'boto3-https',
  'headers': [['Accept-Encoding', 'identity'],
              ['User-Agent',
               'Boto3/1.43.117 md/Botocore#1.43.117 md/awscrt#0.38.1 ua/2.1 '
               'os/linux#6.18.44-fc-v1300 md/arch#x86_64 lang/python#3.11.7 md/pyimpl#CPython '
               'm/U,N,b,D,Z,e cfg/retry-mode#legacy Botocore/1.43.117'],
              ['Expect', '100-continue'],
              ['Transfer-Encoding', 'chunked'],
              ['Content-Encoding', 'aws-chunked'],
              ['X-Amz-Trailer', 'x-amz-checksum-crc32'],
              ['X-Amz-Decoded-Content-Length', '100'],
              ['x-amz-sdk-checksum-algorithm', 'CRC32'],
              ['host', '127.0.0.1:45219'],
              ['X-Amz-Date', '20261207T175515Z'],
              ['x-amz-content-sha256', 'STREAMING-UNSIGNED-PAYLOAD-TRAILER'],
              ['Authorization',
               'AWS4-HMAC-SHA256 '
               'Credential=AKIDKOBOLDCLIENTS/20261207/us-east-1/s3/aws4_request, '
               'SignedHeaders=content-encoding;host;x-amz-content-sha256;x-amz-date;x-amz-decoded-content-length;x-amz-sdk-checksum-algorithm;x-amz-trailer, '
               'Signature=c1777cf62076a5ad71a8a619f393baa32c3005e228154d9cd4eeb3a4a7fad52f'],
              ['amz-sdk-invocation-id', '6b705527-d1f3-4d68-9e7b-ec62809a19f5'],
              ['amz-sdk-request', 'attempt=1']],
  'method': 'PUT',
  'operation': 'PutObject',
  'path': '/bkt/small',
  'when': 1796666115.9804575},
 {'body': '9bFlIkpYt5HfavHYMD5hzcS7hsPRxCcQPDRMQYnrLx571dR+RG/OwqPYEXNhEOV4G8zOppZ2LmEWxunJLZm/NYwuBxiCLOR8qMdBB+ZssOSys/TVjYLKY4bSyW52DoGbhckkww==',
  'client': 'awscli',
  'headers': [['Accept-Encoding', 'identity'],
              ['User-Agent',
               'aws-cli/1.46.3 md/Botocore#1.43.62 md/awscrt#0.38.1 ua/2.1 '
               'os/linux#6.18.44-fc-v1300 md/arch#x86_64 lang/python#3.11.7 md/pyimpl#CPython '
               'm/N,U,D,Z,b,g cfg/retry-mode#legacy botocore/1.43.62'],
              ['Expect', '100-continue'],
              ['x-amz-checksum-crc32', '9aKbYA=='],
              ['x-amz-sdk-checksum-algorithm', 'CRC32'],
              ['host', '127.0.0.1:36925'],
              ['X-Amz-Date', '20261207T175510Z'],
              ['x-amz-content-sha256',
               '8cbb1a4c7f41e90ae66253df9677c92b47b1378744de56490b156bbaa1544bb4'],
              ['Authorization',
               'AWS4-HMAC-SHA256 '
               'Credential=AKIDKOBOLDCLIENTS/20261207/us-east-1/s3/aws4_request, '
               'SignedHeaders=host;x-amz-checksum-crc32;x-amz-content-sha256;x-amz-date;x-amz-sdk-checksum-algorithm, '
               'Signature=bfc50a97458c4bea79620570f346a6205d65bb4ea6c044a2fb34ea8b7515399a'],
              ['amz-sdk-invocation-id', '06fd1e6c-96c3-4bdc-8851-6bb53ea1ae84'],
              ['amz-sdk-request', 'attempt=1'],
              ['Content-Length', '100']],
  'method': 'PUT',
  'operation': 'PutObject',
  'path': '/bkt/api.bin',
  'when': 1796666110.4089487},
 {'body': '',
  'client': 'awscli',
  'headers': [['Accept-Encoding', 'identity'],
              ['User-Agent',
               'aws-cli/1.46.3 md/Botocore#1.43.62 md/awscrt#0.38.1 ua/2.1 '
               'os/linux#6.18.44-fc-v1300 md/arch#x86_64 lang/python#3.11.7 md/pyimpl#CPython '
               'm/N,Z,g,D,C,b cfg/retry-mode#legacy botocore/1.43.62'],
              ['host', '127.0.0.1:36925'],
              ['X-Amz-Date', '20261207T175511Z'],
              ['x-amz-content-sha256',
               'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'],
              ['Authorization',
               'AWS4-HMAC-SHA256 '
               'Credential=AKIDKOBOLDCLIENTS/20261207/us-east-1/s3/aws4_request, '
               'SignedHeaders=host;x-amz-content-sha256;x-amz-date, '
               'Signature=8f40365bef29f944d5d81fddcef11bbdc7e6f24fab7ba837881022e186f1c62a'],
              ['amz-sdk-invocation-id', '21264390-9a1a-4b2a-8b4d-c98722f3b448'],
              ['amz-sdk-request', 'attempt=1']],
  'method': 'GET',
  'operation': 'ListObjectsV2',
  'path': '/bkt?list-type=2&prefix=&delimiter=%2F&encoding-type=url',
  'when': 1796666111.7224524},
 {'body': '9bFlIkpYt5HfavHYMD5hzcS7hsPRxCcQPDRMQYnrLx571dR+RG/OwqPYEXNhEOV4G8zOppZ2LmEWxunJLZm/NYwuBxiCLOR8qMdBB+ZssOSys/TVjYLKY4bSyW52DoGbhckkww==',
  'client': 'rclone',
  'headers': [['Host', '127.0.0.1:41445'],
              ['User-Agent', 'rclone/'],
              ['Content-Length', '100'],
              ['Authorization',
               'AWS4-HMAC-SHA256 '
               'Credential=AKIDKOBOLDCLIENTS/20261207/us-east-1/s3/aws4_request, '
               'SignedHeaders=content-length;content-md5;content-type;host;x-amz-acl;x-amz-content-sha256;x-amz-date;x-amz-meta-mtime, '
               'Signature=19293537e4fe36145b562d5c06c0abfcd8b04fcfdfe8b66677fd5277c61e1771'],
              ['Content-Md5', 'JbNkxl5lzm9oEu57XL9Bvg=='],
              ['Content-Type', 'application/octet-stream'],
              ['X-Amz-Acl', 'private'],
              ['X-Amz-Content-Sha256', 'UNSIGNED-PAYLOAD'],
              ['X-Amz-Date', '20261207T175516Z'],
              ['X-Amz-Meta-Mtime', '1796666116.585786433'],
              ['Accept-Encoding', 'gzip']],
  'method': 'PUT',
  'operation': 'PutObject',
  'path': '/bkt/tree/small.bin',
  'when': 1796666116.7341452},
 {'body': '',
  'client': 'rclone',
  'headers': [['Host', '127.0.0.1:41445'],
              ['User-Agent', 'rclone/'],
              ['Authorization',
               'AWS4-HMAC-SHA256 '
               'Credential=AKIDKOBOLDCLIENTS/20261207/us-east-1/s3/aws4_request, '
               'SignedHeaders=host;x-amz-content-sha256;x-amz-date, '
               'Signature=7dd395308ebebf2833806dac5c356485cd2e21970e1d14fa7f7c0f72751a7f19'],
              ['X-Amz-Content-Sha256',
               'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'],
              ['X-Amz-Date', '20261207T175516Z'],
              ['Accept-Encoding', 'gzip']],
  'method': 'GET',
  'operation': 'ListObjects',
  'path': '/bkt?delimiter=%2F&max-keys=1000&prefix=tree%2F',
  'when': 1796666116.6809697},
 {'body': '9bFlIkpYt5HfavHYMD5hzcS7hsPRxCcQPDRMQYnrLx571dR+RG/OwqPYEXNhEOV4G8zOppZ2LmEWxunJLZm/NYwuBxiCLOR8qMdBB+ZssOSys/TVjYLKY4bSyW52DoGbhckkww==',
  'client': 's3fs',
  'headers': [['host', '127.0.0.1:43783'],
              ['User-Agent',
               'aiobotocore/3.10.0 md/Botocore#1.43.117 md/awscrt#0.38.1 ua/2.1 '
               'os/linux#6.18.44-fc-v1300 md/arch#x86_64 lang/python#3.11.7 md/pyimpl#CPython '
               'm/U,N,b,D,Z,e cfg/retry-mode#legacy botocore/1.43.117'],
              ['Expect', '100-continue'],
              ['x-amz-checksum-crc32', '9aKbYA=='],
              ['x-amz-sdk-checksum-algorithm', 'CRC32'],
              ['X-Amz-Date', '20261207T175518Z'],
              ['x-amz-content-sha256',
               '8cbb1a4c7f41e90ae66253df9677c92b47b1378744de56490b156bbaa1544bb4'],
              ['Authorization',
               'AWS4-HMAC-SHA256 '
               'Credential=AKIDKOBOLDCLIENTS/20261207/us-east-1/s3/aws4_request, '
               'SignedHeaders=host;x-amz-checksum-crc32;x-amz-content-sha256;x-amz-date;x-amz-sdk-checksum-algorithm, '
               'Signature=4164746c4efa69403f1309fc52671f2cf28979cdbd143de8da962f1e1124e1e1'],
              ['amz-sdk-invocation-id', 'b51b9965-2381-4e6e-9562-de6ab9ac372e'],
              ['amz-sdk-request', 'attempt=1'],
              ['Content-Length', '100'],
              ['Accept-Encoding', 'identity'],
              ['Accept', '*/*']],
  'method': 'PUT',
  'operation': 'PutObject',
  'path': '/bkt/small.bin',
  'when': 1796666118.556618},
 {'body': 'PERlbGV0ZSB4bWxucz0iaHR0cDovL3MzLmFtYXpvbmF3cy5jb20vZG9jLzIwMDYtMDMtMDEvIj48T2JqZWN0PjxLZXk+c21hbGwuYmluPC9LZXk+PC9PYmplY3Q+PFF1aWV0PnRydWU8L1F1aWV0PjwvRGVsZXRlPg==',
  'client': 's3fs',
  'headers': [['host', '127.0.0.1:43783'],
              ['User-Agent',
               'aiobotocore/3.10.0 md/Botocore#1.43.117 md/awscrt#0.38.1 ua/2.1 '
               'os/linux#6.18.44-fc-v1300 md/arch#x86_64 lang/python#3.11.7 md/pyimpl#CPython '
               'm/U,N,b,D,Z,e cfg/retry-mode#legacy botocore/1.43.117'],
              ['x-amz-checksum-crc32', 'MwCOdQ=='],
              ['x-amz-sdk-checksum-algorithm', 'CRC32'],
              ['X-Amz-Date', '20261207T175518Z'],
              ['x-amz-content-sha256',
               '7b6ba875b4da7ba484ebecf9a98bc4edfa1f9a64683863d44d0a5bb31bc0748b'],
              ['Authorization',
               'AWS4-HMAC-SHA256 '
               'Credential=AKIDKOBOLDCLIENTS/20261207/us-east-1/s3/aws4_request, '
               'SignedHeaders=host;x-amz-checksum-crc32;x-amz-content-sha256;x-amz-date;x-amz-sdk-checksum-algorithm, '
               'Signature=791d13d9403b24a48682e09d2ded220640ae30f94e765b445fae94ccf1b3497d'],
              ['amz-sdk-invocation-id', '85c67dfb-73cc-4a8b-9332-2e8b0f86a194'],
              ['amz-sdk-request', 'attempt=1'],
              ['Content-Length', '121'],
              ['Accept-Encoding', 'identity'],
              ['Accept', '*/*']],
  'method': 'POST',
  'operation': 'DeleteObjects',
  'path': '/bkt?delete',
  'when': 1796666118.7924972}]


def receive(vector: dict[str, Any], *, now: float | None = None, path: str | None = None,
            body: bytes | None = None) -> tuple[Any, Any]:
    """
    Verify, parse, decode and check a captured request as the adapter
    will: return its authentication and digests (None without a body).
    """
    headers = Headers([tuple(pair) for pair in vector["headers"]])
    raw_path, _, query = (path or vector["path"]).partition("?")
    verifier = Verifier({ACCESS_KEY: SECRET}.get,
                        lambda: vector["when"] if now is None else now, "us-east-1")
    auth = verifier.verify(vector["method"], raw_path, query, headers)
    assert auth is not None
    request = parse_request(vector["method"], headers.get("host"), raw_path, query, headers)
    assert request.operation == vector["operation"], request
    if request.operation not in BODY_OPS:
        return auth, None
    raw = base64.b64decode(vector["body"]) if body is None else body
    payload, trailers = raw, {}
    if auth.payload.streaming:
        decoder = ChunkedDecoder.for_request(auth, headers, payload_length(headers, auth.payload))
        payload = b"".join(decoder.feed(raw))
        trailers = decoder.finish().trailers
    elif len(raw) != payload_length(headers, auth.payload):
        raise errors.IncompleteBody()
    checker = BodyVerifier.for_request(headers, auth.content_sha256)
    checker.update(payload)
    return auth, checker.finish(trailers)


class VectorTests(SynchronousTestCase):
    def test_all_verify(self) -> None:
        """
        Every captured request verifies, as the mode its client uses.
        """
        modes = {}
        for vector in VECTORS:
            auth, _ = receive(vector)
            modes[(vector["client"], vector["operation"], auth.scheme.name)] = auth.payload
        self.assertEqual(modes[("rclone", "PutObject", "HEADER")], PayloadMode.UNSIGNED)
        self.assertEqual(modes[("boto3-https", "PutObject", "HEADER")],
                         PayloadMode.STREAMING_UNSIGNED_TRAILER)
        self.assertEqual(modes[("boto3", "PutObject", "HEADER")], PayloadMode.SHA256)
        self.assertEqual(modes[("boto3", "GetObject", "V2_PRESIGNED")], PayloadMode.UNSIGNED)
        self.assertEqual(modes[("boto3", "GetObject", "PRESIGNED")], PayloadMode.UNSIGNED)
        self.assertEqual(len(VECTORS), 13)

    def test_body_changed(self) -> None:
        """
        One byte of the body changed: whichever digest the client sent
        (SHA-256 signed, Content-MD5, a trailing CRC32) catches it.  (A
        presigned PUT from a plain HTTP client carries none: its body is
        whatever arrives, on AWS too.)
        """
        for vector in VECTORS:
            body = bytearray(base64.b64decode(vector["body"]))
            if not body or vector["operation"] not in BODY_OPS or "Signature=" in vector["path"]:
                continue
            # In an aws-chunked body, change the payload, not the framing.
            at = body.index(b"\r\n") + 3 if b"\r\n" in body[:12] else len(body) // 2
            body[at] ^= 0x20
            self.assertRaises((errors.XAmzContentSHA256Mismatch, errors.BadDigest),
                              receive, vector, body=bytes(body))

    def test_request_changed(self) -> None:
        for vector in VECTORS:
            path = vector["path"].replace("/bkt", "/bkz", 1)
            self.assertRaises(errors.SignatureDoesNotMatch, receive, vector, path=path)

    def test_replayed_later(self) -> None:
        """
        A header-signed request replayed 15 minutes later is refused;
        presigned ones live until their expiry.
        """
        for vector in VECTORS:
            auth, _ = receive(vector)
            if auth.expires is not None:
                receive(vector, now=auth.expires)
                self.assertRaises(errors.RequestExpired, receive, vector, now=auth.expires + 1)
            else:
                self.assertRaises(errors.RequestTimeTooSkewed, receive, vector,
                                  now=vector["when"] + 901)
