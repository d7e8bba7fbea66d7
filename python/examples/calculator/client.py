"""A client of calc.Calculator built only on the generated stubs: it calls pitboss as it
called the old service (only the address changes). Each command prints one JSON line.

    python client.py ADDR probe              answers to a fixed set of calls, as bytes
    python client.py ADDR add A B [KEY]      Add, with x-session-id KEY
    python client.py ADDR gzip-add A B       Add, its request compressed with gzip
    python client.py ADDR cancel EVENTS      Inspect, cancelled by the client once the
                                             service logged its start in EVENTS
    python client.py ADDR keys N             Add(100 + i, 1) for keys user-i, i < N
    python client.py ADDR inspect SLEEP TIMEOUT   Inspect, with a deadline and metadata
    python client.py ADDR big NBYTES         Inspect with NBYTES of padding
    python client.py ADDR raw METHOD HEX     a raw request (any bytes) to METHOD
    python client.py ADDR sum V1 V2 ...      Sum (client-streaming)
    python client.py ADDR reflect            the services and methods reflection lists

Answers are shown as the raw response bytes (hex), the status code and message, and
the metadata, leaving out pitboss's own x-pitboss-* headers, so that two servers'
answers can be compared byte for byte.
"""

import json
import sys
import time

import grpc

import calc_pb2
import calc_pb2_grpc


def md(pairs):
    # pitboss adds x-pitboss-backend, and its HTTP/2 server a "date" header (as any
    # hyper server does): transport details, not the service's metadata.
    return sorted([k, v if isinstance(v, str) else v.hex()] for k, v in (pairs or ())
                  if not k.startswith("x-pitboss-") and k not in ("date", "content-length"))


def raw_unary(channel, method, request_bytes, metadata=None, timeout=10):
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    try:
        resp, c = call.with_call(request_bytes, metadata=metadata, timeout=timeout)
        return {"code": "OK", "bytes": resp.hex(), "headers": md(c.initial_metadata()),
                "trailers": md(c.trailing_metadata())}
    except grpc.RpcError as e:
        return {"code": e.code().name, "message": e.details(), "headers": md(e.initial_metadata()),
                "trailers": md(e.trailing_metadata())}


def raw_stream(channel, method, request_bytes, timeout=10):
    call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
    it = call(request_bytes, timeout=timeout)
    out = []
    try:
        for m in it:
            out.append(m.hex())
        return {"code": "OK", "messages": out, "trailers": md(it.trailing_metadata())}
    except grpc.RpcError as e:
        return {"code": e.code().name, "message": e.details(), "messages": out,
                "trailers": md(e.trailing_metadata())}


def probe(channel):
    ser = lambda m: m.SerializeToString()
    return {
        "add": raw_unary(channel, "/calc.Calculator/Add", ser(calc_pb2.AddRequest(a=2, b=3))),
        "divide_by_zero": raw_unary(channel, "/calc.Calculator/Divide",
                                    ser(calc_pb2.DivideRequest(a=1, b=0))),
        "range": raw_stream(channel, "/calc.Calculator/Range", ser(calc_pb2.RangeRequest(n=4))),
        "unknown_method": raw_unary(channel, "/calc.Calculator/Nope", b""),
        "unknown_service": raw_unary(channel, "/calc.Other/Add", b""),
        "malformed": raw_unary(channel, "/calc.Calculator/Add", b"\xff\xff\xff"),
    }


def main():
    addr, cmd, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    channel = grpc.insecure_channel(addr)
    stub = calc_pb2_grpc.CalculatorStub(channel)
    if cmd == "probe":
        out = probe(channel)
    elif cmd == "add":
        meta = [("x-session-id", args[2])] if len(args) > 2 else None
        try:
            r = stub.Add(calc_pb2.AddRequest(a=int(args[0]), b=int(args[1])), metadata=meta, timeout=10)
            out = {"code": "OK", "value": r.value, "computed_by": r.computed_by}
        except grpc.RpcError as e:
            out = {"code": e.code().name, "message": e.details()}
    elif cmd == "gzip-add":
        try:
            r = stub.Add(calc_pb2.AddRequest(a=int(args[0]), b=int(args[1])), timeout=10,
                         compression=grpc.Compression.Gzip)
            out = {"code": "OK", "value": r.value, "computed_by": r.computed_by}
        except grpc.RpcError as e:
            out = {"code": e.code().name, "message": e.details()}
    elif cmd == "cancel":
        def started():
            try:
                with open(args[0]) as f:
                    return f.read().count("call started")
            except FileNotFoundError:
                return 0
        before = started()
        call = stub.Inspect.future(calc_pb2.InspectRequest(sleep_s=60), timeout=120)
        until = time.monotonic() + 60
        while started() == before and time.monotonic() < until:
            time.sleep(0.02)
        out = {"started": started() > before, "cancelled": call.cancel()}
        try:
            call.result()
            out["code"] = "OK"
        except grpc.FutureCancelledError:
            out["code"] = "CANCELLED"
        except grpc.RpcError as e:
            out["code"] = e.code().name
    elif cmd == "keys":
        out = []
        for i in range(int(args[0])):
            key = "user-%d" % i
            r = stub.Add(calc_pb2.AddRequest(a=100 + i, b=1), metadata=[("x-session-id", key)], timeout=10)
            out.append({"key": key, "value": r.value, "computed_by": r.computed_by})
    elif cmd == "inspect":
        try:
            r = stub.Inspect(calc_pb2.InspectRequest(sleep_s=float(args[0])),
                             metadata=[("x-team", "payments"), ("x-trace-bin", b"\x00\x01")],
                             timeout=float(args[1]))
            out = {"code": "OK", "time_remaining": r.time_remaining, "metadata": list(r.metadata)}
        except grpc.RpcError as e:
            out = {"code": e.code().name, "message": e.details()}
    elif cmd == "big":
        try:
            stub.Inspect(calc_pb2.InspectRequest(padding=b"x" * int(args[0])), timeout=10)
            out = {"code": "OK"}
        except grpc.RpcError as e:
            out = {"code": e.code().name, "message": e.details()}
    elif cmd == "sum":
        values = [int(v) for v in args]
        try:
            r = stub.Sum(iter([calc_pb2.Reply(value=v) for v in values]), timeout=10)
            out = {"code": "OK", "value": r.value, "computed_by": r.computed_by}
        except grpc.RpcError as e:
            out = {"code": e.code().name, "message": e.details()}
    elif cmd == "reflect":
        # What grpcurl and Postman do: list the services, then read a method's types.
        from google.protobuf.descriptor_pool import DescriptorPool
        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
            ProtoReflectionDescriptorDatabase,
        )

        db = ProtoReflectionDescriptorDatabase(channel)
        service = DescriptorPool(db).FindServiceByName("calc.Calculator")
        out = {"services": sorted(db.get_services()),
               "methods": {m.name: [m.input_type.full_name, m.output_type.full_name]
                           for m in service.methods}}
    elif cmd == "raw":
        out = raw_unary(channel, args[0], bytes.fromhex(args[1]))
    else:
        raise SystemExit("unknown command %r" % cmd)
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
