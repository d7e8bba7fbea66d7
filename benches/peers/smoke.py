"""Smoke check of grpcio_peer.py (or of pitboss: it speaks the same proto).

    PY=$(benches/peers/setup.sh)
    $PY benches/peers/smoke.py                 # starts the peer itself (--workers 2, demo:adapter)
    $PY benches/peers/smoke.py --addr HOST:PORT  # checks a running server instead
    $PY benches/peers/smoke.py --rate 5        # then: echo of 64 bytes, 8 client threads, 5 s

It checks the payloads against what demo.py's functions return, encoded as
pitboss_worker/runtime.py encodes them: echo returns the request's bytes, compute
returns compact JSON (separators (",", ":")), counter counts 1, 2, 3 on one process,
stream yields {"i":0} .. {"i":2}. Exits 1 on the first mismatch.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import grpc  # noqa: E402

from grpcio_peer import _load_stubs  # noqa: E402  (stubs generated from proto/)


def check(label, got, want):
    ok = got == want
    print("%-28s %s  got=%r" % (label, "OK " if ok else "BAD", got))
    if not ok:
        print("    want=%r" % (want,))
        sys.exit(1)


def start_peer(workers):
    cmd = [
        sys.executable, os.path.join(HERE, "grpcio_peer.py"),
        "--workers", str(workers), "--adapter", "demo:adapter",
        "--python-path", "python", "--python-path", "python/examples", "--port", "0",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("LISTENING "):
        proc.kill()
        sys.exit("peer did not start: %r" % line)
    return proc, "127.0.0.1:%d" % int(line.split()[1])


def smoke(pb, stub):
    compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

    r = stub.Execute(pb.ExecuteRequest(command="echo", payload=b'{"a":1}'), timeout=10)
    check("echo payload", r.payload, b'{"a":1}')
    check("echo content_type", r.content_type, "application/json")

    r = stub.Execute(pb.ExecuteRequest(command="compute", payload=b'{"n": 1000}'), timeout=10)
    want = compact({"n": 1000, "sum": sum(i * i for i in range(1000))}).encode()
    check("compute payload", r.payload, want)
    check("compute content_type", r.content_type, "application/json")

    s = stub.CreateSession(pb.CreateSessionRequest(), timeout=10)
    print("%-28s id=%s worker=%s" % ("CreateSession", s.session_id, s.worker_id))
    pids = set()
    for want_count in (1, 2, 3):
        r = stub.Execute(pb.ExecuteRequest(command="counter", session_id=s.session_id), timeout=10)
        body = json.loads(r.payload)
        pids.add(body["pid"])
        check("counter count", body["count"], want_count)
    check("counter on one process", len(pids), 1)
    check("counter on session worker", "pid-%d" % pids.pop(), s.worker_id)
    g = stub.GetSession(pb.GetSessionRequest(session_id=s.session_id), timeout=10)
    check("GetSession id", g.session_id, s.session_id)
    stub.CloseSession(pb.CloseSessionRequest(session_id=s.session_id), timeout=10)
    try:
        stub.Execute(pb.ExecuteRequest(command="counter", session_id=s.session_id), timeout=10)
        check("counter after close", "succeeded", "NOT_FOUND")
    except grpc.RpcError as e:
        check("counter after close", e.code().name, "NOT_FOUND")

    chunks = list(stub.ExecuteStream(pb.ExecuteRequest(command="stream", payload=b'{"n": 3}'), timeout=10))
    check("stream payloads", [c.payload for c in chunks], [b'{"i":0}', b'{"i":1}', b'{"i":2}'])
    check("stream last flags", [c.last for c in chunks], [False, False, True])

    r = stub.Execute(pb.ExecuteRequest(command="sleep", payload=b'{"seconds": 0.01}'), timeout=10)
    check("sleep (async) payload", r.payload, b'{"slept":0.01}')

    for command, code in (("no_such_command", "NOT_FOUND"), ("stream", "INVALID_ARGUMENT")):
        try:
            stub.Execute(pb.ExecuteRequest(command=command), timeout=10)
            check("error " + command, "succeeded", code)
        except grpc.RpcError as e:
            check("error " + command, e.code().name, code)
    try:
        stub.Execute(pb.ExecuteRequest(command="counter"), timeout=10)  # raises ValueError
        check("python exception", "succeeded", "UNKNOWN")
    except grpc.RpcError as e:
        check("python exception", e.code().name, "UNKNOWN")
        print("    details: %s" % e.details())

    names = [c.name for c in stub.ListCommands(pb.ListCommandsRequest(), timeout=10).commands]
    check("ListCommands", names, ["echo", "compute", "counter", "stream", "sleep", "whoami", "version"])


def rate(pb, stub, seconds, threads, size):
    payload = b"x" * size
    req = pb.ExecuteRequest(command="echo", payload=payload)
    counts = [0] * threads
    errors = [0] * threads
    stop = None

    def run(i):
        while time.monotonic() < stop:
            try:
                if stub.Execute(req, timeout=10).payload == payload:
                    counts[i] += 1
                else:
                    errors[i] += 1
            except grpc.RpcError:
                errors[i] += 1

    for _ in range(200):  # warm-up
        stub.Execute(req, timeout=10)
    t0 = time.monotonic()
    stop = t0 + seconds
    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    elapsed = time.monotonic() - t0
    total = sum(counts)
    print("echo %d B, %d client threads, %.1f s: %d calls, %d errors, %.0f calls/s"
          % (size, threads, elapsed, total, sum(errors), total / elapsed))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--addr", help="a running server; default: start the peer")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rate", type=float, default=0, metavar="SECONDS", help="then measure echo for SECONDS")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args()
    pb, pb_grpc = _load_stubs(os.path.join(REPO, "proto"))
    proc = None
    addr = args.addr
    if addr is None:
        proc, addr = start_peer(args.workers)
    try:
        with grpc.insecure_channel(addr) as channel:
            stub = pb_grpc.BridgeStub(channel)
            smoke(pb, stub)
            print("smoke: all OK against %s" % addr)
            if args.rate:
                rate(pb, stub, args.rate, args.threads, args.size)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)


if __name__ == "__main__":
    main()
