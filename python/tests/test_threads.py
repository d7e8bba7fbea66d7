"""The worker's threads: the main thread reads and runs requests itself, and a standby
reader takes over reading while a command runs long. These tests prove, with real
worker processes, what the old reader -> executor hand-off was there for: heartbeats and
cancels are seen while a synchronous command runs, async commands run alongside it,
pipelined replies share writes, and frames split across the hand-over of reading are
reassembled. Bounds are generous (busy CI machines); nothing waits on a fixed sleep
for correctness."""

import time
import unittest

from harness import WorkerProcess, json_of, payload_of, req_frame
from pitboss_worker import protocol as P

#: How long a heartbeat or cancel may wait behind a running command: the runtime's
#: bound is about 10 ms plus a GIL switch interval; 1 s leaves room for a slow machine.
PROMPT = 1.0


def write_syscalls(pid):
    """How many write syscalls the process has made (/proc/PID/io, all its threads)."""
    with open("/proc/%d/io" % pid) as f:
        for line in f:
            if line.startswith("syscw:"):
                return int(line.split()[1])
    raise AssertionError("no syscw in /proc/%d/io" % pid)


class ThreadsTest(unittest.TestCase):
    adapter = "examples.faults:adapter"

    def setUp(self):
        self.w = WorkerProcess(self.adapter)
        self.addCleanup(self.w.kill)

    def recv_kind(self, kind, rid, timeout):
        """The next frame, which must be ``kind`` for ``rid``, within ``timeout``."""
        start = time.monotonic()
        f = self.w.recv(timeout)
        self.assertEqual((P.KIND_NAMES[f.kind], f.request_id), (P.KIND_NAMES[kind], rid))
        return f, time.monotonic() - start

    def test_pings_are_answered_while_a_5_second_sync_command_runs(self):
        rid = self.w.request("sleep", b'{"seconds": 5}')
        start = time.monotonic()
        for seq in range(1, 4):
            self.w.send(P.encode(P.PING, seq))
            _, took = self.recv_kind(P.PONG, seq, PROMPT)
            self.assertLess(took, PROMPT)
        self.assertLess(time.monotonic() - start, 4, "the command must still be running")
        # It is still running: stop it (cooperatively) instead of waiting 5 s.
        self.w.send(P.encode(P.CANCEL, rid))
        f = self.w.replies([rid])[rid][-1]
        self.assertEqual((f.kind, f.json()["kind"]), (P.ERROR, "cancelled"))
        self.assertEqual(payload_of(self.w.call("echo", b"after"))[1], b"after")

    def test_cancel_of_a_request_queued_behind_a_running_sync_command(self):
        slow = self.w.request("sleep", b'{"seconds": 5}')
        # Both orders: queued with the slow one (read in the same read, before the
        # standby reader took over) and queued later (read by the standby reader).
        together = self.w.new_id()
        later = self.w.new_id()
        self.w.send(req_frame(together, "echo", b"never run"))
        self.w.send(P.encode(P.PING, 1))
        self.recv_kind(P.PONG, 1, PROMPT)  # the standby reader reads by now
        self.w.send(req_frame(later, "echo", b"never run either"))
        start = time.monotonic()
        self.w.send(P.encode(P.CANCEL, later) + P.encode(P.CANCEL, together))
        got = {}
        for _ in range(2):
            f = self.w.recv(PROMPT)
            got[f.request_id] = f
        self.assertLess(time.monotonic() - start, PROMPT)
        for rid in (together, later):
            self.assertEqual((got[rid].kind, got[rid].json()["kind"]), (P.ERROR, "cancelled"))
            self.assertIn("before it started", got[rid].json()["message"])
        self.w.send(P.encode(P.CANCEL, slow))
        self.assertEqual(self.w.replies([slow])[slow][-1].json()["kind"], "cancelled")

    def test_cancel_in_the_same_read_as_the_running_request(self):
        slow, queued = self.w.new_id(), self.w.new_id()
        self.w.send(req_frame(slow, "sleep", b'{"seconds": 5}') + req_frame(queued, "echo", b"x"))
        self.w.send(P.encode(P.CANCEL, queued))
        f, _ = self.recv_kind(P.ERROR, queued, PROMPT)
        self.assertEqual(f.json()["kind"], "cancelled")
        self.w.send(P.encode(P.CANCEL, slow))
        self.assertEqual(self.w.replies([slow])[slow][-1].json()["kind"], "cancelled")

    def test_async_commands_run_on_the_loop_while_a_sync_command_runs(self):
        a = self.w.request("async_sleep", b'{"seconds": 0.2}')
        b = self.w.request("async_sleep", b'{"seconds": 0.01}')
        slow = self.w.request("sleep", b'{"seconds": 5}')
        start = time.monotonic()
        got = self.w.replies([a, b], timeout=3)
        self.assertLess(time.monotonic() - start, 3, "the async replies came while the sync command ran")
        self.assertEqual(json_of(got[a][0]), {"slept": 0.2})
        self.assertEqual(json_of(got[b][0]), {"slept": 0.01})
        self.w.send(P.encode(P.CANCEL, slow))
        self.assertEqual(self.w.replies([slow])[slow][-1].json()["kind"], "cancelled")

    def test_pipelined_replies_share_writes(self):
        for _ in range(3):  # echo is then known to be fast
            self.w.call("echo", b"warm")
        ids = [self.w.new_id() for _ in range(16)]
        before = write_syscalls(self.w.pid)
        self.w.send(b"".join(req_frame(i, "echo", b"%d" % i) for i in ids))
        got = self.w.replies(ids)
        writes = write_syscalls(self.w.pid) - before
        self.assertEqual([payload_of(got[i][0])[1] for i in ids], [b"%d" % i for i in ids])
        # One read usually holds all 16 and one write answers them; a slow machine may
        # split them, never into one write per reply.
        self.assertLess(writes, len(ids) // 2, "%d writes for %d pipelined replies" % (writes, len(ids)))

    def test_one_write_per_request_when_requests_come_one_by_one(self):
        self.w.call("echo", b"warm")
        before = write_syscalls(self.w.pid)
        for i in range(20):
            self.assertEqual(payload_of(self.w.call("echo", b"%d" % i))[1], b"%d" % i)
        self.assertEqual(write_syscalls(self.w.pid) - before, 20)

    def test_frames_split_across_the_hand_over_of_reading(self):
        rid = self.w.new_id()
        frame = req_frame(rid, "echo", b"split" * 1000)
        slow = self.w.request("sleep", b'{"seconds": 0.5}')
        self.w.send(P.encode(P.PING, 7))
        self.recv_kind(P.PONG, 7, PROMPT)  # the standby reader has the input now
        self.w.send(frame[:10])  # it reads half a frame...
        self.assertEqual(json_of(self.w.replies([slow])[slow][0]), {"slept": 0.5})
        self.w.send(frame[10:3000])
        self.w.send(frame[3000:])  # ...and the rest, after the main thread went idle
        self.assertEqual(payload_of(self.w.replies([rid])[rid][0])[1], b"split" * 1000)
        # The main thread reads again: requests split in every way keep working.
        for cut in (1, 4, 15, 16, 17, 100):
            rid = self.w.new_id()
            frame = req_frame(rid, "echo", b"%d" % cut)
            self.w.send(frame[:cut])
            self.w.send(frame[cut:])
            self.assertEqual(payload_of(self.w.replies([rid])[rid][0])[1], b"%d" % cut)

    def test_shutdown_while_a_sync_command_runs_finishes_the_queue(self):
        slow = self.w.request("sleep", b'{"seconds": 0.5}')
        queued = self.w.request("echo", b"queued")
        self.w.send(P.encode(P.SHUTDOWN, 0))
        late = self.w.request("echo", b"late")
        self.w.send(P.encode(P.PING, 3))
        got = self.w.replies([slow, queued, late])
        self.assertEqual(json_of(got[slow][0]), {"slept": 0.5})
        self.assertEqual(payload_of(got[queued][0])[1], b"queued")
        self.assertEqual(got[late][0].json()["kind"], "bad_request")
        if P.PONG not in [f.kind for f in self.w.other]:
            # Read after the last reply (the worker fell far behind): it comes next.
            self.assertEqual(self.w.recv().kind, P.PONG)
        self.assertEqual(self.w.wait(), 0)

    def test_shutdown_waits_for_async_requests_and_keeps_answering_pings(self):
        rid = self.w.request("async_sleep", b'{"seconds": 1}')
        self.w.call("echo", b"the async request is on the loop")
        self.w.send(P.encode(P.SHUTDOWN, 0))
        self.w.send(P.encode(P.PING, 4))
        self.recv_kind(P.PONG, 4, PROMPT)
        self.assertEqual(json_of(self.w.replies([rid])[rid][0]), {"slept": 1})
        self.assertEqual(self.w.wait(), 0)


class GilHoldingCommandTest(unittest.TestCase):
    """A command that spins in Python code holds the GIL between bytecodes: the standby
    reader still gets it (after a switch interval) and answers."""

    def setUp(self):
        self.w = WorkerProcess("sample_adapter")
        self.addCleanup(self.w.kill)

    def test_sync_commands_run_on_the_main_thread(self):
        self.assertEqual(json_of(self.w.call("where"))["main"], True)
        slow = self.w.request("block", b'{"seconds": 0.3}')
        self.w.send(P.encode(P.PING, 1))
        self.assertEqual(self.w.recv(PROMPT).kind, P.PONG)
        rid = self.w.request("where")  # read by the standby reader, run by the main thread
        got = self.w.replies([slow, rid])
        self.assertEqual(json_of(got[rid][0])["main"], True)

    def test_ping_and_cancel_while_a_command_spins(self):
        rid = self.w.request("spin", b'{"seconds": 5}')
        for seq in (1, 2):
            start = time.monotonic()
            self.w.send(P.encode(P.PING, seq))
            f = self.w.recv(PROMPT)
            self.assertEqual((f.kind, f.request_id), (P.PONG, seq))
            self.assertLess(time.monotonic() - start, PROMPT)
        self.w.send(P.encode(P.CANCEL, rid))
        f = self.w.replies([rid])[rid][-1]
        self.assertEqual((f.kind, f.json()["kind"]), (P.ERROR, "cancelled"))


if __name__ == "__main__":
    unittest.main()
