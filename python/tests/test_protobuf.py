"""pitboss_worker.protobuf.grpc_method, with stand-ins for generated classes (the
runtime's tests run without protobuf; tests/transparent.rs uses the real ones)."""

import unittest

import harness  # noqa: F401  (puts python/ on sys.path)
from pitboss_worker import Adapter, InvalidRequest, Request, ResultError
from pitboss_worker.protobuf import grpc_method


class _Descriptor(object):
    def __init__(self, name):
        self.full_name = name


class Num(object):
    """A message of one int, encoded as its decimal digits."""

    DESCRIPTOR = _Descriptor("t.Num")

    def __init__(self, n=0):
        self.n = n

    def ParseFromString(self, data):
        if not data.isdigit():
            raise ValueError("Error parsing message")
        self.n = int(data)

    def SerializeToString(self):
        return str(self.n).encode()


def _req(payload):
    return Request("r1", "/t.S/M", None, "application/grpc", payload)


class GrpcMethodTest(unittest.TestCase):
    def test_unary_decodes_and_encodes(self):
        @grpc_method(Num, Num)
        def double(msg, req):
            return Num(msg.n * 2)

        self.assertEqual(double(_req(b"21")), b"42")

    def test_streaming_stays_a_generator(self):
        a = Adapter("t")

        @a.command(name="/t.S/Count")
        @grpc_method(Num, Num)
        def count(msg, req):
            for i in range(msg.n):
                yield Num(i)

        self.assertTrue(a.commands["/t.S/Count"].streaming)
        self.assertEqual(list(count(_req(b"3"))), [b"0", b"1", b"2"])

    def test_a_request_that_does_not_decode_is_the_callers_error(self):
        @grpc_method(Num, Num)
        def f(msg, req):
            return msg

        with self.assertRaises(InvalidRequest) as e:
            f(_req(b"\xff"))
        self.assertIn("t.Num", str(e.exception))

    def test_a_result_of_the_wrong_type_is_the_commands_error(self):
        @grpc_method(Num, Num)
        def f(msg, req):
            return {"n": 1}

        with self.assertRaises(ResultError):
            f(_req(b"1"))


if __name__ == "__main__":
    unittest.main()
