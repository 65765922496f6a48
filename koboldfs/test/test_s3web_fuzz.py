"""
A Hypothesis-driven fuzzer of the S3 front end (L{koboldfs.s3web}), run
like the binary protocol's (test_fuzz.py): each example draws a valid,
signed request (an upload, a listing, a delete of several keys) and a
seed, then sends it and many mutations of it (bytes changed, cut short,
lengthened, headers dropped), in random pieces, to a real server core
(L{koboldfs.testing.MemoryServer}) through the real S3 site.  For a
long run:

    KOBOLDFS_FUZZ_SCALE=100 python -m twisted.trial koboldfs.test.test_s3web_fuzz

What must hold, whatever arrives: no internal error (nothing logged, no
500), every response is well-formed HTTP, a request that fails its
checks publishes nothing, no upload slot is held once the connection is
gone, and the next client is served.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from koboldfs.interfaces import S3Credential, S3Grant
from koboldfs.s3access import StaticCredentials
from koboldfs.s3web import make_s3_site
from koboldfs.test.test_s3_server import ACCESS_KEY, SECRET, sign, signed_chunks
from koboldfs.testing import HTTPResponse, MemoryServer, parse_response

SCALE = int(os.environ.get("KOBOLDFS_FUZZ_SCALE", "1"))
EXAMPLES = 30 * SCALE
MUTATIONS = 40


def _request(method: str, target: str, headers: dict[str, str], body: bytes) -> bytes:
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"{method} {target} HTTP/1.1\r\n{head}\r\n".encode("utf-8") + body


def _mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        at = rng.randrange(len(out) + 1)
        if kind == 0 and out:
            out[min(at, len(out) - 1)] = rng.randrange(256)
        elif kind == 1:
            del out[at:]
        elif kind == 2:
            out[at:at] = rng.randbytes(rng.randint(1, 64))
        elif kind == 3:
            out[at:at] = rng.choice([b"\r\n", b"\r\n\r\n", b":", b"%", b"0\r\n", b";", b"%00"])
        elif kind == 4 and out:
            end = min(len(out), at + rng.randint(1, 200))
            del out[at:end]
        else:
            out[at:at] = out[at : at + rng.randint(1, 300)]
    return bytes(out)


class FrontFuzzTests(SynchronousTestCase):
    def setUp(self) -> None:
        root = os.path.abspath(self.mktemp())
        self.server = MemoryServer(root)
        self.server.reactor.advance(time.time())
        self.server.start()
        self.addCleanup(self.server.stop)
        credentials = StaticCredentials([S3Credential(ACCESS_KEY, SECRET, (S3Grant(None, True),))])
        self.site = make_s3_site(self.server.node, credentials)
        self.server.flush(self.server.store.namespace("bkt", create=True))

    def exchange(self, data: bytes, rng: random.Random) -> bytes:
        """
        Send C{data} in random pieces on one connection, then close it;
        return what the server wrote.
        """
        channel = self.site.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.1.1.1", 1))
        channel.makeConnection(transport)
        i = 0
        while i < len(data) and not transport.disconnecting:
            n = rng.choice((1, 5, 100, 4096, 70000))
            channel.dataReceived(data[i : i + n])
            self.server.pump()
            i += n
        channel.connectionLost(Failure(ConnectionDone()))
        self.server.pump()
        self.assertEqual(self.server.node.uploads, 0)
        return transport.value()

    def requests(self, kind: str, rng: random.Random) -> tuple[str, bytes, bytes]:
        """
        A valid signed request of C{kind}, the key it names and the bytes
        it would store there.
        """
        clock = self.server.reactor.seconds()
        key = f"k{rng.randrange(10**6)}"
        url = f"http://memory/bkt/{key}"
        data = rng.randbytes(rng.choice((0, 10, 5000, 80000)))
        if kind == "put":
            headers, _ = sign("PUT", url, {"content-length": str(len(data)),
                                            "content-md5": _md5(data)},
                              hashlib.sha256(data).hexdigest(), now=clock)
            return key, _request("PUT", f"/bkt/{key}", headers, data), data
        if kind == "chunked":
            chunks = [data[:3000], data[3000:]] if data else []
            headers, signing = sign("PUT", url, {
                "content-encoding": "aws-chunked",
                "x-amz-decoded-content-length": str(len(data))},
                "STREAMING-AWS4-HMAC-SHA256-PAYLOAD", now=clock)
            body = signed_chunks(signing, headers, [c for c in chunks if c])
            headers["content-length"] = str(len(body))
            return key, _request("PUT", f"/bkt/{key}", headers, body), data
        if kind == "delete":
            body = (b'<Delete xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Object><Key>'
                    + key.encode() + b"</Key></Object><Quiet>true</Quiet></Delete>")
            headers, _ = sign("POST", "http://memory/bkt?delete=", {
                "content-length": str(len(body)), "content-md5": _md5(body)},
                hashlib.sha256(body).hexdigest(), now=clock)
            return key, _request("POST", "/bkt?delete=", headers, body), b""
        headers, _ = sign("GET", "http://memory/bkt?list-type=2&prefix=k&delimiter=%2F", {},
                          hashlib.sha256(b"").hexdigest(), now=clock)
        return key, _request("GET", "/bkt?list-type=2&prefix=k&delimiter=%2F", headers, b""), b""

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(["put", "chunked", "delete", "list"]), st.randoms(use_true_random=False))
    def test_front(self, kind: str, rng: random.Random) -> None:
        key, valid, data = self.requests(kind, rng)
        answer = self.exchange(valid, rng)
        self.assertRegex(answer[:12], rb"HTTP/1\.1 (200|204)")
        refused = 0
        for _ in range(MUTATIONS):
            mutated = _mutate(valid, rng)
            answer = self.exchange(mutated, rng)
            for response in _responses(answer):
                self.assertNotEqual(response.status, 500, mutated[:300])
                refused += response.status >= 400
            self.assertEqual(self.flushLoggedErrors(), [])
            if kind in ("put", "chunked"):
                # Whatever was published under the key is the signed body.
                info = self.server.flush(self.server.store.lookup("bkt", key))
                self.assertEqual(info.sha256, hashlib.sha256(data).hexdigest())
        self.assertGreater(refused, 0)  # the mutations were refused, some of them
        # And it still serves.
        _, again, _ = self.requests("list", rng)
        self.assertTrue(self.exchange(again, rng).startswith(b"HTTP/1.1 200"))


def _md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def _responses(data: bytes) -> list[HTTPResponse]:
    """
    The responses written, each parsed (a 100 Continue before one).
    """
    out = []
    while data:
        if data.startswith(b"HTTP/1.1 100"):
            data = data.split(b"\r\n\r\n", 1)[1]
            continue
        response = parse_response(data)
        out.append(response)
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        data = rest[length:]
    return out
