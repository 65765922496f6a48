"""
Tests for the sans-IO codec: no reactor, no sockets.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from koboldfs.errors import ErrorCode, ProtocolError
from koboldfs.protocol import (
    HEADER,
    MAX_INT,
    SCHEMAS,
    Data,
    FrameDecoder,
    Message,
    Op,
    encode,
    encode_message,
)

SHA = "ab" * 32

#: One valid frame of every opcode.
EXAMPLES = [
    Message(Op.HELLO, {"versions": [1], "agent": "test", "max_payload": 1024}),
    Message(Op.WELCOME, {"version": 1, "server": "s1", "max_payload": 4096, "nonce": "00"}),
    Message(
        Op.AUTH,
        {"method": "key", "ns": "demo", "key_id": "0" * 16, "cnonce": "01", "proof": "ff"},
    ),
    Message(Op.PING, {}),
    Message(Op.PUT, {"ns": "demo", "key": "motd", "size": MAX_INT}),
    Message(Op.PUT, {"ns": "demo", "key": "unknown size", "size": None}),
    Message(Op.GET, {"ns": "demo", "key": "ключ", "local": True}),
    Message(Op.GET_URL, {"ns": "demo", "key": "k", "expires": 60}),
    Message(Op.DELETE, {"ns": "demo", "key": "k"}),
    Message(Op.STAT, {"ns": "demo", "key": "k"}),
    Message(Op.LIST, {"ns": "demo", "prefix": "a", "after": None, "limit": 10}),
    Message(Op.REPLICA_PUT, {"fid": "ab" * 16, "path": "files/ab/ab/" + "ab" * 16, "size": 3}),
    Message(Op.CLUSTER_STATUS, {"held": True}),
    Message(Op.BEGIN, {"ns": "demo"}),
    Message(Op.PUT, {"ns": "demo", "key": "k", "size": 1, "txn": "0" * 32}),
    Message(Op.PREPARE, {"txn": "0" * 32, "record": True}),
    Message(Op.COMMIT, {"txn": "0" * 32, "prepared": False}),
    Message(Op.ABORT, {"txn": "0" * 32}),
    Data(b""),
    Data(bytes(range(256)) * 10),
    Message(Op.END, {"sha256": SHA}),
    Message(Op.END, {"abort": True}),
    Message(Op.OK, {"keys": ["a", "b"], "truncated": False}),
    Message(Op.FILE, {"size": 5 * 2**32, "sha256": SHA}),
    Message(Op.ERROR, {"code": 7, "message": "no such key"}),
]


def raw(opcode: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), opcode) + payload


class CodecTests(SynchronousTestCase):
    """
    Every frame survives encoding and decoding, however the bytes arrive.
    """

    def test_every_opcode_has_an_example(self) -> None:
        """
        The round-trip examples cover the whole opcode set, so a new opcode
        cannot be added without a round-trip test.
        """
        self.assertEqual({f.op for f in EXAMPLES}, set(Op))

    def test_round_trip(self) -> None:
        """
        Decoding the concatenated encodings gives back the same frames.
        """
        stream = b"".join(encode(f) for f in EXAMPLES)
        self.assertEqual(FrameDecoder().feed(stream), EXAMPLES)

    def test_byte_at_a_time(self) -> None:
        """
        TCP may split frames anywhere: one byte at a time still decodes
        to the same frames, and nothing is returned before a frame is whole.
        """
        decoder = FrameDecoder()
        frames = []
        for byte in b"".join(encode(f) for f in EXAMPLES):
            frames.extend(decoder.feed(bytes([byte])))
        self.assertEqual(frames, EXAMPLES)
        self.assertEqual(decoder.buffered, 0)

    def test_sizes_beyond_4gib(self) -> None:
        """
        The original protocol's 32-bit sizes capped files at 4 GiB; ours
        carries 64-bit sizes.
        """
        [frame] = FrameDecoder().feed(encode(Message(Op.FILE, {"size": 2**40, "sha256": SHA})))
        self.assertEqual(frame["size"], 2**40)


class DecoderErrorTests(SynchronousTestCase):
    """
    Bad input raises L{ProtocolError} with the right code, and poisons the
    decoder so the connection is closed rather than resynchronised.
    """

    def assertRefused(self, data: bytes, code: ErrorCode, max_payload: int = 1024) -> None:
        decoder = FrameDecoder(max_payload)
        error = self.assertRaises(ProtocolError, decoder.feed, data)
        self.assertEqual(error.code, code)
        self.assertEqual(decoder.buffered, 0)
        self.assertRaises(ProtocolError, decoder.feed, encode(Message(Op.PING)))

    def test_oversized_frame(self) -> None:
        """
        A header announcing more than the limit is refused at once, before
        the payload is buffered.
        """
        self.assertRefused(HEADER.pack(1025, Op.DATA), ErrorCode.BAD_FRAME)

    def test_unknown_opcode(self) -> None:
        """
        An opcode outside the table, such as a reserved one, is refused.
        """
        self.assertRefused(raw(0x2F, b"{}"), ErrorCode.UNKNOWN_OPCODE)

    def test_not_json(self) -> None:
        """
        A non-DATA payload must be JSON.
        """
        self.assertRefused(raw(Op.PING, b"\xff\xfe"), ErrorCode.BAD_REQUEST)

    def test_unpaired_surrogate(self) -> None:
        """
        A string escaping half a surrogate pair is valid JSON but not text
        (it could not be encoded into a path, a log line or a reply):
        refused.  A whole pair, escaped, is an ordinary character.
        """
        self.assertRefused(raw(Op.STAT, b'{"ns":"demo","key":"a\\ud800"}'), ErrorCode.BAD_REQUEST)
        [frame] = FrameDecoder().feed(raw(Op.STAT, b'{"ns":"demo","key":"\\ud83d\\ude00"}'))
        self.assertEqual(frame["key"], "\U0001f600")

    def test_not_an_object(self) -> None:
        """
        A JSON payload must be an object.
        """
        self.assertRefused(raw(Op.PING, b"[1]"), ErrorCode.BAD_REQUEST)

    def test_deep_nesting(self) -> None:
        """
        Deeply nested JSON would exhaust the parser's recursion: refused.
        """
        self.assertRefused(raw(Op.PING, b"[" * 100000), ErrorCode.BAD_REQUEST, 2**20)

    def test_missing_field(self) -> None:
        """
        A required field that is absent is refused, naming the field.
        """
        decoder = FrameDecoder()
        error = self.assertRaises(ProtocolError, decoder.feed, encode_message(Op.GET, {"ns": "x"}))
        self.assertIn("'key'", str(error))

    def test_wrong_types(self) -> None:
        """
        Fields of the wrong type are refused: booleans are not sizes, a
        negative size is not a size, a checksum is 64 lowercase hex digits.
        """
        for op, fields in [
            (Op.PUT, {"ns": "a", "key": "b", "size": True}),
            (Op.PUT, {"ns": "a", "key": "b", "size": -1}),
            (Op.PUT, {"ns": "a", "key": "b", "size": 2**63}),
            (Op.PUT, {"ns": 1, "key": "b"}),
            (Op.END, {"sha256": "AB" * 32}),
            (Op.END, {"sha256": "ab"}),
            (Op.HELLO, {"versions": ["1"]}),
        ]:
            self.assertRefused(encode_message(op, fields), ErrorCode.BAD_REQUEST, 4096)

    def test_unknown_fields_ignored(self) -> None:
        """
        Fields a later version adds are ignored, for forward compatibility.
        """
        [frame] = FrameDecoder().feed(encode_message(Op.PING, {"future": 1}))
        self.assertEqual(frame, Message(Op.PING, {"future": 1}))


def _valid_message() -> st.SearchStrategy[Message]:
    return st.sampled_from([f for f in EXAMPLES if isinstance(f, Message)])


class DecoderPropertyTests(SynchronousTestCase):
    """
    Whatever bytes arrive, the decoder either returns frames or raises
    L{ProtocolError}: no other exception escapes, and it never holds more
    than one frame's worth of bytes.
    """

    MAX = 4096

    def check_stream(self, chunks: list[bytes]) -> None:
        decoder = FrameDecoder(self.MAX)
        for chunk in chunks:
            try:
                frames = decoder.feed(chunk)
            except ProtocolError:
                return
            for frame in frames:
                self.assertIsInstance(frame, (Message, Data))
                if isinstance(frame, Message):
                    for name, (_kind, required) in SCHEMAS[frame.op].items():
                        if required:
                            self.assertIn(name, frame.fields)
            self.assertLessEqual(decoder.buffered, self.MAX + HEADER.size)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.binary(max_size=600), max_size=12))
    def test_random_bytes(self, chunks: list[bytes]) -> None:
        """
        Random byte streams.
        """
        self.check_stream(chunks)

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(_valid_message(), min_size=1, max_size=6),
        st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
        st.integers(1, 64),
    )
    def test_mutated_frames(
        self, frames: list[Message], flips: list[tuple[int, int]], split: int
    ) -> None:
        """
        Valid streams with bytes overwritten at random places, split into
        pieces of random size: mutations hit headers, lengths, opcodes and
        JSON alike.
        """
        data = bytearray(b"".join(encode(f) for f in frames))
        for position, value in flips:
            data[position % len(data)] = value
        self.check_stream([bytes(data[i : i + split]) for i in range(0, len(data), split)])

    @settings(max_examples=200, deadline=None)
    @given(
        st.dictionaries(
            st.text(max_size=8),
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                lambda inner: (
                    st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=4), inner, max_size=3)
                ),
                max_leaves=8,
            ),
            max_size=5,
        ),
        st.sampled_from([op for op in Op if op is not Op.DATA]),
    )
    def test_random_fields(self, fields: dict, op: Op) -> None:
        """
        Any JSON object under any opcode decodes to a frame that fits the
        schema, or is refused.
        """
        payload = json.dumps(fields).encode()
        self.check_stream([raw(op, payload)])
