"""The weight-sync package's shape without engines: no import cycle, the rollout workers' forwarding
methods, and the driver's one call choosing the transport from `rollout.weight_sync`."""

from __future__ import annotations

import ast
import asyncio
import inspect
import subprocess
import sys
from graphlib import TopologicalSorter
from pathlib import Path
from typing import Any

import pytest
import torch

import rlstack.rollout.sync as sync_package
from rlstack.rollout.async_worker import AsyncRolloutWorker
from rlstack.rollout.engine import EngineSettings, engine_kwargs
from rlstack.rollout.sync.engine_rpc import _FORWARDS, AsyncEngineRPC, EngineRPC
from rlstack.rollout.sync.push import attach, make_backend, push_policy
from rlstack.rollout.worker import RolloutWorker

PACKAGE = "rlstack.rollout.sync"
PACKAGE_DIR = Path(sync_package.__file__).parent


def package_imports(path: Path) -> set[str]:
    """Modules of the package that `path` imports anywhere (top level or inside functions)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return {n.removeprefix(f"{PACKAGE}.") for n in names if n.startswith(f"{PACKAGE}.")}


def test_the_package_modules_import_each_other_without_a_cycle() -> None:
    graph = {p.stem: package_imports(p) for p in PACKAGE_DIR.glob("*.py") if p.stem != "__init__"}
    assert set(graph) == {
        "plan", "collective", "backend", "object_store", "broadcast", "push", "worker_extension", "engine_rpc"
    }  # fmt: skip
    order = list(TopologicalSorter(graph).static_order())  # raises CycleError on a cycle, lazy imports too
    assert order.index("plan") < order.index("backend") < order.index("broadcast")


def test_the_engine_side_loads_without_ray_and_vllm_finds_it() -> None:
    """vLLM imports the extension by its dotted path in every worker process; that must not pull in Ray."""
    path = engine_kwargs("m", EngineSettings())["worker_extension_cls"]
    module, name = path.rsplit(".", 1)
    code = f"import sys, {module} as m; assert hasattr(m, {name!r}); assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


class FakeLLM:
    """Records `collective_rpc` calls; an engine with two vLLM workers."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def collective_rpc(self, method: str, args: tuple = ()) -> list[Any]:
        self.calls.append((method, args))
        return [len(self.calls), len(self.calls)]


class FakeAsyncLLM(FakeLLM):
    async def collective_rpc(self, method: str, args: tuple = ()) -> list[Any]:  # type: ignore[override]
        return FakeLLM.collective_rpc(self, method, args)


def test_both_rollout_workers_get_the_same_forwarding_methods() -> None:
    for name in _FORWARDS:
        assert getattr(RolloutWorker, name) is getattr(EngineRPC, name)
        assert not inspect.iscoroutinefunction(getattr(RolloutWorker, name))
        assert inspect.iscoroutinefunction(getattr(AsyncRolloutWorker, name))
    assert AsyncRolloutWorker.begin_update is not AsyncEngineRPC.begin_update  # it gates generation first

    sync_rpc, async_rpc = EngineRPC(), AsyncEngineRPC()
    sync_rpc.llm, async_rpc.llm = FakeLLM(), FakeAsyncLLM()
    args = ("h", 1, 3, 5, "gloo", 9.0)
    assert sync_rpc.load_bucket(b"x") == 1 and sync_rpc.join_group(*args) == [2, 2]  # type: ignore[attr-defined]
    assert sync_rpc.engine_world_size() == 2 and sync_rpc.leave_group() is None  # type: ignore[attr-defined]

    async def calls() -> list[Any]:
        return [
            await async_rpc.load_bucket(b"x"),  # type: ignore[attr-defined]
            await async_rpc.join_group(*args),  # type: ignore[attr-defined]
            await async_rpc.engine_world_size(),  # type: ignore[attr-defined]
            await async_rpc.leave_group(),  # type: ignore[attr-defined]
        ]

    assert asyncio.run(calls()) == [1, [2, 2], 2, None]
    expected = [("rlstack_load_bucket", (b"x",)), ("rlstack_join_group", args)]
    expected += [("rlstack_world_rank", ()), ("rlstack_leave_group", ())]
    assert sync_rpc.llm.calls == async_rpc.llm.calls == expected


class FakeRollout:
    def __init__(self, kind: str) -> None:
        self.weight_sync = make_backend(kind, [], bucket_mb=1)
        self.version = 0
        self.pushed: list[tuple[dict, int]] = []

    def update_weights(self, state_dict: dict, version: int) -> dict[str, float]:
        self.pushed.append((state_dict, version))
        self.version = version
        return {"sync/bytes": 1.0}


class FakeLearner:
    version = 3

    def __init__(self) -> None:
        self.attached: list[Any] = []
        self.pushes: list[int] = []

    def export_weights(self) -> dict[str, torch.Tensor]:
        return {"w": torch.zeros(1)}

    def attach_weight_sync(self, backend: Any) -> None:
        self.attached.append(backend)

    def push_weights(self, version: int) -> dict[str, float]:
        self.pushes.append(version)
        return {"sync/bytes": 2.0, "sync/seconds": 0.0}


def test_object_store_pushes_from_the_driver() -> None:
    learner, rollout = FakeLearner(), FakeRollout("object_store")
    attach(learner, rollout)  # type: ignore[arg-type]
    assert push_policy(learner, rollout) == {"sync/bytes": 1.0}  # type: ignore[arg-type]
    assert learner.attached == [] and learner.pushes == []
    assert [v for _, v in rollout.pushed] == [3] and rollout.version == 3


@pytest.mark.parametrize("kind", ["gloo", "nccl"])
def test_broadcast_pushes_from_the_learner_rank_0(kind: str) -> None:
    learner, rollout = FakeLearner(), FakeRollout(kind)
    attach(learner, rollout)  # type: ignore[arg-type]
    stats = push_policy(learner, rollout)  # type: ignore[arg-type]
    assert learner.attached == [rollout.weight_sync] and learner.pushes == [3] and rollout.pushed == []
    assert stats["sync/bytes"] == 2.0 and stats["sync/total_seconds"] >= 0 and rollout.version == 3


def test_the_package_exports_resolve() -> None:
    assert sync_package.push_policy is push_policy and sync_package.make_backend is make_backend
    assert {"WeightSyncBackend", "checkpoint_tensors", "attach"} <= set(dir(sync_package))
