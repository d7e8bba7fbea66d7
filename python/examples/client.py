"""Call pitboss from Python with grpcio.

    pip install grpcio grpcio-tools
    python python/examples/client.py [HOST:PORT]
    python python/examples/client.py HOST:PORT --ca ca.pem [--cert c.pem --key k.pem]
        [--server-name NAME]     # TLS, and mTLS with a client certificate

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


def open_channel(addr, ca=None, cert=None, key=None, server_name=None):
    """A plaintext channel, or TLS trusting `ca` (and presenting `cert`/`key` for mTLS)."""
    if ca is None:
        return grpc.insecure_channel(addr)

    def read(path):
        with open(path, "rb") as f:
            return f.read()

    creds = grpc.ssl_channel_credentials(
        root_certificates=read(ca),
        private_key=read(key) if key else None,
        certificate_chain=read(cert) if cert else None,
    )
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(addr, creds, options=options)


def main(addr, **tls):
    pb, rpc = load_stubs()
    with open_channel(addr, **tls) as channel:
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
    import argparse

    p = argparse.ArgumentParser(description="Call pitboss from Python with grpcio.")
    p.add_argument("addr", nargs="?", default="127.0.0.1:50051")
    p.add_argument("--ca", help="TLS: the CA that signed pitboss's certificate (PEM)")
    p.add_argument("--cert", help="mTLS: this client's certificate chain (PEM)")
    p.add_argument("--key", help="mTLS: this client's private key (PEM)")
    p.add_argument("--server-name", help="TLS: the name to check in pitboss's certificate")
    a = p.parse_args()
    main(a.addr, ca=a.ca, cert=a.cert, key=a.key, server_name=a.server_name)
