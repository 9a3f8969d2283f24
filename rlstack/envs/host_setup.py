"""What the strict sandboxes need on the host, for `rlstack sandbox setup`: the Debian packages (Docker's
engine, bubblewrap, debootstrap) and a running dockerd. Root only; idempotent."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rlstack.envs.sandbox import SandboxError

DOCKERD_PIDFILE = Path("/run/rlstack-dockerd.pid")
"""Written by `start_engine` when it starts dockerd (so that CI stops the one it started)."""
DOCKERD_LOG = Path("/var/log/rlstack-dockerd.log")
HOST_PACKAGES = {
    "docker.io": "dockerd",
    "bubblewrap": "bwrap",
    "debootstrap": "debootstrap",
    "util-linux": "prlimit",  # bubblewrap sets the run's rlimits with it
    "iproute2": "ip",  # the hostile suite's network-namespace case
}
"""Debian packages the sandboxes (and their tests) need -> the program that shows each is installed."""


def engine_answers() -> bool:
    """Whether a Docker engine answers (DOCKER_HOST, else the local socket)."""
    try:
        import docker

        client = docker.from_env(timeout=5)
    except Exception:
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


BUBBLEWRAP_PACKAGES = ("bubblewrap", "util-linux")
"""What the bubblewrap backend alone needs (`rlstack sandbox setup --backend bubblewrap`)."""


def install_host_packages(
    log: Callable[[str], None] = print, packages: Sequence[str] | None = None
) -> list[str]:
    """apt-get install the missing ones of `packages` (default: all of HOST_PACKAGES; root); returns those
    it installed."""
    wanted = HOST_PACKAGES if packages is None else {p: HOST_PACKAGES[p] for p in packages}
    missing = [package for package, program in wanted.items() if shutil.which(program) is None]
    if not missing:
        return []
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SandboxError(
            f"missing {', '.join(missing)}: install them (as root, Debian: apt-get install ...)"
        )
    log(f"apt-get install {' '.join(missing)} ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        ["apt-get", "update", "-q"],
        [
            "apt-get",
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "-o",
            "DPkg::Lock::Timeout=300",
            *missing,
        ],
    ):
        done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0:
            raise SandboxError(
                f"{' '.join(argv[:2])} failed (exit {done.returncode}):\n{done.stdout[-3000:]}"
            )
    return missing


def start_engine(log: Callable[[str], None] = print, wait_seconds: float = 60.0) -> int | None:
    """Start dockerd in the background (log: DOCKERD_LOG, pid: DOCKERD_PIDFILE) unless an engine answers;
    wait until it does. Returns the pid it started, or None when one was running already."""
    if engine_answers():
        return None
    if shutil.which("dockerd") is None:
        raise SandboxError(
            "dockerd is not installed: run `rlstack sandbox setup` (apt-get install docker.io)"
        )
    if os.geteuid() != 0:
        raise SandboxError("no Docker engine answers, and starting dockerd needs root")
    log(f"starting dockerd (log: {DOCKERD_LOG}) ...")
    with open(DOCKERD_LOG, "ab") as out:
        proc = subprocess.Popen(
            ["dockerd"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    DOCKERD_PIDFILE.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + wait_seconds
    while not engine_answers():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = DOCKERD_LOG.read_text(errors="replace")[-3000:]
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            DOCKERD_PIDFILE.unlink(missing_ok=True)
            raise SandboxError(f"dockerd did not come up (exit {proc.poll()}); its log ends:\n{tail}")
        time.sleep(0.2)
    return proc.pid
