"""Call pitboss from Python with grpcio.

    pip install grpcio grpcio-tools
    python python/examples/client.py [HOST:PORT]

The stubs are generated from proto/ at start (grpcio-tools), so the example has no
checked-in generated code. A real client would generate them once in its build.
"""

import json
import uuid
import os
import sys
import tempfile

import grpc
from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.join(HERE, "..", "..", "proto")


def load_stubs():
    out = tempfile.mkdtemp(prefix="pitboss-stubs-")
    proto_include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main([
        "protoc", "-I", PROTO_DIR, "-I", proto_include,
        "--python_out", out, "--grpc_python_out", out,
        os.path.join(PROTO_DIR, "pitboss", "v1", "bridge.proto"),
    ])
    if rc != 0:
        raise SystemExit("protoc failed")
    sys.path.insert(0, out)
    from pitboss.v1 import bridge_pb2, bridge_pb2_grpc
    return bridge_pb2, bridge_pb2_grpc


def main(addr):
    pb, rpc = load_stubs()
    with grpc.insecure_channel(addr) as channel:
        bridge = rpc.BridgeStub(channel)

        # A plain call: the payload is bytes, passed to Python untouched.
        r = bridge.Execute(pb.ExecuteRequest(command="echo", payload=b'{"hello": "world"}'), timeout=10)
        print("echo ->", r.payload.decode(), "from", r.backend, r.worker_id)

        # A session: choose its id (random 128-bit) and send it in the request and as
        # x-session-id metadata, from CreateSession on, so that a load balancer hashing
        # on that header (config/nginx/pitboss.conf) keeps the session on the instance
        # that holds it.
        sid = uuid.uuid4().hex
        meta = [("x-session-id", sid)]
        s = bridge.CreateSession(pb.CreateSessionRequest(session_id=sid), metadata=meta, timeout=10)
        for _ in range(3):
            r = bridge.Execute(pb.ExecuteRequest(command="counter", session_id=s.session_id),
                               metadata=meta, timeout=10)
            print("counter ->", json.loads(r.payload)["count"], "on", r.worker_id)
        bridge.CloseSession(pb.CloseSessionRequest(session_id=s.session_id), timeout=10)

        # Streaming.
        chunks = [c.payload.decode() for c in
                  bridge.ExecuteStream(pb.ExecuteRequest(command="stream", payload=b'{"n": 3}'), timeout=10)]
        print("stream ->", chunks)

        # Errors come back as gRPC statuses with details in the trailing metadata.
        try:
            bridge.Execute(pb.ExecuteRequest(command="no_such_command"), timeout=10)
        except grpc.RpcError as e:
            print("error ->", e.code().name, e.details())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051")
