"""The Docker sandbox's image, built here without a registry: `debootstrap` makes a minimal Debian root
filesystem with Python, and `docker import` turns it into an image.

The tag records what is in the image (`rlstack-sandbox:bookworm-python3-<hash>`, the hash of the suite,
the package list and the builder version), so a changed builder makes a new tag and `DockerSandbox`
never runs in an image built by an older one. `rlstack sandbox build-image` (or `setup`) builds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlstack.envs.sandbox import SandboxError

SUITE = "bookworm"
PACKAGES = ("python3",)
"""Installed on top of debootstrap's minbase (dash, coreutils, tar: what the sandbox's wrapper uses).
The full `python3`, not `python3-minimal`: the code harness and model-written programs expect the whole
standard library (ctypes, hashlib, collections, ...)."""
BUILDER_VERSION = "1"
"""Raise when what the builder puts into the image changes (a new tag, so a rebuild)."""
REPOSITORY = "rlstack-sandbox"
ENV_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_DEFAULT_MIRROR = "http://deb.debian.org/debian"
_TRIM = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/info")


def default_image() -> str:
    """The tag the current builder makes (and `DockerSandbox` runs in when given no image)."""
    recipe = f"{BUILDER_VERSION}|{SUITE}|minbase|{','.join(PACKAGES)}"
    return f"{REPOSITORY}:{SUITE}-python3-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


def docker_client(timeout: int = 60, max_pool_size: int = 10) -> Any:
    """A docker SDK client for the engine of this environment (DOCKER_HOST, else the local socket); it
    asks the engine for its API version, so it fails (DockerException) when none answers."""
    import docker

    return docker.from_env(timeout=timeout, max_pool_size=max_pool_size)


def image_present(tag: str, client: Any = None) -> bool:
    """Whether the engine has an image called `tag`."""
    import docker.errors

    client = client or docker_client()
    try:
        client.api.inspect_image(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


def debian_mirror() -> str:
    """The Debian mirror apt uses here (its sources, one-line or deb822 format), else deb.debian.org."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        if path.suffix not in ("", ".list", ".sources") or not path.is_file():
            continue
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                words = line.split("#", 1)[0].split()
                uris: list[str] = []
                if path.suffix == ".sources" and words[:1] == ["URIs:"]:
                    uris = words[1:]
                elif path.suffix != ".sources" and words[:1] == ["deb"]:
                    uris = [w for w in words[1:] if "://" in w][:1]
                for uri in uris:
                    if uri.rstrip("/").endswith("/debian"):
                        return uri.rstrip("/")
    return _DEFAULT_MIRROR


def build_image(tag: str | None = None, log: Callable[[str], None] = print) -> str:
    """Build the sandbox image (about a minute: debootstrap, then `docker import`) and return its tag.
    Needs root, `debootstrap` and a Docker engine (`rlstack sandbox setup` installs and starts both)."""
    tag = tag or default_image()
    if shutil.which("debootstrap") is None:
        raise SandboxError(
            "debootstrap is not installed: run `rlstack sandbox setup` (or apt-get install debootstrap)"
        )
    if os.geteuid() != 0:
        raise SandboxError("building the sandbox image needs root (debootstrap)")
    client = docker_client(timeout=600)
    mirror = debian_mirror()
    tmp = Path(tempfile.mkdtemp(prefix="rlstack-image-"))
    rootfs = tmp / "rootfs"
    try:
        start = time.monotonic()
        log(f"debootstrap {SUITE} (minbase + {', '.join(PACKAGES)}) from {mirror} ...")
        done = subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                SUITE,
                str(rootfs),
                mirror,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if done.returncode != 0:
            raise SandboxError(f"debootstrap failed (exit {done.returncode}):\n{done.stdout[-3000:]}")
        _unmount_under(tmp)
        for trim in _TRIM:
            shutil.rmtree(rootfs / trim, ignore_errors=True)
        log(f"debootstrap done in {time.monotonic() - start:.0f} s; importing as {tag} ...")
        start = time.monotonic()
        repository, _, version = tag.rpartition(":")
        if not repository or "/" in version:
            repository, version = tag, "latest"
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        try:
            client.api.import_image(
                src=tar.stdout,
                repository=repository,
                tag=version,
                changes=[
                    f"ENV PATH={ENV_PATH}",
                    "ENV LANG=C.UTF-8",
                    'CMD ["python3"]',
                    f"LABEL rlstack.sandbox.image={tag} rlstack.sandbox.packages={','.join(PACKAGES)}",
                ],
                stream_src=True,
            )
        finally:
            tar.stdout.close()
            tar.wait()
        if tar.returncode != 0 or not image_present(tag, client):
            raise SandboxError(f"importing the sandbox image failed (tar exit {tar.returncode})")
        log(f"imported {tag} in {time.monotonic() - start:.0f} s")
        return tag
    finally:
        _unmount_under(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        client.close()


def _unmount_under(path: Path) -> None:
    """Unmount whatever a failed debootstrap left mounted inside `path` (/proc, /sys), so that removing the
    directory never descends into the host's."""
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f]
    for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", point], check=False)
