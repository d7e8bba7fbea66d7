"""No process that a worker started outlives the worker, or pitboss.

pitboss spawns each worker as the leader of its own process group, with a
parent-death signal (SIGKILL): the worker dies with pitboss, even after ``kill -9``.
But the kernel sends that signal to the worker alone. A command that forked
(``os.fork()``, ``subprocess.Popen``, ``multiprocessing``) would leave its children
running under PID 1.

So, before anything else runs, the worker forks one small *reaper*. The reaper holds
no descriptor (pitboss still sees the worker's pipes close when the worker dies),
ignores the signals of a graceful stop (pitboss signals the whole group), and asks
the kernel for a parent-death signal of its own. When the worker is gone, for any
reason (pitboss's death, a crash, a recycle), it SIGKILLs the worker's process group,
itself last. It waits in ``sigwait``: no wake-up until then.

Not needed, so not started, when pitboss is PID 1 (a container's entrypoint): the
kernel kills the whole PID namespace when its init dies.

Not covered: a descendant that leaves the group on purpose (``os.setsid()``,
``os.setpgid()``, ``start_new_session=True``), as a daemon does. Nothing short of a
cgroup can follow those.
"""

import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
# Not a signal pitboss sends to a worker's group: SIGTERM means "drain", not "die".
_DEATH_SIGNAL = signal.SIGUSR2


def start():
    """Forks the reaper. Returns its pid, or None where it cannot work (not Linux, or
    the worker does not lead its own group: killing that group could hit the shell
    that started it by hand) or is not needed (pitboss is PID 1, see below)."""
    if not sys.platform.startswith("linux"):
        return None
    # pitboss is the init of its PID namespace (a container's entrypoint): when it dies
    # the kernel kills every process of the namespace, so no reaper is needed. And one
    # would harm: a reaper that outlives its worker is reparented to PID 1, and pitboss
    # reaps only its workers, so each worker's exit would leave a zombie.
    if os.getppid() == 1:
        return None
    worker = os.getpid()
    if os.getpgid(0) != worker:
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError, ImportError):
        return None
    try:
        pid = os.fork()
    except OSError:
        return None
    if pid:
        return pid
    try:
        _reap(worker, prctl)
    finally:
        os._exit(0)


def _reap(worker, prctl):
    """The reaper's whole life, in the forked child."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {_DEATH_SIGNAL})
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(s, signal.SIG_IGN)
    _drop_descriptors()
    if prctl(_PR_SET_PDEATHSIG, int(_DEATH_SIGNAL), 0, 0, 0) == 0:
        # The worker may have died before prctl took effect. A SIGUSR2 that someone
        # else sent (a command signalling its group) is not the worker's death.
        while os.getppid() == worker:
            signal.sigwait({_DEATH_SIGNAL})
    else:  # no parent-death signal: poll for being reparented
        import time

        while os.getppid() == worker:
            time.sleep(0.5)
    os.killpg(worker, signal.SIGKILL)


def _drop_descriptors():
    """Points 0-2 at /dev/null and closes the rest, so that the reaper keeps no pipe
    of the worker's open."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        if fd != devnull:
            os.dup2(devnull, fd)
    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        fds = range(3, 1024)
    for fd in fds:
        if fd > 2:
            try:
                os.close(fd)
            except OSError:
                pass
