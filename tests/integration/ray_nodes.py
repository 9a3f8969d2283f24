"""A Ray cluster of several nodes on this one machine, each node its own `ray start --block` process group.

Torn down by signalling those process groups only, never with `ray stop` (which kills every Ray process on
the machine, other tests' included). Each node gets its own temp dir (its own session files, sockets and
logs) and its own ports: two raylets on one host would otherwise collide on the dashboard agent's fixed
port (52365) and on the head's client-server port (10001).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


@dataclass
class RayNode:
    name: str
    proc: subprocess.Popen[bytes]
    temp_dir: Path
    log_path: Path
    log: IO[bytes]
    resources: dict[str, float]

    def log_tail(self, chars: int = 3000) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]


class LocalRayCluster:
    """`start_head()`, then `add_node()` per worker node; `nodes()` lists the alive ones; `shutdown()` stops
    every process the nodes started (process groups, their descendants, anything naming the temp dir)."""

    def __init__(self, env: dict[str, str] | None = None, cwd: str | Path | None = None) -> None:
        # Short: Ray's socket paths (temp dir/session_<date>_<pid>/sockets/plasma_store.N) stay < 108 chars.
        self.base = Path(tempfile.mkdtemp(prefix="rl2n-", dir="/tmp"))
        # Token authentication (`ray start`'s default in Ray 2.60) with a token of this cluster's own, given
        # to every process (nodes, drivers) in the environment: nothing read from or written to ~/.ray.
        self.env = dict(os.environ if env is None else env) | {
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
        }
        for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
            self.env.pop(name, None)
        self.cwd = str(cwd) if cwd is not None else None
        self.nodes_started: list[RayNode] = []
        self.address: str | None = None

    def __enter__(self) -> LocalRayCluster:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        try:
            self.shutdown()
        except RuntimeError as e:
            if exc is None:
                raise
            exc.add_note(f"and the teardown failed: {e}")  # keep the first failure the one reported

    def _start(self, name: str, args: list[str], resources: dict[str, float], num_cpus: int) -> RayNode:
        temp_dir = self.base / name
        temp_dir.mkdir()
        log_path = self.base / f"{name}.log"
        log = log_path.open("wb")
        command = [
            RAY, "start", *args, "--block", "--disable-usage-stats",
            "--num-cpus", str(num_cpus), "--num-gpus", "0",
            "--resources", json.dumps(resources),
            "--object-store-memory", str(256 * 1024**2),
            "--temp-dir", str(temp_dir),
            "--node-manager-port", str(free_port()),
            "--object-manager-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()),
            "--metrics-export-port", str(free_port()),
            "--min-worker-port", "0", "--max-worker-port", "0",  # workers: ports the OS picks
        ]  # fmt: skip
        proc = subprocess.Popen(
            command, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        node = RayNode(name, proc, temp_dir, log_path, log, resources)
        self.nodes_started.append(node)
        return node

    def start_head(self, resources: dict[str, float], num_cpus: int = 2, timeout: float = 60) -> str:
        args = [
            "--head", "--port", str(free_port()), "--include-dashboard", "false",
            "--ray-client-server-port", str(free_port()), "--dashboard-port", str(free_port()),
        ]  # fmt: skip
        head = self._start("head", args, resources, num_cpus)
        # `ray start` writes the cluster's address into its temp dir once the head is up.
        address_file = head.temp_dir / "ray_current_cluster"
        deadline = time.monotonic() + timeout
        while not (address_file.exists() and ":" in address_file.read_text()):
            if head.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the head node did not start:\n{head.log_tail()}")
            time.sleep(0.5)
        self.address = address_file.read_text().strip()  # host:port, the host's address (Ray avoids loopback)
        return self.address

    def add_node(self, resources: dict[str, float], num_cpus: int = 2) -> RayNode:
        assert self.address is not None, "start_head() first"
        name = f"worker{len(self.nodes_started)}"
        return self._start(name, ["--address", self.address], resources, num_cpus)

    def nodes(self, expect: int | None = None, timeout: float = 90) -> list[dict[str, Any]]:
        """The alive nodes as `ray.nodes()` reports them (from a separate driver process: this one stays
        Ray-free), waiting until there are `expect` of them."""
        script = (
            "import json, sys, time, ray\n"
            f"ray.init(address={self.address!r}, log_to_driver=False)\n"
            f"deadline = time.monotonic() + {timeout}\n"
            "while True:\n"
            "    alive = [n for n in ray.nodes() if n['Alive']]\n"
            f"    if {expect!r} is None or len(alive) >= {expect!r} or time.monotonic() > deadline:\n"
            "        break\n"
            "    time.sleep(0.5)\n"
            "print('NODES=' + json.dumps(alive, default=str))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", script],
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=timeout + 60,
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("NODES=")]
        if out.returncode != 0 or not lines:
            raise RuntimeError(f"listing the nodes failed:\n{out.stderr[-3000:]}\n{self.logs()}")
        alive: list[dict[str, Any]] = json.loads(lines[-1].removeprefix("NODES="))
        if expect is not None and len(alive) < expect:
            raise RuntimeError(f"{len(alive)} of {expect} nodes alive after {timeout} s:\n{self.logs()}")
        return alive

    def node_id_with(self, resource: str, nodes: list[dict[str, Any]]) -> str:
        """The id (hex) of the one node that has this custom resource."""
        ids = [n["NodeID"] for n in nodes if n["Resources"].get(resource, 0) > 0]
        assert len(ids) == 1, f"{len(ids)} nodes have resource {resource!r}: {nodes}"
        return str(ids[0])

    def logs(self) -> str:
        return "\n".join(f"--- {n.name} ---\n{n.log_tail()}" for n in self.nodes_started)

    def processes(self) -> list[psutil.Process]:
        """Every live process the nodes started: the `ray start` processes, their descendants, and any
        process whose command line names the cluster's temp dir (a worker that lost its parent)."""
        found: dict[int, psutil.Process] = {}
        for node in self.nodes_started:
            try:
                root = psutil.Process(node.proc.pid)
                for p in [root, *root.children(recursive=True)]:
                    found[p.pid] = p
            except psutil.NoSuchProcess:
                pass
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(str(self.base) in arg for arg in p.info["cmdline"] or []):
                    found[p.pid] = p
            except psutil.Error:
                pass
        found.pop(os.getpid(), None)
        return [p for p in found.values() if _alive(p)]

    def shutdown(self, grace: float = 5) -> None:
        """SIGTERM each node's process group (worker nodes first), SIGKILL the groups and every process of
        theirs still alive after `grace` seconds (a head's GCS can take 25 s to stop on SIGTERM); then
        remove the temp dir. Raises if a process survives SIGKILL (the temp dir is then left for a look)."""
        procs = self.processes()
        for node in reversed(self.nodes_started):
            _signal_group(node.proc.pid, signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=grace)
        for node in self.nodes_started:
            _signal_group(node.proc.pid, signal.SIGKILL)
        for p in alive + self.processes():  # what ignored SIGTERM, and anything started meanwhile
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        for node in self.nodes_started:
            node.proc.wait(timeout=10)
            node.log.close()
        _, survivors = psutil.wait_procs(alive + self.processes(), timeout=10)
        if survivors:
            raise RuntimeError(f"processes of the Ray cluster survived SIGKILL: {survivors}")
        shutil.rmtree(self.base, ignore_errors=True)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
