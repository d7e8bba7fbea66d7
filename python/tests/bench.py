"""Rough numbers for the worker runtime, measured from Python playing the host.

    cd python && python3 tests/bench.py [--spawns 10] [--requests 20000] [--compare DIR]

Prints the time from spawn to READY, and echo throughput with 1, 8 and 32 requests in
flight, with the worker's CPU time per request (all its threads, from
/proc/PID/task/*/schedstat, nanoseconds; falls back to /proc/PID/stat ticks) and the
median round trip. Two ways to send:

* ``batched``: the host writes as many new requests as replies it just read, in one
  write (frames arrive together, as with a pipelining Python client);
* ``single``: one write per request frame, as pitboss sends them (each request is
  handled alone unless the worker is behind).

Indicative only: the host here is Python, slower than pitboss itself. Figures for the
runtime designs tried are in python/README.md ("Performance").
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


def worker_cpu(pid):
    """CPU seconds used so far by all live threads of ``pid`` (schedstat: ns), or by
    the whole process from /proc/PID/stat (clock ticks) where schedstat is missing."""
    total = 0
    try:
        for tid in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/schedstat" % (pid, tid)) as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_BARE_LOOP = """
import os
read = os.read
write = os.write
while True:
    data = read(0, 1 << 20)
    if not data:
        break
    write(1, data)
"""


def bare_pipe(total, payload=b"x" * 84):
    """The floor, for scale: ``(us per round trip, worker CPU us per round trip, p50
    us)`` of a Python process that echoes raw bytes over its pipes (no frames)."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", _BARE_LOOP], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        fd_in = proc.stdin.fileno()
        fd_out = proc.stdout.fileno()
        os.write(fd_in, payload)
        os.read(fd_out, 1 << 20)
        clock = time.perf_counter
        rtt = []
        cpu0 = worker_cpu(proc.pid)
        start = clock()
        for _ in range(total):
            t = clock()
            os.write(fd_in, payload)
            select.select([fd_out], [], [])
            os.read(fd_out, 1 << 20)
            rtt.append(clock() - t)
        elapsed = clock() - start
        cpu = worker_cpu(proc.pid) - cpu0
        rtt.sort()
        return 1e6 * elapsed / total, 1e6 * cpu / total, 1e6 * rtt[len(rtt) // 2]
    finally:
        proc.stdin.close()
        proc.wait()
        proc.stdout.close()


def echo_throughput(in_flight, total, payload=b"x" * 64, single=False, other=None):
    """``(requests/s, worker CPU us per request, p50 round trip us)``.

    The round trip of a request is from the write that sent it to the read that got its
    reply; its median is meaningful at 1 in flight."""
    if other is None:
        w = WorkerProcess("examples.demo:adapter")
    else:
        # `python -m` imports from its working directory first.
        path = os.pathsep.join([other, os.path.join(other, "examples"), os.path.join(other, "tests")])
        w = WorkerProcess("examples.demo:adapter", env={"PYTHONPATH": path}, cwd=other)
    try:
        fd_in = w.proc.stdin.fileno()
        fd_out = w.proc.stdout.fileno()
        frames = [req_frame(i, "echo", payload, "text/plain") for i in range(1, total + 1)]
        decoder = P.FrameDecoder()
        clock = time.perf_counter
        write = os.write
        sent_at = [0.0] * (total + 1)
        rtt = []

        def send(lo, hi):
            now = clock()
            if single:
                for i in range(lo, hi):
                    write(fd_in, frames[i])
                    sent_at[i + 1] = now
            else:
                write(fd_in, b"".join(frames[lo:hi]))
                for i in range(lo, hi):
                    sent_at[i + 1] = now

        w.call("echo", b"warm-up")  # id 1, done before the run reuses it
        done = 0
        cpu0 = worker_cpu(w.pid)
        start = clock()
        send(0, in_flight)
        sent = in_flight
        while done < total:
            select.select([fd_out], [], [])
            replies = decoder.feed(os.read(fd_out, 1 << 20))
            now = clock()
            for f in replies:
                rtt.append(now - sent_at[f.request_id])
            done += len(replies)
            more = min(len(replies), total - sent)
            if more:
                send(sent, sent + more)
                sent += more
        elapsed = clock() - start
        cpu = worker_cpu(w.pid) - cpu0
        rtt.sort()
        return total / elapsed, 1e6 * cpu / total, 1e6 * rtt[len(rtt) // 2]
    finally:
        w.close_stdin()
        w.wait()
        w.kill()


def main(argv):
    spawns = int(argv[argv.index("--spawns") + 1]) if "--spawns" in argv else 10
    requests = int(argv[argv.index("--requests") + 1]) if "--requests" in argv else 20000
    print("python %s (%s)" % (sys.version.split()[0], sys.executable))
    if spawns:
        ready, first_async = startup(spawns)
        print("spawn -> READY, %d spawns: %s" % (spawns, _stats(ready)))
        print("spawn -> first async reply: %s" % _stats(first_async))
    # --compare DIR: the same measurements, interleaved, for the python/ directory DIR
    # (another version of the runtime: `git archive REV python | tar -x -C /tmp/old`
    # and DIR /tmp/old/python).
    runtimes = [("", None)]
    if "--compare" in argv:
        other = os.path.abspath(argv[argv.index("--compare") + 1])
        runtimes.append(("[%s] " % other, other))
    each, cpu, p50 = bare_pipe(requests)
    print("bare pipe loop (no frames), 1 in flight: %5.1f us each, worker CPU %5.1f us, p50 %6.1f us" % (each, cpu, p50))
    for mode in ("single", "batched"):
        for in_flight in (1, 8, 32):
            for label, other in runtimes:
                rate, cpu, p50 = echo_throughput(in_flight, requests, single=mode == "single", other=other)
                print("%secho, %-7s %2d in flight: %8.0f requests/s (%5.1f us each), worker CPU %5.1f us/request, p50 %6.1f us"
                      % (label, mode, in_flight, rate, 1e6 / rate, cpu, p50))


if __name__ == "__main__":
    main(sys.argv[1:])
