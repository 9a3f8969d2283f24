"""The Docker sandbox against a real engine: files, limits, isolation and cleanup, attacked for real. Needs a
Docker engine and the sandbox image (`rlstack sandbox setup`, as root); without them these tests FAIL.

Two sandboxes for the whole module (container start-ups are what costs here): `warm`, with a warm pool, for
runs under the default container limits; `cold`, without a pool, for runs with their own memory, process or
disk limits (each such run makes its own container), whose containers are counted after every test."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from rlstack.envs import Limits
from rlstack.envs.docker import DockerSandbox, sandbox_containers
from rlstack.envs.sandbox import RunResult
from rlstack.rewards.code_verify import CodeVerifier, parse_tests

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def engine() -> None:
    missing = DockerSandbox.unavailable()
    if missing:
        pytest.fail(
            f"the Docker sandbox cannot run on this host: {missing} (as root: `rlstack sandbox setup`)"
        )


@pytest.fixture(scope="module")
def warm(engine: None) -> Iterator[DockerSandbox]:
    sandbox = DockerSandbox(warm_pool=2)
    yield sandbox
    sandbox.close()
    assert sandbox_containers(instance=sandbox.instance) == [], "close() left containers behind"


@pytest.fixture(scope="module")
def cold(engine: None) -> Iterator[DockerSandbox]:
    sandbox = DockerSandbox(warm_pool=0)
    yield sandbox
    sandbox.close()


@pytest.fixture(autouse=True)
def no_leftovers(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "cold" in request.fixturenames:
        cold = request.getfixturevalue("cold")
        assert sandbox_containers(instance=cold.instance) == [], "a run's container was not removed"


def python(sandbox: DockerSandbox, code: str, limits: Limits | None = None, **kwargs: object) -> RunResult:
    return sandbox.run(["python3", "-c", code], limits=limits, **kwargs)  # type: ignore[arg-type]


def test_files_stdin_exit_code_and_environment(warm: DockerSandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLSTACK_TEST_SECRET", "hunter2")
    code = (
        "import json, os, sys\n"
        "print(json.dumps({'env': sorted(os.environ), 'cwd': os.getcwd(), 'uid': os.getuid(),\n"
        "  'data': open('data/in.txt').read(), 'bin': open('blob', 'rb').read().hex(),\n"
        "  'stdin': sys.stdin.read(),\n"
        "  'secret': any('hunter2' in v for v in os.environ.values())}))\n"
        "sys.exit(3)\n"
    )
    result = warm.run(
        ["python3", "main.py"],
        files={"main.py": code, "data/in.txt": "héllo", "blob": b"\x00\xff"},
        stdin="from stdin",
    )
    assert result.status == "ok" and result.exit_code == 3 and not result.succeeded, result
    out = json.loads(result.stdout)
    assert out["env"] == ["HOME", "LANG", "PATH"] and not out["secret"]  # nothing of the host's
    assert out["cwd"] == "/work" and out["uid"] == 65534
    assert out["data"] == "héllo" and out["bin"] == "00ff" and out["stdin"] == "from stdin"
    assert result.stderr == ""  # the wrapper's ready marker is not passed on


def test_infinite_loop_is_killed_at_the_wall_clock_limit(warm: DockerSandbox) -> None:
    start = time.monotonic()
    result = python(warm, "while True: pass", Limits(wall_seconds=1.0))
    assert result.status == "timeout" and result.exit_code is None, result
    assert result.detail == "wall-clock limit of 1 s"
    assert time.monotonic() - start < 3.0


def test_cpu_limit_stops_a_busy_process(warm: DockerSandbox) -> None:
    result = python(warm, "while True: pass", Limits(wall_seconds=20, cpu_seconds=1))
    assert result.status == "killed" and result.detail == "SIGXCPU" and result.exit_code is None, result


def test_memory_limit_holds_for_the_run_as_a_whole(cold: DockerSandbox) -> None:
    limits = Limits(memory_mb=64, wall_seconds=20)
    one = python(cold, "x = 'x' * (256 << 20)\nprint('allocated')", limits)  # 4x the limit, in one process
    assert one.status == "oom" and "allocated" not in one.stdout, one
    # 8 processes of 24 MiB each (3x the limit together): each alone would pass a per-process limit
    forked = (
        "import os, time\n"
        "pids = []\n"
        "for _ in range(8):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        x = 'x' * (24 << 20)\n"
        "        time.sleep(1.5)\n"
        "        os._exit(0)\n"
        "    pids.append(pid)\n"
        "ok = sum(os.waitpid(pid, 0)[1] == 0 for pid in pids)\n"
        "print(ok, 'of 8 finished')\n"
        "raise SystemExit(ok != 8)\n"
    )
    many = python(cold, forked, limits)
    assert many.status == "oom" and "8 of 8" not in many.stdout, many
    assert "memory limit of 64 MiB" in many.describe()


def test_process_limit_stops_a_fork_bomb(cold: DockerSandbox) -> None:
    count = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    while n < 1000:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print(n, e.errno)\n"
    )
    result = python(cold, count, Limits(max_processes=16))
    assert result.status == "ok" and result.exit_code == 0, result
    n, errno = map(int, result.stdout.split())
    assert 10 <= n < 16 and errno == 11  # EAGAIN: the pids cgroup; the sleepers die with the container
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    result = python(cold, bomb, Limits(wall_seconds=1.5, max_processes=16))
    assert result.status == "timeout" and time.monotonic() - start < 5.0, result


def test_output_is_capped_and_the_rest_drained(warm: DockerSandbox) -> None:
    code = "import sys\nsys.stderr.write('e' * 5000)\nsys.stdout.buffer.write(b'x' * 100_000_000)\n"
    result = python(warm, code, Limits(max_output_bytes=1000, wall_seconds=30))
    assert result.status == "ok" and result.exit_code == 0, result.describe()
    assert result.stdout.startswith("x" * 1000 + "\n[... output truncated: 100000000 bytes in all")
    assert result.stderr.startswith("e" * 1000 + "\n[... output truncated: 5000 bytes")
    assert result.truncated == ["stdout", "stderr"]


def test_no_network(warm: DockerSandbox) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    try:
        code = (
            "import os, socket\n"
            "print(sorted(os.listdir('/sys/class/net')))\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "    print('connected')\n"
            "except OSError as e:\n"
            "    print(type(e).__name__)\n"
        )
        result = python(warm, code)
    finally:
        server.close()
    assert result.succeeded, result
    assert result.stdout.splitlines() == ["['lo']", "ConnectionRefusedError"]  # its own loopback only


def test_read_only_root_writable_work_dir_and_disk_cap(cold: DockerSandbox) -> None:
    code = (
        "import os\n"
        "for path in ('/etc/x', '/usr/x', '/x', '/work/ok', '/tmp/ok'):\n"
        "    try:\n"
        "        open(path, 'w').write('x')\n"
        "        print(path, 'written')\n"
        "    except OSError as e:\n"
        "        print(path, e.strerror)\n"
        f"print('host checkout visible:', os.path.exists({os.getcwd()!r}))\n"
        "try:\n"
        "    with open('/work/big', 'wb') as f:\n"
        "        for _ in range(12):\n"
        "            f.write(b'x' * (1 << 20))\n"
        "            f.flush()\n"
        "    print('big written')\n"
        "except OSError as e:\n"
        "    print('big', e.strerror)\n"
    )
    result = python(cold, code, Limits(disk_mb=8, file_size_mb=64))
    assert result.succeeded, result
    lines = result.stdout.splitlines()
    assert all("written" not in line for line in lines[:3]), lines  # read-only file system
    assert lines[3:5] == ["/work/ok written", "/tmp/ok written"]
    assert lines[5] == "host checkout visible: False"
    assert lines[6] == "big No space left on device"


def test_warm_runs_share_nothing(warm: DockerSandbox) -> None:
    first = warm.run(["sh", "-c", "echo secret > /work/left; echo x > /tmp/left; echo done"])
    second = warm.run(["sh", "-c", "ls -A /work /tmp"])
    assert first.stdout == "done\n" and second.succeeded, (first, second)
    assert "left" not in second.stdout


def test_concurrent_runs_and_cold_vs_warm(warm: DockerSandbox, cold: DockerSandbox) -> None:
    results: list[RunResult] = []

    def one(i: int) -> None:
        results.append(python(warm, f"print({i} * {i})"))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.stdout for r in results) == ["0\n", "1\n", "4\n", "9\n"]
    time.sleep(1.0)  # the pool refills
    timings = {}
    for name, sandbox in (("warm", warm), ("cold", cold)):
        start = time.monotonic()
        assert python(sandbox, "pass").succeeded
        timings[name] = time.monotonic() - start
    print(f"python3 -c pass: warm {timings['warm']:.2f} s, cold {timings['cold']:.2f} s")


def test_the_code_reward_runs_in_it(warm: DockerSandbox) -> None:
    verifier = CodeVerifier(sandbox=warm, time_limit=2.0)
    tests = parse_tests(["assert add(1, 2) == 3", "assert add(2, 2) == 4"])
    good, bad = verifier.verify_many(
        [("def add(a, b):\n    return a + b\n", tests), ("def add(a, b): return a", tests)]
    )
    assert (good.score, bad.score) == (1.0, 0.0), (good, bad)


def test_chosen_by_name_and_by_config(engine: None) -> None:
    from rlstack.envs import get_sandbox
    from rlstack.envs.backends import resolve_backend
    from rlstack.envs.config import SandboxConfig

    sandbox = get_sandbox("docker", warm_pool=0)
    try:
        assert isinstance(sandbox, DockerSandbox) and sandbox.strict
    finally:
        sandbox.close()
    assert resolve_backend(SandboxConfig()) == "docker"  # auto: the strongest
