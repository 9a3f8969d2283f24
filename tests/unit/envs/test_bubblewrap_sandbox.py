"""The bubblewrap sandbox, attacked for real (real bwrap, real cgroups): secrets, host files, network, memory
hogs alone and in packs, fork bombs, daemons, disk and output floods, concurrent runs. After every test no
run cgroup and no sandboxed process may be left. No skips: a host without bwrap or writable cgroups fails
here, saying what to install."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rlstack.envs import Limits, RunResult
from rlstack.envs.bubblewrap import BubblewrapSandbox, sandbox_processes
from rlstack.envs.cgroups import leftover_cgroups

pytestmark = pytest.mark.bubblewrap


@pytest.fixture(scope="module")
def sandbox() -> BubblewrapSandbox:
    missing = BubblewrapSandbox.unavailable()
    if missing:
        pytest.fail(f"the bubblewrap sandbox cannot run on this host: {missing}", pytrace=False)
    return BubblewrapSandbox()


@pytest.fixture(autouse=True)
def no_leftover_cgroups() -> Iterator[None]:
    yield
    assert leftover_cgroups() == [], "a run's cgroup was not removed"
    assert sandbox_processes() == [], "a bubblewrap run left processes behind"


def py(sandbox: BubblewrapSandbox, code: str, limits: Limits | None = None, **kwargs: object) -> RunResult:
    return sandbox.run(["python3", "-c", code], limits=limits, **kwargs)  # type: ignore[arg-type]


def test_files_stdin_exit_code_and_no_environment_leak(
    sandbox: BubblewrapSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RLSTACK_TEST_SECRET", "hunter2")
    code = (
        "import os, sys, json\n"
        "try:\n    import rlstack\n    ours = 'importable'\nexcept ImportError:\n    ours = 'absent'\n"
        "print(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd(), 'uid': os.getuid(),\n"
        "  'data': open('data/in.txt').read(), 'bin': open('blob', 'rb').read().hex(),\n"
        "  'stdin': sys.stdin.read(), 'rlstack': ours, 'path': sys.path, 'hostname': os.uname().nodename}))\n"
        "open('new.txt', 'w').write('writable')\n"
        "print('to stderr', file=sys.stderr)\n"
        "sys.exit(3)\n"
    )
    result = sandbox.run(
        ["python3", "main.py"],
        files={"main.py": code, "data/in.txt": "héllo", "blob": b"\x00\xff"},
        stdin="from stdin",
    )
    assert (result.status, result.exit_code, result.stderr) == ("ok", 3, "to stderr\n"), result
    seen = json.loads(result.stdout)
    assert "RLSTACK_TEST_SECRET" not in seen["env"] and "hunter2" not in result.stdout
    assert set(seen["env"]) <= {"PATH", "HOME", "TMPDIR", "LANG", "USER", "LOGNAME", "PWD"}
    assert (seen["cwd"], seen["uid"], seen["hostname"]) == ("/work", 1000, "sandbox")
    assert (seen["data"], seen["bin"], seen["stdin"], seen["rlstack"]) == (
        "héllo",
        "00ff",
        "from stdin",
        "absent",
    )
    assert not any("site-packages" in p or "/work/main" in p for p in seen["path"])


def test_host_files_are_out_of_sight(sandbox: BubblewrapSandbox, tmp_path: Path) -> None:
    secret, name = uuid.uuid4().hex, uuid.uuid4().hex  # the content must not leak; the names are in argv
    planted = [tmp_path / "secret.txt", Path("/root") / f".rlstack-test-{name}", Path("/tmp") / f"s-{name}"]
    for path in planted:
        path.write_text(secret)
    try:
        code = (
            "import os, sys\n"
            "paths = sys.argv[1:] + ['/etc/shadow', '/etc/hostname']\n"
            "for p in paths:\n"
            "    try:\n        print(p, open(p).read()[:40])\n"
            "    except OSError as e:\n        print(p, type(e).__name__)\n"
            "print('dirs', sorted(os.listdir('/')), sorted(os.listdir('/tmp')), sorted(os.listdir('/etc')))\n"
            "print('procs', sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
        )
        result = sandbox.run(["python3", "-c", code, *map(str, planted), __file__])
    finally:
        for path in planted:
            path.unlink()
    assert result.succeeded, result
    assert secret not in result.stdout
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    for where in [*map(str, planted), __file__, "/etc/shadow", "/etc/hostname"]:  # __file__: this checkout
        assert lines[where] == "FileNotFoundError", (where, lines[where])
    assert lines["dirs"].startswith("['bin', 'dev', 'etc', 'lib"), lines["dirs"]
    assert "'home'" not in lines["dirs"] and "'root'" not in lines["dirs"]
    assert "[] ['group', 'ld.so.cache', 'passwd']" in lines["dirs"]
    assert lines["procs"] == "[1, 2]"  # the init shell and the command: no host process in sight


def test_root_is_read_only_and_work_dir_tmp_and_shm_are_capped(sandbox: BubblewrapSandbox) -> None:
    code = (
        "import os\n"
        "for p in ['/etc/x', '/usr/x', '/x', '/dev/x', '/proc/x']:\n"
        "    try:\n        open(p, 'w').write('x'); print(p, 'written')\n"
        "    except OSError as e:\n        print(p, e.strerror)\n"
        "for d in ['/work', '/tmp', '/dev/shm', '/var/tmp']:\n"
        "    try:\n"
        "        with open(d + '/big', 'wb') as f:\n"
        "            for _ in range(32):\n                f.write(b'x' * (1 << 20))\n"
        "        print(d, 'unbounded')\n"
        "    except OSError as e:\n        print(d, e.strerror, os.path.getsize(d + '/big') >> 20)\n"
        "    os.unlink(d + '/big')\n"
    )
    result = py(sandbox, code, Limits(disk_mb=8, tmp_mb=4, file_size_mb=64, memory_mb=256))
    assert result.succeeded, result
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    for path in ["/etc/x", "/usr/x", "/x", "/dev/x", "/proc/x"]:
        assert "written" not in lines[path], result.stdout
    assert lines["/work"].startswith("No space left on device") and int(lines["/work"].split()[-1]) <= 8
    for tmp in ["/tmp", "/dev/shm", "/var/tmp"]:
        assert lines[tmp].startswith("No space left on device") and int(lines[tmp].split()[-1]) <= 4


def test_wall_clock_cpu_and_signals(sandbox: BubblewrapSandbox) -> None:
    start = time.monotonic()
    result = py(
        sandbox,
        "import time\nprint('started', flush=True)\nwhile True: time.sleep(1)",
        Limits(wall_seconds=1),
    )
    assert result.status == "timeout" and result.stdout == "started\n", result
    assert 1.0 <= result.wall_seconds < 3.5 and time.monotonic() - start < 5
    assert result.describe() == f"timeout after {result.wall_seconds:.1f} s"
    result = py(sandbox, "while True: pass", Limits(wall_seconds=10, cpu_seconds=1))
    assert (result.status, result.detail) == ("killed", "SIGXCPU"), result
    result = py(sandbox, "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)")
    assert (result.status, result.detail, result.exit_code) == ("killed", "SIGTERM", None), result


def test_memory_is_capped_for_the_run_as_a_whole(sandbox: BubblewrapSandbox) -> None:
    limits = Limits(memory_mb=96, wall_seconds=20)
    result = py(sandbox, "x = b'x' * (400 << 20)\nprint('survived')", limits)
    assert result.status == "oom" and "survived" not in result.stdout, result
    assert "96 MiB" in result.detail and result.describe().startswith("out of memory")
    # Eight children of 24 MiB each: each is under the limit, together (192 MiB) twice over it.
    pack = (
        "import os, time\n"
        "kids = []\n"
        "for _ in range(8):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        x = b'x' * (24 << 20)\n"
        "        time.sleep(1.5)\n"
        "        os._exit(0)\n"
        "    kids.append(pid)\n"
        "failed = sum(os.waitpid(pid, 0)[1] != 0 for pid in kids)\n"
        "print('failed', failed)\n"
        "raise SystemExit(1 if failed else 0)\n"
    )
    result = py(sandbox, pack, limits)
    assert result.status in ("oom", "killed") or (result.status == "ok" and result.exit_code != 0), result
    assert result.status == "oom", result  # the kernel's OOM killer, within the run's cgroup
    # The host is fine, and the limit is per run: a run using most of it right after works.
    assert py(sandbox, "x = b'x' * (60 << 20)\nprint(len(x) >> 20)", limits).stdout == "60\n"


def test_fork_bomb_stops_at_the_process_cap(sandbox: BubblewrapSandbox) -> None:
    code = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    while True:\n"
        "        if os.fork() == 0:\n            time.sleep(60)\n            os._exit(0)\n"
        "        n += 1\n"
        "except OSError as e:\n    print(n, e.strerror)\n"
    )
    result = py(sandbox, code, Limits(max_processes=12))
    assert result.succeeded and result.stdout == "11 Resource temporarily unavailable\n", result
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = py(sandbox, bomb, Limits(max_processes=16, wall_seconds=1.5))
    assert result.status == "timeout", result


def test_daemon_does_not_outlive_the_run(sandbox: BubblewrapSandbox) -> None:
    marker = f"rlstack-daemon-{uuid.uuid4().hex}"
    code = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        for fd in (0, 1, 2):\n            os.close(fd)\n"
        "        sleep = 'import time; time.sleep(60)'\n"
        "        os.execv(sys.executable, [sys.executable, '-c', sleep, sys.argv[1]])\n"
        "    os._exit(0)\n"
        "time.sleep(0.3)\n"
        "print('parent done')\n"
    )
    result = sandbox.run(["python3", "-c", code, marker])
    assert result.succeeded and result.stdout == "parent done\n", result
    left = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                left.append(entry)
        except OSError:
            continue
    assert left == [], "the daemon outlived its run"


def test_no_network(sandbox: BubblewrapSandbox) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    try:
        port = server.getsockname()[1]
        code = (
            "import socket, sys\n"
            "print(sorted(name for _, name in socket.if_nameindex()))\n"
            "try:\n    socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=2)\n"
            "    print('connected')\n"
            "except OSError as e:\n    print(type(e).__name__)\n"
        )
        result = sandbox.run(["python3", "-c", code, str(port)])
    finally:
        server.close()
    assert result.succeeded and result.stdout.splitlines() == ["['lo']", "ConnectionRefusedError"], result


def test_huge_output_is_capped(sandbox: BubblewrapSandbox) -> None:
    code = (
        "import sys\nfor _ in range(100):\n    sys.stdout.buffer.write(b'y' * (1 << 20))\n"
        "print('err', file=sys.stderr)"
    )
    result = py(sandbox, code, Limits(max_output_bytes=1000, wall_seconds=30))
    assert result.succeeded and result.truncated == ["stdout"], result
    assert result.stdout.startswith("y" * 1000) and f"{100 << 20} bytes in all" in result.stdout
    assert len(result.stdout) < 1200 and result.stderr == "err\n"


def test_missing_command_and_bad_arguments(sandbox: BubblewrapSandbox) -> None:
    result = sandbox.run(["no-such-program-here"])
    assert (result.status, result.exit_code) == ("ok", 127) and "no-such-program-here" in result.stderr, (
        result
    )
    with pytest.raises(ValueError, match="relative paths"):
        sandbox.run(["true"], files={"../escape": "x"})
    with pytest.raises(ValueError, match="non-empty list"):
        sandbox.run("python3 -c pass")  # type: ignore[arg-type]


def test_concurrent_runs(sandbox: BubblewrapSandbox) -> None:
    def one(i: int) -> RunResult:
        return sandbox.run(
            ["python3", "main.py"], files={"main.py": "print(int(input()) * 2)"}, stdin=f"{i}\n"
        )

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(12)))
    assert [(r.status, r.stdout) for r in results] == [("ok", f"{2 * i}\n") for i in range(12)]


def test_unavailable_and_registry() -> None:
    from rlstack.envs import get_sandbox

    assert BubblewrapSandbox.unavailable() is None
    assert BubblewrapSandbox.strict and BubblewrapSandbox.name == "bubblewrap"
    assert isinstance(get_sandbox("bubblewrap"), BubblewrapSandbox)
