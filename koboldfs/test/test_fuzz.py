"""
A Hypothesis-driven fuzzer of the frame decoder and of the server's request
handlers: random, mutated and truncated frames, and valid frames in invalid
orders, fed in random pieces.

Each Hypothesis example draws a stream of frames (shrinkable) and a seed;
the example then feeds the stream and many mutations of it, so a CI run
tries 100,000 inputs in all (L{DECODER_INPUTS} + L{HANDLER_INPUTS}) in well
under a minute.  For a long run, scale the number of examples:

    KOBOLDFS_FUZZ_SCALE=100 python -m twisted.trial koboldfs.test.test_fuzz

(docs/security.md).  What must hold, whatever arrives: the decoder raises
nothing but L{ProtocolError} and never holds more than one frame; the
server raises nothing, logs no internal error, writes only well-formed
frames, holds no upload or connection slot once a connection is gone, and
answers the next client.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from koboldfs import auth
from koboldfs.errors import ProtocolError
from koboldfs.protocol import (
    HEADER,
    SCHEMAS,
    VERSION,
    Data,
    FrameDecoder,
    Message,
    Op,
    encode,
    encode_message,
)
from koboldfs.binaryserver import ServerProtocol
from koboldfs.testing import MemoryServer

SCALE = max(1, int(os.environ.get("KOBOLDFS_FUZZ_SCALE", "1")))

#: Examples, and inputs per example, of each fuzzer.
DECODER_EXAMPLES, DECODER_MUTATIONS = 350, 200
HANDLER_EXAMPLES, HANDLER_MUTATIONS = 200, 150
DECODER_INPUTS = DECODER_EXAMPLES * DECODER_MUTATIONS
HANDLER_INPUTS = HANDLER_EXAMPLES * HANDLER_MUTATIONS

_FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

names = st.sampled_from(["t", "ns", "", ".", "..", "a/b", "x" * 65, "ns\0"]) | st.text(max_size=8)
keys = st.sampled_from(["k", "a.txt", "../../etc/passwd", "é" * 513, "a\0b", "/"]) | st.text(
    max_size=12
)
ints = st.sampled_from([0, 1, 2**31, 2**63 - 1, 2**63, -1]) | st.integers()
sha256s = st.sampled_from([hashlib.sha256(b"").hexdigest(), "0" * 64, "g" * 64])
json_values = st.recursive(
    st.none() | st.booleans() | ints | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)
field_values = {
    "str": names | keys,
    "int": ints,
    "bool": st.booleans(),
    "sha256": sha256s,
    "number": ints | st.floats(allow_nan=False),
    "list": st.lists(json_values, max_size=3),
    "object": st.dictionaries(st.text(max_size=4), json_values, max_size=3),
    "int_list": st.lists(ints, max_size=3),
    "str_or_null": st.none() | keys,
    "int_or_null": st.none() | ints,
}
JSON_OPS = [op for op in Op if op is not Op.DATA]


@st.composite
def schema_messages(draw: st.DrawFn) -> Message:
    """
    A JSON frame whose fields mostly fit its opcode's schema: it gets past
    the decoder to the handlers.
    """
    op = draw(st.sampled_from(JSON_OPS))
    fields = {}
    for name, (kind, required) in SCHEMAS[op].items():
        if required or draw(st.booleans()):
            fields[name] = draw(field_values[kind])
    if draw(st.integers(0, 9)) == 0:
        fields[draw(st.text(max_size=6))] = draw(json_values)
    return Message(op, fields)


messages = schema_messages() | st.builds(
    Message, st.sampled_from(JSON_OPS), st.dictionaries(st.text(max_size=6), json_values)
)
datas = st.builds(Data, st.binary(max_size=64))
#: Stands for a valid AUTH, made once the server's nonce is known.
AUTH_RW, AUTH_RO = Message(Op.AUTH, {"rw": True}), Message(Op.AUTH, {"rw": False})
HELLO = Message(Op.HELLO, {"versions": [VERSION]})


@st.composite
def puts(draw: st.DrawFn) -> list[Message | Data]:
    """
    A whole PUT, sometimes with the right checksum and size.
    """
    body = draw(st.binary(max_size=100))
    frames: list[Message | Data] = [
        Message(Op.PUT, {"ns": draw(st.sampled_from(["t", "ns"])), "key": draw(keys)})
    ]
    frames += [Data(body[i : i + 40]) for i in range(0, len(body), 40)]
    right = hashlib.sha256(body).hexdigest()
    frames.append(Message(Op.END, {"sha256": draw(st.sampled_from([right, right, "0" * 64]))}))
    return frames


@st.composite
def conversations(draw: st.DrawFn) -> list[Message | Data]:
    """
    Frames as a client might send them, and as it must not: usually a
    handshake first, then requests, bodies and strays in any order.
    """
    frames: list[Message | Data] = []
    if draw(st.integers(0, 9)):
        frames.append(HELLO)
        if draw(st.booleans()):
            frames.append(draw(st.sampled_from([AUTH_RW, AUTH_RO])))
    for part in draw(st.lists(puts() | st.lists(messages | datas, max_size=3), max_size=6)):
        frames.extend(part)
    return frames


def mutate(rng: random.Random, stream: bytes) -> bytes:
    """
    One random damage to a byte stream: flip, cut, insert, duplicate, or
    rewrite a header.
    """
    if not stream:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(12)))
    data = bytearray(stream)
    kind = rng.randrange(6)
    at = rng.randrange(len(data))
    if kind == 0:
        data[at] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del data[at:]
    elif kind == 2:
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
    elif kind == 3:
        end = min(len(data), at + rng.randrange(1, 64))
        data[at:at] = data[at:end]
    elif kind == 4:
        data[at : at + HEADER.size] = HEADER.pack(rng.randrange(2**32), rng.randrange(256))
    else:
        data[at] = rng.randrange(256)
    return bytes(data)


def pieces(rng: random.Random, data: bytes) -> list[bytes]:
    """
    C{data} cut at random places, as TCP may deliver it.
    """
    out, i = [], 0
    while i < len(data):
        n = rng.choice((1, 2, 5, 64, 4096, len(data)))
        out.append(data[i : i + n])
        i += n
    return out


class DecoderFuzzTests(SynchronousTestCase):
    @settings(_FUZZ, max_examples=DECODER_EXAMPLES * SCALE)
    @given(st.lists(messages | datas, max_size=8), st.randoms(use_true_random=False))
    def test_decoder(self, frames: list[Message | Data], rng: random.Random) -> None:
        """
        Valid streams decode to their frames however they are cut; damaged
        ones decode or raise L{ProtocolError}, nothing else, and the decoder
        never holds more than one frame.
        """
        stream = b"".join(encode(f) for f in frames)
        limit = 1024
        for i in range(DECODER_MUTATIONS):
            data = stream if i == 0 else mutate(rng, stream)
            decoder = FrameDecoder(limit)
            got: list[Message | Data] = []
            try:
                for piece in pieces(rng, data):
                    got.extend(decoder.feed(piece))
                    self.assertLessEqual(decoder.buffered, HEADER.size + limit)
            except ProtocolError:
                self.assertEqual(decoder.buffered, 0)
                self.assertRaises(ProtocolError, decoder.feed, b"")
                continue
            for frame in got:
                # What decodes re-encodes to a frame that decodes the same.
                self.assertEqual(FrameDecoder(limit).feed(encode(frame)), [frame])
            if i == 0 and all(len(encode(f)) - HEADER.size <= limit for f in frames):
                self.assertEqual(got, _decodable(frames))


def _decodable(frames: list[Message | Data]) -> list[Message | Data]:
    """
    The prefix of C{frames} that a decoder returns before the first one it
    refuses.
    """
    out = []
    for frame in frames:
        try:
            out.extend(FrameDecoder(2**31).feed(encode(frame)))
        except ProtocolError:
            break
    return out


class HandlerFuzzTests(SynchronousTestCase):
    """
    The real server (in memory, requiring keys or open) fed conversations
    and their mutations, one connection each.
    """

    def setUp(self) -> None:
        # Thousands of puts, each fsynced: on tmpfs where there is one, so
        # that the run is bounded by the CPU, not the disk.
        if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
            root = tempfile.mkdtemp(prefix="koboldfs-fuzz-", dir="/dev/shm")
            self.addCleanup(shutil.rmtree, root, True)
        else:
            root = os.path.abspath(self.mktemp())
        self.server = MemoryServer(root)
        self.server.start()
        self.addCleanup(self.server.stop)
        self.keys = {
            True: self.server.flush(self.server.store.create_key("t")),
            False: self.server.flush(self.server.store.create_key("t", readonly=True)),
        }

    def converse(self, frames: list[Message | Data], rng: random.Random, damage: bool) -> None:
        node = self.server.node
        proto = ServerProtocol(node, self.server.metrics)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.1.1.1", 1))
        proto.makeConnection(transport)
        try:
            self._feed(proto, transport, frames, rng, damage)
        finally:
            proto.connectionLost(Failure(ConnectionError("gone")))
        self.assertEqual(node.uploads, 0)
        self.assertEqual(node.connections, {})

    def _feed(
        self,
        proto: ServerProtocol,
        transport: StringTransport,
        frames: list[Message | Data],
        rng: random.Random,
        damage: bool,
    ) -> None:
        node = self.server.node
        out = FrameDecoder(2**31)
        for frame in frames:
            if frame in (AUTH_RW, AUTH_RO):
                welcome = [f for f in out.feed(transport.value()) if f.op is Op.WELCOME]
                transport.clear()
                nonce = welcome[0]["nonce"] if welcome else "0" * 64
                creds = auth.Credentials("t", self.keys[frame["rw"]])
                frame = Message(Op.AUTH, creds.fields(nonce, node.name))
            data = encode(frame)
            if damage and rng.randrange(4) == 0:
                data = mutate(rng, data)
            for piece in pieces(rng, data):
                proto.dataReceived(piece)
                self.assertLessEqual(
                    proto._decoder.buffered, HEADER.size + node.config.max_frame_size
                )
            if transport.disconnecting:
                break
        # Everything the server wrote is well-formed frames.
        out.feed(transport.value())

    # The random source is seeded by hypothesis but not drawn through it:
    # how much a conversation draws depends on the server's answers (its
    # nonces are random, a mutated AUTH may or may not close the
    # connection), which hypothesis would take for a strategy that
    # generates inconsistently.
    @settings(_FUZZ, max_examples=HANDLER_EXAMPLES * SCALE)
    @given(conversations(), st.randoms(use_true_random=True), st.booleans())
    def test_handlers(
        self, frames: list[Message | Data], rng: random.Random, require_keys: bool
    ) -> None:
        """
        Whatever a client sends, in whatever order and pieces, the server
        answers in frames, frees what the connection held, and serves the
        next client.
        """
        self.server.config.auth = "keys" if require_keys else "open"
        for i in range(HANDLER_MUTATIONS):
            self.converse(frames, rng, damage=i > 0)
        proto = ServerProtocol(self.server.node, self.server.metrics)
        transport = StringTransport()
        proto.makeConnection(transport)
        try:
            proto.dataReceived(encode_message(Op.HELLO, {"versions": [VERSION]}))
            if require_keys:
                creds = auth.Credentials("t", self.keys[False])
                [welcome] = FrameDecoder().feed(transport.value())
                transport.clear()
                proto.dataReceived(
                    encode_message(Op.AUTH, creds.fields(welcome["nonce"], self.server.node.name))
                )
            transport.clear()
            proto.dataReceived(encode_message(Op.PING))
            self.assertEqual(FrameDecoder().feed(transport.value())[0].op, Op.OK)
        finally:
            proto.connectionLost(None)
        self.assertEqual(os.listdir(os.path.join(self.server.storage.root, "tmp")), [])
