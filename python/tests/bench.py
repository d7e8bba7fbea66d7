"""Rough numbers for the worker runtime, measured from Python playing the host.

    cd python && python3 tests/bench.py [--spawns 10] [--requests 20000]

Prints the time from spawn to READY, and echo throughput with 1 and 8 requests in
flight. Indicative only: the host here is Python, slower than pitboss itself.
"""

import os
import select
import sys
import time

from harness import WorkerProcess, req_frame
from pitboss_worker import protocol as P


def startup(n, adapter="examples.demo:adapter"):
    """Seconds from spawn to READY, and to the reply of a first async request."""
    ready = []
    first_async = []
    for _ in range(n):
        start = time.perf_counter()
        w = WorkerProcess(adapter)
        ready.append(time.perf_counter() - start)
        w.call("sleep", b'{"seconds": 0}')
        first_async.append(time.perf_counter() - start)
        w.close_stdin()
        w.wait()
        w.kill()
    return ready, first_async


def _stats(t):
    t = sorted(t)
    return "mean %.1f ms, median %.1f ms, min %.1f ms, max %.1f ms" % (
        1e3 * sum(t) / len(t), 1e3 * t[len(t) // 2], 1e3 * t[0], 1e3 * t[-1])


def echo_throughput(in_flight, total, payload=b"x" * 64):
    w = WorkerProcess("examples.demo:adapter")
    try:
        fd_in = w.proc.stdin.fileno()
        fd_out = w.proc.stdout.fileno()
        frames = [req_frame(i, "echo", payload, "text/plain") for i in range(1, total + 1)]
        decoder = P.FrameDecoder()
        sent = 0
        done = 0
        start = time.perf_counter()
        os.write(fd_in, b"".join(frames[:in_flight]))
        sent = in_flight
        while done < total:
            select.select([fd_out], [], [])
            replies = decoder.feed(os.read(fd_out, 1 << 20))
            done += len(replies)
            more = min(len(replies), total - sent)
            if more:
                os.write(fd_in, b"".join(frames[sent : sent + more]))
                sent += more
        elapsed = time.perf_counter() - start
        return total / elapsed
    finally:
        w.close_stdin()
        w.wait()
        w.kill()


def main(argv):
    spawns = int(argv[argv.index("--spawns") + 1]) if "--spawns" in argv else 10
    requests = int(argv[argv.index("--requests") + 1]) if "--requests" in argv else 20000
    print("python %s (%s)" % (sys.version.split()[0], sys.executable))
    ready, first_async = startup(spawns)
    print("spawn -> READY, %d spawns: %s" % (spawns, _stats(ready)))
    print("spawn -> first async reply: %s" % _stats(first_async))
    for in_flight in (1, 8, 32):
        rate = echo_throughput(in_flight, requests)
        print("echo, %2d in flight: %8.0f requests/s (%.1f us each)" % (in_flight, rate, 1e6 / rate))


if __name__ == "__main__":
    main(sys.argv[1:])
