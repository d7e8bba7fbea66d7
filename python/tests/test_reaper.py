"""The worker's reaper (pitboss_worker/reaper.py): when the worker dies, whatever is
left in its process group dies too; nothing else sets it off."""

import os
import signal
import subprocess
import sys
import time
import unittest

from harness import PYTHON_DIR, TIMEOUT

# Plays a worker: starts the reaper, forks a child that would outlive it, prints both
# pids, and exits when its stdin closes.
WORKER = r"""
import os, sys, time
from pitboss_worker import reaper
r = reaper.start()
child = os.fork()
if child == 0:
    time.sleep(300)
    os._exit(0)
sys.stdout.write("%s %d\n" % (r, child))
sys.stdout.flush()
sys.stdin.read()
os._exit(0)
"""


def alive(pid):
    """Exists and is not a zombie (an orphan's zombie may wait for a busy init)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def eventually(check, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


def settled(pid):
    """Whether the reaper ``pid`` has blocked its signal: its fd 0 is /dev/null, which
    it sets up right after blocking SIGUSR2. (``SigBlk`` in /proc cannot tell: the
    kernel unblocks the waited-for signals during ``sigwait``.)"""
    try:
        return os.readlink("/proc/%d/fd/0" % pid) == os.devnull
    except PermissionError:  # cannot tell here: go on as before
        return True
    except OSError:
        return False


@unittest.skipUnless(sys.platform.startswith("linux"), "the reaper is Linux only")
class ReaperTest(unittest.TestCase):
    def start(self, **kwargs):
        env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            **kwargs
        )
        self.addCleanup(self.cleanup, proc)
        reaper, child = proc.stdout.readline().split()
        self.pids = [int(child)] + ([int(reaper)] if reaper != b"None" else [])
        return proc, reaper, int(child)

    def cleanup(self, proc):
        for pid in self.pids + [proc.pid]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.stdin.close()
        proc.stdout.close()
        proc.wait()

    def test_the_group_dies_with_the_worker_and_a_stray_signal_does_nothing(self):
        proc, reaper, child = self.start(start_new_session=True)
        reaper = int(reaper)
        self.assertTrue(alive(reaper) and alive(child))
        # Only once the reaper blocks SIGUSR2 (its first step after the fork): before
        # that, the signal's default action would kill it, a race of this test only.
        self.assertTrue(eventually(lambda: settled(reaper)), "the reaper never set itself up")
        # A SIGUSR2 from someone else (a command signalling its group) is not the
        # worker's death: nothing is killed.
        os.kill(reaper, signal.SIGUSR2)
        time.sleep(0.5)
        self.assertTrue(alive(proc.pid) and alive(reaper) and alive(child))
        # The worker exits: its forked child and the reaper go with it.
        proc.stdin.close()
        proc.wait(timeout=TIMEOUT)
        self.assertTrue(eventually(lambda: not alive(child)), "the forked child outlived the worker")
        self.assertTrue(eventually(lambda: not alive(reaper)), "the reaper outlived the worker")

    def test_no_reaper_when_the_worker_does_not_lead_its_group(self):
        # Started by hand from a shell: killing the group could hit the shell.
        _, reaper, _ = self.start()
        self.assertEqual(reaper, b"None")


class ReaperUnderPid1Test(unittest.TestCase):
    def test_no_reaper_when_pitboss_is_pid_1(self):
        # pitboss as its container's init: when it dies the kernel kills the whole PID
        # namespace, and a reaper that outlived its worker would stay a zombie of
        # pitboss (which reaps only its workers). So there is none.
        from unittest import mock

        from pitboss_worker import reaper

        def no_fork():
            raise AssertionError("forked a reaper under PID 1")

        with mock.patch.object(os, "getppid", return_value=1), mock.patch.object(
            os, "getpgid", return_value=os.getpid()
        ), mock.patch.object(os, "fork", no_fork):
            self.assertIsNone(reaper.start())


if __name__ == "__main__":
    unittest.main()
