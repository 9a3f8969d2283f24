"""Sandboxes for model-written code: the `Sandbox` interface; Docker, bubblewrap and process backends."""

from rlstack.envs.backends import get_sandbox, register_backend
from rlstack.envs.sandbox import Files, Limits, RunResult, Sandbox, SandboxError

__all__ = [
    "Files",
    "Limits",
    "ProcessSandbox",
    "RunResult",
    "Sandbox",
    "SandboxError",
    "get_sandbox",
    "register_backend",
]


def __getattr__(name: str) -> object:
    if name == "ProcessSandbox":
        from rlstack.envs.process import ProcessSandbox

        return ProcessSandbox
    raise AttributeError(f"module 'rlstack.envs' has no attribute {name!r}")
