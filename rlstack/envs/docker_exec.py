"""The wire of one Docker exec (rlstack.envs.docker): the run's files go in as a tar on its stdin, its
stdout and stderr come back in Docker's multiplexed frames, and the hijacked connection is closed after."""

from __future__ import annotations

import contextlib
import io
import selectors
import socket
import tarfile
import time
from typing import Any

from rlstack.envs.sandbox import checked_files

READY = b"[rlstack docker sandbox: ready]\n"  # not "rlstack-sandbox-": process.sandbox_processes
"""What the wrapper writes on stderr once the files are unpacked; `exchange` keeps it apart."""


def tar_files(files: dict[str, str | bytes]) -> bytes:
    """The files as an uncompressed tar (parents first), or b"" when there are none."""
    if not files:
        return b""
    buffer = io.BytesIO()
    now = time.time()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for rel, body in checked_files(files):
            for parent in reversed(rel.parents[:-1]):
                if str(parent) not in dirs:
                    dirs.add(str(parent))
                    info = tarfile.TarInfo(str(parent))
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, now
                    tar.addfile(info)
            info = tarfile.TarInfo(str(rel))
            info.size, info.mode, info.mtime = len(body), 0o644, now
            tar.addfile(info, io.BytesIO(body))
    return buffer.getvalue()


def exchange(conn: Any, data: bytes, deadline: float, cap: int) -> tuple[dict[str, Any], bool]:
    """Write `data` to the exec's stdin (then half-close it) while reading its multiplexed output (8-byte
    frame headers: stream 1 stdout, 2 stderr; size) until it closes or the deadline passes. Keeps the first
    `cap` bytes of each stream and counts the rest; the wrapper's ready marker is kept apart."""
    sock: socket.socket = getattr(conn, "_sock", conn)
    sock.setblocking(False)
    kept = {1: bytearray(), 2: bytearray()}
    totals = {1: 0, 2: 0}
    ready = bytearray()
    header = bytearray()
    stream, remaining = 0, 0
    offset = 0
    timed_out = False
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if data else 0))
        if not data:
            sock.shutdown(socket.SHUT_WR)
        while True:
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            events = sel.select(deadline - now)
            if not events:
                continue
            mask = events[0][1]
            if mask & selectors.EVENT_WRITE:
                try:
                    offset += sock.send(data[offset : offset + 65536])
                except BlockingIOError:
                    pass
                except OSError:  # the process closed its stdin or ended
                    offset = len(data)
                if offset >= len(data):
                    sel.modify(sock, selectors.EVENT_READ)
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_WR)
            if not mask & selectors.EVENT_READ:
                continue
            try:
                chunk = sock.recv(262144)
            except BlockingIOError:
                continue
            except OSError:
                break
            if not chunk:
                break
            i = 0
            while i < len(chunk):
                if remaining == 0:
                    need = 8 - len(header)
                    header += chunk[i : i + need]
                    i += need
                    if len(header) == 8:
                        stream, remaining = header[0], int.from_bytes(header[4:8], "big")
                        header.clear()
                    continue
                piece = chunk[i : i + remaining]
                i += len(piece)
                remaining -= len(piece)
                if stream == 2 and len(ready) < len(READY):
                    take = len(READY) - len(ready)
                    ready += piece[:take]
                    piece = piece[take:]
                key = 2 if stream == 2 else 1
                totals[key] += len(piece)
                room = cap - len(kept[key])
                if room > 0:
                    kept[key] += piece[:room]
    result = {
        "stdout": (bytes(kept[1]), totals[1]),
        "stderr": (bytes(kept[2]), totals[2]),
        "ready": bytes(ready),
    }
    return result, timed_out


def close_exec(conn: Any) -> None:
    """Close the exec's hijacked connection (and the HTTP response the SDK keeps with it)."""
    with contextlib.suppress(Exception):
        getattr(conn, "_sock", conn).close()
    with contextlib.suppress(Exception):
        conn.close()
    response = getattr(conn, "_response", None)
    if response is not None:
        with contextlib.suppress(Exception):
            response.close()
