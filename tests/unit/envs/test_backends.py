"""Choosing a sandbox backend: by name, by a run's `sandbox:` section, strictly; and a sandbox that fails
to run a program leaves the sample unscored, never scored 0."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from rlstack.envs import Limits, RunResult, Sandbox, SandboxError
from rlstack.envs.backends import backend_class, get_sandbox, host_backends, resolve_backend
from rlstack.envs.config import SandboxConfig
from rlstack.envs.sandbox import Files
from rlstack.rewards import RewardGroup, RewardSpec
from rlstack.rewards.code_verify import CodeVerifier


def test_strict_mode_refuses_the_process_backend_and_an_opt_in_accepts_it() -> None:
    assert not backend_class("process").strict
    assert backend_class("docker").strict and backend_class("bubblewrap").strict
    with pytest.raises(SandboxError, match="strict: false"):
        resolve_backend(SandboxConfig(backend="process"))
    assert resolve_backend(SandboxConfig(backend="process", strict=False)) == "process"


def test_auto_picks_the_strongest_backend_the_host_has() -> None:
    present = [name for name, missing in host_backends().items() if missing is None]
    assert "process" in present
    assert resolve_backend(SandboxConfig(strict=False)) == present[0]  # docker > bubblewrap > process
    strict = [name for name in present if backend_class(name).strict]
    if strict:
        assert resolve_backend(SandboxConfig()) == strict[0]
    else:  # a host with neither docker nor bubblewrap: a strict run refuses to start and says why
        with pytest.raises(SandboxError, match=r"docker: .*bubblewrap: .*process: not strict"):
            resolve_backend(SandboxConfig())


def test_unknown_backend_names_what_exists() -> None:
    with pytest.raises(ValueError, match="available: bubblewrap, docker, process"):
        get_sandbox("firecracker")


class BrokenSandbox(Sandbox):
    """Injects what a real backend cannot be made to do on demand: fail to run anything."""

    name = "broken"

    def run(
        self,
        command: Sequence[str],
        files: Files | None = None,
        stdin: str | bytes = "",
        limits: Limits | None = None,
    ) -> RunResult:
        return RunResult("error", None, "", "", detail="the engine went away")


def test_a_sandbox_failure_is_an_error_not_a_failed_program() -> None:
    with pytest.raises(SandboxError, match="could not run the tests: the engine went away"):
        CodeVerifier(sandbox=BrokenSandbox()).verify("def add(a, b): return a + b", ["assert add(1, 2) == 3"])


def test_a_code_reward_on_a_host_without_the_asked_backend_fails_at_start_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        backend_class("bubblewrap"), "unavailable", classmethod(lambda cls: "bwrap is missing")
    )
    with pytest.raises(SandboxError, match="'bubblewrap' cannot run on this host: bwrap is missing"):
        RewardGroup.in_process([RewardSpec(name="code")], sandbox=SandboxConfig(backend="bubblewrap"))
