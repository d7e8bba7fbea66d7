"""Frame encoding and decoding (no processes)."""

import struct
import unittest

import harness  # noqa: F401  (puts python/ on sys.path)
from pitboss_worker import protocol as P


def raw(version, kind, flags, body, request_id=1):
    return struct.pack(">IBBHQ", 12 + len(body), version, kind, flags, request_id) + body


def samples():
    return [
        P.encode(P.READY, 0, b'{"protocol": 1, "pid": 42, "commands": []}'),
        P.encode_request(7, "echo", "s-1", "application/json", 1500, b'{"a":1}'),
        P.encode_payload(P.RESPONSE, 7, "application/octet-stream", bytes([0, 255, 1, 2])),
        P.encode(P.ERROR, 9, b'{"kind": "exception", "type": "ValueError"}'),
        P.encode_payload(P.STREAM_CHUNK, 3, b"text/plain", b"chunk"),
        P.encode(P.STREAM_END, 3),
        P.encode(P.CANCEL, 11),
        P.encode(P.PING, 5),
        P.encode(P.PONG, 5),
        P.encode(P.SESSION_CLOSE, 0, "abc".encode()),
        P.encode(P.SHUTDOWN),
    ]


class HeaderTest(unittest.TestCase):
    def test_layout_matches_the_protocol_document(self):
        self.assertEqual(
            P.encode(P.CANCEL, 0x0102),
            bytes([0, 0, 0, 12, 1, 7, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2]),
        )
        self.assertEqual(P.HEADER.size, 16)
        self.assertEqual(P.REQUEST_HEAD.size, 10)

    def test_kind_values(self):
        self.assertEqual(
            [P.READY, P.REQUEST, P.RESPONSE, P.ERROR, P.STREAM_CHUNK, P.STREAM_END,
             P.CANCEL, P.PING, P.PONG, P.SESSION_CLOSE, P.SHUTDOWN],
            list(range(1, 12)),
        )

    def test_named_sizes(self):
        self.assertEqual(
            (P.PREFIX_LEN, P.HEADER_LEN, P.FRAME_HEADER_LEN, P.REQUEST_HEAD_LEN, P.PAYLOAD_HEAD_LEN),
            (4, 12, 16, 10, 2),
        )
        self.assertEqual(P.LENGTH_PREFIX.unpack_from(P.encode(P.PING, 1))[0], P.HEADER_LEN)
        self.assertEqual(P.PAYLOAD_FRAME_HEADER.size, P.HEADER.size + P.PAYLOAD_HEAD.size)
        self.assertEqual(P.MAX_STRING_BYTES, 2 ** 16 - 1)

    def test_payload_frame_layout(self):
        f = P.encode_payload(P.RESPONSE, 258, "ab", b"xyz")
        self.assertEqual(f, struct.pack(">IBBHQH", 12 + 2 + 2 + 3, 1, 3, 0, 258, 2) + b"abxyz")


class RoundTripTest(unittest.TestCase):
    def test_every_kind_round_trips(self):
        data = b"".join(samples())
        frames = P.FrameDecoder().feed(data)
        self.assertEqual([f.kind for f in frames], list(range(1, 12)))
        self.assertEqual([f.request_id for f in frames], [0, 7, 7, 9, 3, 3, 11, 5, 5, 0, 0])
        self.assertEqual(frames[2].payload(), ("application/octet-stream", bytes([0, 255, 1, 2])))
        self.assertEqual(frames[4].payload(), ("text/plain", b"chunk"))
        self.assertEqual(frames[3].json()["type"], "ValueError")
        self.assertEqual(frames[9].body, b"abc")

    def test_request_body_round_trips(self):
        payload = bytes(range(256)) * 3
        frame = P.FrameDecoder().feed(
            P.encode_request(2 ** 64 - 1, "cömmand", "sess-é", "application/x-ü", 2 ** 32 - 1, payload)
        )[0]
        self.assertEqual(frame.request_id, 2 ** 64 - 1)
        self.assertEqual(
            P.decode_request(frame.body),
            ("cömmand", "sess-é", "application/x-ü", 2 ** 32 - 1, payload),
        )
        # empty strings and payload
        frame = P.FrameDecoder().feed(P.encode_request(1, "x", None, "", 0, b""))[0]
        self.assertEqual(P.decode_request(frame.body), ("x", None, "", 0, b""))

    def test_requests_decode_in_place_in_the_read_buffer(self):
        # The runtime's fast path: bodies are decoded where split_frames found them.
        data = b"".join(
            [P.encode(P.PING, 1)]
            + [P.encode_request(i, "c%d" % i, "s" if i % 2 else None, "t" * i, i, b"p" * i) for i in range(2, 6)]
        )
        frames, offset = P.split_frames(data, 0, 1 << 20)
        self.assertEqual(offset, len(data))
        for kind, rid, start, end, flags in frames[1:]:
            self.assertEqual(flags, 0)
            command, session_id, content_type, timeout_ms, payload_start, ctx = P.decode_request_at(data, start, end)
            self.assertIsNone(ctx)
            self.assertEqual(
                (command, session_id, content_type, timeout_ms, data[payload_start:end]),
                P.decode_request(data[start:end]),
            )
            self.assertEqual(
                (command, session_id, content_type, timeout_ms, data[payload_start:end]),
                ("c%d" % rid, "s" if rid % 2 else None, "t" * rid, rid, b"p" * rid),
            )
        # A body is bounded by its own end, not by the buffer's.
        kind, rid, start, end, _ = frames[1]
        with self.assertRaises(P.ProtocolError):
            P.decode_request_at(data, start, end - len(b"p" * rid) - 1)
        with self.assertRaises(P.ProtocolError):
            P.decode_request_at(data, start, start + P.REQUEST_HEAD_LEN - 1)
        # bytearray and memoryview bodies decode too
        body = data[start:end]
        self.assertEqual(P.decode_request(bytearray(body)), P.decode_request(body))
        self.assertEqual(P.decode_request(memoryview(body)), P.decode_request(body))

    def test_partial_input_waits_for_more(self):
        full = b"".join(samples())
        dec = P.FrameDecoder()
        got = []
        for i in range(len(full)):
            got.extend(dec.feed(full[i : i + 1]))
        self.assertEqual(len(got), 11)
        self.assertEqual(dec.pending, 0)
        one = samples()[1]
        for cut in range(len(one)):
            self.assertEqual(P.FrameDecoder().feed(one[:cut]), [], "cut at %d" % cut)

    def test_frame_reader_gives_tuples(self):
        reader = P.FrameReader(1024)
        data = b"".join(samples())
        got = reader.feed(data[:100]) + reader.feed(data[100:])
        self.assertEqual([(k, r) for k, r, _ in got][:3], [(1, 0), (2, 7), (3, 7)])
        self.assertEqual(got[9][2], b"abc")
        self.assertEqual(P.decode_payload(got[2][2]), ("application/octet-stream", bytes([0, 255, 1, 2])))

    def test_split_frames_reports_offsets(self):
        a, b = samples()[7], samples()[1]
        data = a + b[:5]
        frames, offset = P.split_frames(data, 0, 1 << 20)
        self.assertEqual(frames, [(P.PING, 5, 16, 16, 0)])
        self.assertEqual(offset, len(a))

    def test_too_long_strings_are_refused(self):
        with self.assertRaises(ValueError):
            P.encode_request(1, "x" * 70000, None, "", 0, b"")


class MalformedTest(unittest.TestCase):
    def check(self, data, fragment, max_frame_bytes=P.DEFAULT_MAX_FRAME_BYTES, allowed=None):
        with self.assertRaises(P.ProtocolError) as cm:
            P.FrameDecoder(max_frame_bytes, allowed).feed(data)
        self.assertIn(fragment, str(cm.exception))

    def test_oversized_is_rejected_before_buffering(self):
        # only the 4-byte prefix is there: no waiting for 2 GiB
        self.check(b"\x7f\xff\xff\xff", "exceeds the maximum", 1024)
        self.check(raw(1, 3, 0, b"\x00\x00" + b"x" * 100), "exceeds the maximum", 64)

    def test_short_version_flags_kind(self):
        self.check(b"\x00\x00\x00\x03\x01\x02\x03", "shorter than")
        self.check(raw(99, 3, 0, b""), "version 99")
        self.check(raw(1, 3, 1, b"\x00\x00"), "flags")
        self.check(raw(1, 200, 0, b""), "unknown message kind 200")

    def test_direction(self):
        self.check(raw(1, P.PING, 0, b""), "unexpected PING", allowed=P.WORKER_KINDS)
        self.check(raw(1, P.RESPONSE, 0, b"\x00\x00"), "unexpected RESPONSE", allowed=P.HOST_KINDS)

    def test_bodies(self):
        self.check(raw(1, 3, 0, b"\x00\x09ab"), "content type needs")
        self.check(raw(1, 3, 0, b"\x00"), "payload header")
        self.check(raw(1, 4, 0, b"not json"), "malformed ERROR")
        self.check(raw(1, 6, 0, b"x"), "expected an empty body")
        self.check(raw(1, 10, 0, b"\xff\xfe"), "not valid UTF-8")
        self.check(raw(1, 2, 0, b"\x00\x01"), "request header needs 10 bytes")
        self.check(raw(1, 2, 0, struct.pack(">HHHI", 5, 0, 0, 0) + b"ab"), "request strings need")
        self.check(raw(1, 2, 0, struct.pack(">HHHI", 1, 0, 0, 0) + b"\xff"), "not valid UTF-8")


if __name__ == "__main__":
    unittest.main()
