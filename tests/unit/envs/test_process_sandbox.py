"""The process sandbox, attacked for real: runaway loops, fork bombs, daemons, memory and disk hogs, floods
of output, network access, secrets in the environment. Every test also checks (conftest) that no sandboxed
process and no working directory is left behind."""

from __future__ import annotations

import doctest
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import rlstack.envs.sandbox as sandbox_module
from rlstack.envs import Limits, get_sandbox
from rlstack.envs.process import ProcessSandbox


def python(sandbox: ProcessSandbox, code: str, limits: Limits | None = None, **kwargs: object):
    return sandbox.run(["python3", "-c", code], limits=limits, **kwargs)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP server on the host's loopback; sandboxed code tries to reach it."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(5)
    yield server
    server.close()


def test_docstring_example() -> None:
    assert doctest.testmod(sandbox_module).failed == 0


def test_files_stdin_environment_and_exit_code(
    sandbox: ProcessSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RLSTACK_TEST_SECRET", "hunter2")
    code = (
        "import os, sys, json\n"
        "try:\n    import rlstack\n    ours = 'importable'\nexcept ImportError:\n    ours = 'absent'\n"
        "print(json.dumps({'env': sorted(os.environ), 'home': os.environ['HOME'] == os.getcwd(),\n"
        "  'data': open('data/in.txt').read(), 'bin': open('blob', 'rb').read().hex(),\n"
        "  'stdin': sys.stdin.read(),\n"
        "  'rlstack': ours, 'path': sys.path}))\n"
        "print('to stderr', file=sys.stderr)\n"
        "sys.exit(3)\n"
    )
    result = sandbox.run(
        ["python3", "main.py"],
        files={"main.py": code, "data/in.txt": "héllo", "blob": b"\x00\xff"},
        stdin="from stdin",
    )
    import json

    out = json.loads(result.stdout)
    assert result.status == "ok" and result.exit_code == 3 and not result.succeeded
    assert out["env"] == ["HOME", "LANG", "PATH", "TMPDIR"]  # nothing inherited: no secret
    assert out["home"] and out["data"] == "héllo" and out["bin"] == "00ff" and out["stdin"] == "from stdin"
    assert out["rlstack"] == "absent"  # an isolated stdlib-only interpreter: none of our packages
    assert not any("site-packages" in p for p in out["path"])
    assert result.stderr == "to stderr\n"


def test_infinite_loop_is_killed_at_the_wall_clock_limit(sandbox: ProcessSandbox) -> None:
    start = time.monotonic()
    result = python(sandbox, "while True: pass", Limits(wall_seconds=0.5))
    assert result.status == "timeout" and result.exit_code is None
    assert result.detail == "wall-clock limit of 0.5 s" and result.describe().startswith("timeout after")
    assert time.monotonic() - start < 3.0


def test_cpu_limit_stops_a_busy_process(sandbox: ProcessSandbox) -> None:
    result = python(sandbox, "while True: pass", Limits(wall_seconds=30, cpu_seconds=1))
    assert result.status == "killed" and result.detail == "SIGXCPU" and result.exit_code is None
    assert result.wall_seconds < 15


def test_fork_bomb_is_contained(sandbox: ProcessSandbox) -> None:
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    result = python(sandbox, bomb, Limits(wall_seconds=1.0, max_processes=16))
    assert result.status == "timeout"
    assert time.monotonic() - start < 4.0
    assert python(sandbox, "print('still fine')").stdout == "still fine\n"  # the machine is not exhausted


@pytest.mark.parametrize("namespaces", [None, ()], ids=["namespaces", "no-namespaces"])
def test_daemonised_grandchildren_die_with_the_run(namespaces: tuple[str, ...] | None) -> None:
    marker = f"rlstack-daemon-{uuid.uuid4().hex}"
    code = (
        "import os, subprocess\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"  # a new session and process group: out of reach of a killpg
        f"    subprocess.Popen(['python3', '-I', '-S', '-c', 'import time; time.sleep(60)', '{marker}'],\n"
        "                     start_new_session=True)\n"
        "    os._exit(0)\n"
        "os.wait()\n"
        "print('parent done')\n"
    )
    sandbox = ProcessSandbox(namespaces=namespaces)
    result = python(sandbox, code)
    assert result.stdout == "parent done\n", result.stderr
    survivors = [p for p in os.listdir("/proc") if p.isdigit() and marker.encode() in _cmdline(p)]
    assert survivors == []


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_memory_hog_is_stopped(sandbox: ProcessSandbox) -> None:
    result = python(sandbox, "x = bytearray(1 << 30)\nprint('allocated')", Limits(memory_mb=256))
    assert result.exit_code == 1 and "MemoryError" in result.stderr and "allocated" not in result.stdout


def test_huge_output_is_truncated_with_a_marker(sandbox: ProcessSandbox) -> None:
    code = "import sys\nfor _ in range(20000):\n    sys.stdout.write('y' * 499 + '\\n')\n"
    code += "print('E', file=sys.stderr)"
    result = python(sandbox, code, Limits(max_output_bytes=1000))
    assert result.exit_code == 0 and result.truncated == ["stdout"]
    kept, marker = result.stdout[:1000], result.stdout[1000:]
    assert set(kept) == {"y", "\n"} and "10000000 bytes in all, the first 1000 kept" in marker
    assert result.stderr == "E\n"


def test_big_file_is_stopped_by_the_file_size_limit(sandbox: ProcessSandbox) -> None:
    code = (
        "import os\n"
        "try:\n    open('big', 'wb').write(b'x' * (40 << 20))\n"
        "except OSError as e:\n    print(type(e).__name__, e.strerror, os.path.getsize('big'))\n"
    )
    result = python(sandbox, code, Limits(file_size_mb=4))
    assert result.stdout == f"OSError File too large {4 << 20}\n"


def test_network_is_cut_off_when_namespaces_work(
    sandbox: ProcessSandbox, listener: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    port = listener.getsockname()[1]
    code = (
        "import socket\n"
        f"try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=3)\n    print('connected')\n"
        "except OSError as e:\n    print('refused', e.errno)\n"
    )
    if sandbox.isolation.network_isolated:
        assert python(sandbox, code).stdout.startswith("refused")
        assert python(sandbox, code, Limits(network=True)).stdout == "connected\n"  # the opt-in works
    # Without namespaces (here by request; elsewhere when unshare fails) the network is reachable, and the
    # probe says so in a warning.
    with caplog.at_level(logging.WARNING, logger="rlstack.envs.process"):
        open_sandbox = ProcessSandbox(namespaces=("mount",))
        assert python(open_sandbox, code).stdout == "connected\n"
    assert "running without network/pid namespaces (not requested: pid+net)" in caplog.text


def test_private_tmp_and_no_files_left_behind(sandbox: ProcessSandbox) -> None:
    name = f"rlstack-test-{uuid.uuid4().hex}"
    code = (
        "import os\n"
        f"open('/tmp/{name}', 'w').write('x'); open('/dev/shm/{name}', 'w').write('x')\n"
        "os.mkdir('locked'); os.chmod('locked', 0)\n"  # the clean-up must cope with this
        "print(os.getcwd())\n"
    )
    for box in (sandbox, ProcessSandbox(namespaces=("pid", "net"))):  # private /tmp, then the shared one
        result = python(box, code)
        assert result.exit_code == 0, result.stderr
        assert not Path(result.stdout.strip()).exists()
        if box.isolation.own_uid or "mount" in box.isolation.namespaces:
            assert not Path("/tmp", name).exists() and not Path("/dev/shm", name).exists()
        else:  # same uid as ours and a shared /tmp: the documented gap; tidy up
            assert Path("/tmp", name).exists()
            Path("/tmp", name).unlink()
            Path("/dev/shm", name).unlink()


def test_sandboxed_user_is_unprivileged(sandbox: ProcessSandbox) -> None:
    code = (
        "import os\n"
        "for path in ('/etc/rlstack-sandbox-probe', '/root/probe', '/usr/bin/probe'):\n"
        "    try:\n        open(path, 'w').close()\n        print('wrote', path)\n"
        "    except OSError:\n        pass\n"
        f"try:\n    os.kill({os.getpid()}, 0)\n    print('can signal the caller')\n"
        "except OSError:\n    pass\n"
        "print(os.getuid() != 0, len([p for p in os.listdir('/proc') if p.isdigit()]))\n"
    )
    result = python(sandbox, code)
    iso = sandbox.isolation
    lines = result.stdout.splitlines()
    if iso.own_uid:  # we are root: the sandbox is not
        assert lines[0] == "True " + lines[0].split()[1] and not any(
            line.startswith("wrote") for line in lines
        )
    if "pid" in iso.namespaces:
        assert "can signal the caller" not in result.stdout
    if "mount" in iso.namespaces:  # its own /proc: only its own processes (itself, pid 1 of its namespace)
        assert int(lines[-1].split()[1]) <= 3


def test_bad_arguments_are_named() -> None:
    sandbox = get_sandbox("process")
    with pytest.raises(ValueError, match="command must be a non-empty list of strings"):
        sandbox.run("python3 -c pass")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"sandbox file '\.\./escape'"):
        sandbox.run(["true"], files={"../escape": "x"})
    with pytest.raises(ValueError, match=r"Limits.memory_mb must be a positive number, got 0"):
        Limits(memory_mb=0)
    with pytest.raises(ValueError, match=r"unknown sandbox backend 'podman'; available: .*docker.*process"):
        get_sandbox("podman")
    with pytest.raises(ValueError, match=r"namespaces must be a subset"):
        ProcessSandbox(namespaces=("ipc",))
    result = sandbox.run(["no-such-command-rlstack"])
    assert result.exit_code == 127 and "cannot run no-such-command-rlstack" in result.stderr
