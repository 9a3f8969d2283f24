"""The process sandbox's launcher: sets up one run, then execs the command. Standard library only (it runs
under the sandbox's interpreter with -I -S), Linux only, Python 3.8+.

    python3 -I -S -c <this source> CONFIG WORKDIR COMMAND...

CONFIG is `key=int,...` (see `process.py`); no json, contextlib or signal module: each import costs
milliseconds on every run (`signal` pulls in `enum`), so the C modules `_signal` and `ctypes` do.

Process tree: the launcher K (our child, in its own session) -> [with a pid namespace: A, the namespace's
init] -> B, which sets limits, drops to the sandbox uid and execs the command. When B ends, whatever it
left behind is killed: A's exit makes the kernel kill every process in the namespace; without one, K is
a child subreaper and kills its descendants itself. SIGTERM to K (our wall-clock timeout) does the same at
once. K exits like B did (same exit code, or killed by the same signal). A setup failure is written to
the error pipe (CONFIG["error_fd"]) and K exits 125.
"""

# ruff: noqa: SIM105  (try/except/pass: contextlib would be one more import on every run)
import _signal
import ctypes
import os
import resource
import sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 1, 4, 36
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 0x4000, 1 << 18
SIGKILL, SIGTERM, SIGSTOP = _signal.SIGKILL, _signal.SIGTERM, _signal.SIGSTOP
SIG_DFL, SIG_SETMASK, SIG_BLOCK = _signal.SIG_DFL, _signal.SIG_SETMASK, _signal.SIG_BLOCK
SETUP_FAILED = 125

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def fail(config, what):
    """Report a setup failure on the error pipe (not the command's stderr) and exit."""
    os.write(config["error_fd"], what.encode()[:1000])
    os._exit(SETUP_FAILED)


def prctl(option, value):
    return libc.prctl(option, value, 0, 0, 0)


def check(config, ok, what):
    if not ok:
        fail(config, f"{what}: {os.strerror(ctypes.get_errno())}")


def mount(config, source, target, fstype, flags, data=None):
    ok = libc.mount(
        source and source.encode(), target.encode(), fstype and fstype.encode(), flags, data and data.encode()
    )
    check(config, ok == 0, f"mount {target}")


def private_mounts(config):
    """In the new mount namespace: fresh tmpfs on /tmp, /var/tmp and /dev/shm (the host's, with its
    sockets and other users' files, disappear), the working directory bound back in, our own /proc."""
    workdir = config["workdir"]
    mount(config, None, "/", None, MS_REC | MS_PRIVATE)
    keep = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)  # before a tmpfs may cover it
    options = f"mode=1777,size={config['tmp_mb']}m"
    for path in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(path) and not os.path.islink(path):
            mount(config, "tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, options)
    os.makedirs(workdir, exist_ok=True)
    mount(config, f"/proc/self/fd/{keep}", workdir, None, MS_BIND)
    os.close(keep)
    os.chdir(workdir)
    if config["pid_ns"]:  # best effort: without it /proc still lists the host's processes
        libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)


def count_tasks(uid):
    """Processes and threads of `uid` now: RLIMIT_NPROC counts them all, so a cap must sit above this."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if int(fields.get("Uid", "-1 0").split()[0]) == uid:
            total += int(fields.get("Threads", "1"))
    return total


def limit(resource_id, soft, hard):
    """setrlimit, never above the hard limit we were given (only root may raise one)."""
    current = resource.getrlimit(resource_id)[1]
    if current != resource.RLIM_INFINITY:
        soft, hard = min(soft, current), min(hard, current)
    resource.setrlimit(resource_id, (soft, hard))


def spawn(config, command):
    """Fork B: limits, privileges, exec. Returns B's pid."""
    pid = os.fork()
    if pid:
        return pid
    try:
        os.setpgid(0, 0)
        uid = config["uid"]
        nproc = config["nproc"]
        if uid is None and not config["user_ns"]:  # our own uid: the cap counts every task we already have
            nproc += count_tasks(os.getuid())
        for name, soft, hard in (
            ("AS", config["as"], config["as"]),
            ("FSIZE", config["fsize"], config["fsize"]),
            ("NOFILE", config["nofile"], config["nofile"]),
            ("CPU", config["cpu"], config["cpu"] + 1),
            ("NPROC", nproc, nproc),
        ):
            limit(getattr(resource, "RLIMIT_" + name), soft, hard)
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        prctl(PR_SET_PDEATHSIG, SIGKILL)  # after setuid, which clears it
        _signal.signal(SIGTERM, SIG_DFL)
        _signal.pthread_sigmask(SIG_SETMASK, [])
        os.umask(0o022)
    except (OSError, ValueError) as e:
        fail(config, f"setting up the sandboxed process: {e}")
    try:
        os.execvp(command[0], command)
    except OSError as e:
        os.write(2, (f"sandbox: cannot run {command[0]}: {e.strerror}\n").encode())
        os._exit(127 if isinstance(e, FileNotFoundError) else 126)


def wait_for(target):
    """Reap children (orphans too: we are an init or a subreaper) until `target` has ended; its status."""
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == target:
            return status


def children():
    me = os.getpid()
    try:
        with open(f"/proc/self/task/{me}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:  # kernels without CONFIG_PROC_CHILDREN
        found = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
        return found


def sweep():
    """Kill every descendant: as a subreaper, orphans are re-parented to us, so repeat until none is left."""
    while True:
        kids = children()
        if not kids:
            return
        for pid in kids:
            try:
                os.kill(pid, SIGKILL)
            except ProcessLookupError:
                pass
        for pid in kids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def kill_group(pid):
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, SIGKILL)
        except ProcessLookupError:
            pass


def exit_like(status):
    """Exit the way a child with wait status `status` did."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (SIGKILL, SIGSTOP):
            _signal.signal(sig, SIG_DFL)
        _signal.pthread_sigmask(SIG_SETMASK, [])
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else SETUP_FAILED)


def unshare(config):
    uid, gid = os.getuid(), os.getgid()
    flags = config["unshare"]
    if flags:
        check(config, libc.unshare(flags) == 0, "unshare")
    if config["user_ns"]:  # map our ids to themselves (an unmapped owner cannot create files)
        for name, text in (
            ("uid_map", f"{uid} {uid} 1"),
            ("setgroups", "deny"),
            ("gid_map", f"{gid} {gid} 1"),
        ):
            with open("/proc/self/" + name, "w") as f:
                f.write(text)


def init(config, command, status_fd):
    """A: pid 1 of the new pid namespace. Runs B; its exit takes the whole namespace down."""
    prctl(PR_SET_PDEATHSIG, SIGKILL)
    if config["mount_ns"]:
        try:
            private_mounts(config)
        except OSError as e:
            fail(config, f"mount set-up: {e}")
    status = wait_for(spawn(config, command))
    os.write(status_fd, str(status).encode())
    os._exit(0)


def main():
    config = {key: int(value) for key, value in (item.split("=") for item in sys.argv[1].split(","))}
    config["workdir"], command = sys.argv[2], sys.argv[3:]
    config["uid"] = None if config["uid"] < 0 else config["uid"]
    _signal.pthread_sigmask(SIG_BLOCK, [SIGTERM])  # until the handler is in place
    os.set_inheritable(config["error_fd"], False)  # closed when B execs
    prctl(PR_SET_PDEATHSIG, SIGKILL)
    if os.getppid() != config["parent"]:
        os._exit(SETUP_FAILED)  # our parent is already gone
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        unshare(config)
    except OSError as e:
        fail(config, f"namespace set-up: {e}")
    prctl(PR_SET_DUMPABLE, 0)  # the sandboxed user may not open our /proc/PID/fd (the output pipes)
    if config["pid_ns"]:
        status_r, status_w = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(status_r)
            _signal.pthread_sigmask(SIG_SETMASK, [])
            init(config, command, status_w)
        os.close(status_w)
    else:
        if config["mount_ns"]:
            try:
                private_mounts(config)
            except OSError as e:
                fail(config, f"mount set-up: {e}")
        prctl(PR_SET_CHILD_SUBREAPER, 1)
        child = spawn(config, command)
    _signal.signal(SIGTERM, lambda signum, frame: kill_group(child))
    _signal.pthread_sigmask(SIG_SETMASK, [])
    status = wait_for(child)
    if config["pid_ns"]:
        reported = os.read(status_r, 64)
        status = int(reported) if reported else status  # A killed (timeout): report that
    else:
        sweep()
    exit_like(status)


if __name__ == "__main__":
    main()
