"""`python_tool`: an environment with one tool, a Python interpreter in the run's sandbox.

Each call runs the code as a fresh program in the sandbox (`sandbox:` section: bubblewrap or Docker in
strict mode) and answers what it printed, or how it failed. A fresh run per call keeps calls independent
(no state carried between them) and costs one sandbox start: about 20 ms with bubblewrap, 0.12-0.21 s
with Docker (benchmarks/sandbox.py).
"""

from __future__ import annotations

from pydantic import Field

from rlstack.config_base import StrictModel
from rlstack.envs.backends import run_sandbox
from rlstack.envs.registry import register_env
from rlstack.envs.sandbox import Limits, SandboxError


class PythonToolOptions(StrictModel):
    time_limit_s: float = Field(5.0, gt=0)
    """Wall-clock limit of one program."""
    memory_mb: int = Field(256, ge=16)
    """Memory of one program (all its processes)."""
    max_output_chars: int = Field(2000, ge=16)
    """What the model reads of the program's output, at most (longer output is cut, and says so)."""


@register_env("python_tool", options=PythonToolOptions, uses_sandbox=True)
class PythonTool:
    """A TRL-style environment: `reset` keeps nothing; the tool `python` runs a program."""

    def __init__(self, time_limit_s: float = 5.0, memory_mb: int = 256, max_output_chars: int = 2000) -> None:
        self.limits = Limits(wall_seconds=time_limit_s, memory_mb=memory_mb)
        self.max_output_chars = max_output_chars
        self.calls = 0

    def reset(self, **row: object) -> None:
        self.calls = 0

    def python(self, code: str) -> str:
        """Run a Python program and return what it prints.

        Args:
            code: The program's source; use print() to see values.

        Returns:
            The program's standard output, or its error.
        """
        self.calls += 1
        result = run_sandbox().run(["python3", "main.py"], files={"main.py": code}, limits=self.limits)
        if result.status == "error":  # the sandbox failed, not the program: never feed that back as output
            raise SandboxError(f"the python tool's sandbox failed: {result.detail}")
        text = result.stdout
        if not result.succeeded:
            tail = result.stderr.strip().splitlines()[-1:] if result.stderr.strip() else []
            text += f"{result.describe()}: {tail[0]}" if tail else result.describe()
        if len(text) > self.max_output_chars:
            text = text[: self.max_output_chars] + f"\n[... {len(text)} characters in all]"
        return text
