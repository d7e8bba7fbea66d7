"""Commands that serve a transparent gRPC method (docs/MIGRATING.md).

pitboss hands a transparent call's command the request message's protobuf bytes and
sends back the bytes the command returns, so the runtime itself needs no protobuf.
This helper decodes and encodes with the classes ``protoc`` generated for your proto
(it imports nothing: the classes bring ``protobuf``, which a gRPC shop already has)::

    from pitboss_worker import Adapter
    from pitboss_worker.protobuf import grpc_method
    import calc_pb2

    adapter = Adapter("calc")

    @adapter.command(name="/calc.Calculator/Add")
    @grpc_method(calc_pb2.AddRequest, calc_pb2.AddReply)
    def add(msg, req):
        return calc_pb2.AddReply(sum=msg.a + msg.b)

The function gets the decoded request message and the :class:`Request`, and returns a
response message (or a generator of them, for a server-streaming method). A request
that does not decode is the caller's error (``InvalidRequest``: INVALID_ARGUMENT); a
result of the wrong type is the command's (``ResultError``). Exceptions map to
statuses as for any command.
"""

from .adapter import InvalidRequest, ResultError, _code_flags, _CO_GENERATOR

__all__ = ["grpc_method"]


def _decode(request_class, req):
    msg = request_class()
    try:
        msg.ParseFromString(req.payload)
    except Exception as e:  # google.protobuf.message.DecodeError and friends
        raise InvalidRequest(
            "the request is not a %s message: %s" % (request_class.DESCRIPTOR.full_name, e)
        )
    return msg


def _encode(response_class, out):
    if not isinstance(out, response_class):
        raise ResultError(
            "the command returned %s, not a %s message"
            % (type(out).__name__, response_class.DESCRIPTOR.full_name)
        )
    return out.SerializeToString()


def grpc_method(request_class, response_class):
    """Decorates ``func(message, req)`` into a command on protobuf bytes (see the
    module docs). A generator function stays one (a server-streaming method)."""

    def wrap(func):
        if _code_flags(func) & _CO_GENERATOR:

            def command(req):
                for out in func(_decode(request_class, req), req):
                    yield _encode(response_class, out)

        else:

            def command(req):
                return _encode(response_class, func(_decode(request_class, req), req))

        command.__name__ = getattr(func, "__name__", "command")
        command.__doc__ = func.__doc__
        return command

    return wrap
