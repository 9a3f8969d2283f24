"""`rlstack sandbox setup|build-image|status`: make this host run the strict sandboxes, and check."""

from __future__ import annotations

import argparse
import sys


def cmd_sandbox_setup(args: argparse.Namespace) -> int:
    import time

    from rlstack.envs.host_setup import (
        BUBBLEWRAP_PACKAGES,
        DOCKERD_PIDFILE,
        install_host_packages,
        start_engine,
    )
    from rlstack.envs.image import build_image, default_image, image_present
    from rlstack.envs.sandbox import SandboxError

    start = time.monotonic()
    only_bubblewrap = args.backend == "bubblewrap"
    try:
        installed = install_host_packages(packages=BUBBLEWRAP_PACKAGES if only_bubblewrap else None)
        print(f"installed {', '.join(installed)}" if installed else "packages: all installed already")
        if only_bubblewrap:
            print(f"sandbox setup (bubblewrap) done in {time.monotonic() - start:.0f} s")
            return 0 if print_sandbox_table().get("bubblewrap", "?") is None else 1
        pid = start_engine()
        print(
            f"started dockerd, pid {pid} (in {DOCKERD_PIDFILE})" if pid else "Docker engine: running already"
        )
        if image_present(default_image()):
            print(f"image {default_image()}: present already")
        else:
            build_image()
    except SandboxError as e:
        print(f"error: {e}", file=sys.stderr)
        print_sandbox_table()
        return 1
    print(f"sandbox setup done in {time.monotonic() - start:.0f} s")
    table = print_sandbox_table()
    return 0 if table.get("docker", "?") is None and table.get("bubblewrap", "?") is None else 1


def cmd_sandbox_build_image(args: argparse.Namespace) -> int:
    from rlstack.envs.image import build_image
    from rlstack.envs.sandbox import SandboxError

    try:
        print(f"built {build_image(args.tag)}")
    except SandboxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_sandbox_status(args: argparse.Namespace) -> int:
    print_sandbox_table()
    return 0


def print_sandbox_table() -> dict[str, str | None]:
    """Print each built-in backend: strict or not, and ready or what it needs; return backend -> missing."""
    from rlstack.envs.backends import backend_class, host_backends

    try:
        missing = host_backends()
    except Exception:  # one backend does not even import: say so in its row, check the others
        missing = {}
        for name in ("docker", "bubblewrap", "process"):
            try:
                missing[name] = backend_class(name).unavailable()
            except Exception as e:
                missing[name] = f"{type(e).__name__}: {e}"
    print(f"\n{'backend':<12}{'strict':<8}status")
    for name, reason in missing.items():
        try:
            strict = "yes" if backend_class(name).strict else "no"
        except Exception:
            strict = "?"
        print(f"{name:<12}{strict:<8}{'ready' if reason is None else reason}")
    return missing
