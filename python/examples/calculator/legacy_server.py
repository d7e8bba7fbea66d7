"""The team's existing grpcio service (the "legacy" of docs/MIGRATING.md).

    python legacy_server.py PORT [EVENTS_FILE]

Serves calc.Calculator on 127.0.0.1:PORT (0: a free one), with reflection, and prints
"listening on PORT". Each Inspect call appends lines to EVENTS_FILE, if given (started,
cancelled, ended). Needs grpcio and the classes `protoc` generates from calc.proto on
sys.path.

TLS, for a service that already serves it: CALC_TLS_CERT and CALC_TLS_KEY (PEM files)
serve TLS; CALC_TLS_CLIENT_CA also requires a client certificate signed by that CA
(mTLS).
"""

import os
import sys
import time
from concurrent import futures

import grpc

import calc_pb2
import calc_pb2_grpc

EVENTS = sys.argv[2] if len(sys.argv) > 2 else None


def event(line):
    if EVENTS:
        with open(EVENTS, "a") as f:
            f.write(line + "\n")


class Calculator(calc_pb2_grpc.CalculatorServicer):
    def Add(self, request, context):
        return calc_pb2.Reply(value=request.a + request.b, computed_by="legacy")

    def Divide(self, request, context):
        if request.b == 0:
            context.set_trailing_metadata((("x-why", "b is 0"),))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "division by zero")
        return calc_pb2.Reply(value=request.a // request.b, computed_by="legacy")

    def Range(self, request, context):
        for i in range(request.n):
            yield calc_pb2.Reply(value=i, computed_by="legacy")

    def Sum(self, request_iterator, context):
        return calc_pb2.Reply(value=sum(r.value for r in request_iterator), computed_by="legacy")

    def Inspect(self, request, context):
        context.add_callback(lambda: event("call ended: active=%s" % context.is_active()))
        event("call started")
        until = time.monotonic() + request.sleep_s
        while time.monotonic() < until:
            if not context.is_active():
                event("cancelled")
                return calc_pb2.Inspection()
            time.sleep(0.02)
        seen = sorted("%s=%s" % (k, v) for k, v in context.invocation_metadata())
        return calc_pb2.Inspection(time_remaining=context.time_remaining() or 0.0, metadata=seen)


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    calc_pb2_grpc.add_CalculatorServicer_to_server(Calculator(), server)
    try:
        from grpc_reflection.v1alpha import reflection

        names = (calc_pb2.DESCRIPTOR.services_by_name["Calculator"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
    except ImportError:
        pass  # pip install grpcio-reflection to serve it
    addr = "127.0.0.1:%s" % (sys.argv[1] if len(sys.argv) > 1 else "0")
    if os.environ.get("CALC_TLS_CERT"):
        read = lambda var: open(os.environ[var], "rb").read()
        ca = read("CALC_TLS_CLIENT_CA") if os.environ.get("CALC_TLS_CLIENT_CA") else None
        creds = grpc.ssl_server_credentials(
            [(read("CALC_TLS_KEY"), read("CALC_TLS_CERT"))],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )
        port = server.add_secure_port(addr, creds)
    else:
        port = server.add_insecure_port(addr)
    server.start()
    print("listening on %d" % port, flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
