"""The "new" implementation of calc.Calculator, as a pitboss adapter (docs/MIGRATING.md).

    python -m pitboss_worker --adapter adapter:adapter

(with this directory and the generated calc_pb2 on the pool's python_path). Each
method is a command named after it; pitboss_worker.protobuf decodes the request and
encodes the reply with the generated classes.

Planted faults, for the migration test and for trying the runbook: Add(a=13, ...) is
off by one (a shadow mismatch), Add(a=666, ...) raises (an error of new's).
"""

from pitboss_worker import Adapter, InvalidRequest
from pitboss_worker.protobuf import grpc_method

import calc_pb2

adapter = Adapter("calculator")


@adapter.command(name="/calc.Calculator/Add")
@grpc_method(calc_pb2.AddRequest, calc_pb2.Reply)
def add(msg, req):
    """a + b."""
    if msg.a == 666:
        raise RuntimeError("planted failure")
    value = msg.a + msg.b + (1 if msg.a == 13 else 0)
    return calc_pb2.Reply(value=value, computed_by="new")


@adapter.command(name="/calc.Calculator/Divide")
@grpc_method(calc_pb2.DivideRequest, calc_pb2.Reply)
def divide(msg, req):
    """a // b."""
    if msg.b == 0:
        raise InvalidRequest("division by zero")
    return calc_pb2.Reply(value=msg.a // msg.b, computed_by="new")


@adapter.command(name="/calc.Calculator/Range")
@grpc_method(calc_pb2.RangeRequest, calc_pb2.Reply)
def range_(msg, req):
    """0, 1, ..., n-1."""
    for i in range(msg.n):
        yield calc_pb2.Reply(value=i, computed_by="new")
