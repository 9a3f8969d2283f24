"""The rollout workers' weight-sync methods, written once for both engines.

Each method is a Ray-actor method of `RolloutWorker` (a `vllm.LLM`, blocking calls) and of
`AsyncRolloutWorker` (an `AsyncLLM`, coroutines), and forwards through the engine's `collective_rpc` to
one `WorkerExtension` method (rollout.sync.worker_extension) on every vLLM worker process of the engine.
The table `_FORWARDS` is the single list; `EngineRPC` and `AsyncEngineRPC` are built from it (Ray runs
an actor's coroutine methods concurrently only if they are `async def`, so each flavour needs its own
functions). What a worker adds around them (the weights version, the async worker's generation gate) stays
in the worker: it calls `_finish_reload` and, for the async worker, `super().begin_update()`. A new entry
of `_FORWARDS` is also declared (typed) in both classes' `TYPE_CHECKING` blocks, for type checkers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any


def _first(results: list[Any]) -> Any:
    """The result of the engine's first vLLM worker (every worker returns the same)."""
    return results[0]


def _nothing(results: list[Any]) -> None:
    return None


@dataclass(frozen=True)
class _Forward:
    method: str
    """`WorkerExtension` method called on every vLLM worker of the engine."""
    result: Callable[[list[Any]], Any]
    """The actor method's return value, from the per-vLLM-worker results."""
    doc: str


_FORWARDS: dict[str, _Forward] = {
    "begin_update": _Forward(
        "rlstack_begin_update", _nothing, "Start a bucketed update (begin → buckets → finish_update)."
    ),
    "load_bucket": _Forward(
        "rlstack_load_bucket", _first, "Load one bucket of safetensors bytes (object store); tensors loaded."
    ),
    "receive_bucket": _Forward(
        "rlstack_receive_bucket", _first, "Receive one broadcast bucket (its wire form) and load it."
    ),
    "_finish_reload": _Forward(
        "rlstack_finish_update", _first, "End the engine's reload; returns the MoE layers re-prepacked."
    ),
    "engine_world_size": _Forward(
        "rlstack_world_rank", len, "The engine's number of vLLM worker processes (broadcast ranks)."
    ),
    "join_group": _Forward(
        "rlstack_join_group",
        list,
        "Join the broadcast group: (host, port, rank_offset, world_size, transport, timeout_s) → ranks.",
    ),
    "leave_group": _Forward("rlstack_leave_group", _nothing, "Leave the broadcast group."),
    "parameters_bytes": _Forward(
        "rlstack_parameters",
        _first,
        "The engine's live parameters (safetensors bytes), for checks against a fresh engine.",
    ),
}


def _sync_method(name: str, forward: _Forward) -> Callable[..., Any]:
    def method(self: Any, *args: Any) -> Any:
        return forward.result(self.llm.collective_rpc(forward.method, args=args))

    return _named(method, name, "EngineRPC", forward.doc)


def _async_method(name: str, forward: _Forward) -> Callable[..., Any]:
    async def method(self: Any, *args: Any) -> Any:
        return forward.result(await self.llm.collective_rpc(forward.method, args=args))

    return _named(method, name, "AsyncEngineRPC", forward.doc)


def _named(method: Callable[..., Any], name: str, owner: str, doc: str) -> Callable[..., Any]:
    method.__name__ = name
    method.__qualname__ = f"{owner}.{name}"
    method.__doc__ = doc
    return method


class EngineRPC:
    """Mixin of `RolloutWorker` (`self.llm`: a `vllm.LLM`): the `_FORWARDS` methods, blocking."""

    llm: Any
    version: int

    if TYPE_CHECKING:  # set from `_FORWARDS` below; declared here for type checkers

        def begin_update(self) -> None: ...
        def load_bucket(self, payload: bytes) -> int: ...
        def receive_bucket(self, wire_bucket: list[list[Any]]) -> int: ...
        def _finish_reload(self) -> int: ...
        def engine_world_size(self) -> int: ...
        def join_group(
            self, host: str, port: int, rank_offset: int, world_size: int, transport: str, timeout_s: float
        ) -> list[int]: ...
        def leave_group(self) -> None: ...
        def parameters_bytes(self) -> bytes: ...

    def update_weights(self, payload: bytes, version: int) -> dict[str, float]:
        """Load one safetensors payload in place in a single call and take on `version`."""
        start = time.perf_counter()
        self.llm.collective_rpc("rlstack_update_weights", args=(payload,))
        seconds = time.perf_counter() - start
        self.version = version
        return {
            "sync/bytes": float(len(payload)),
            "sync/seconds": seconds,
            "sync/mb_per_s": len(payload) / 2**20 / max(seconds, 1e-9),
        }


class AsyncEngineRPC:
    """Mixin of `AsyncRolloutWorker` (`self.llm`: an `AsyncLLM`): the `_FORWARDS` methods, as coroutines."""

    llm: Any

    if TYPE_CHECKING:  # set from `_FORWARDS` below; declared here for type checkers

        async def begin_update(self) -> None: ...
        async def load_bucket(self, payload: bytes) -> int: ...
        async def receive_bucket(self, wire_bucket: list[list[Any]]) -> int: ...
        async def _finish_reload(self) -> int: ...
        async def engine_world_size(self) -> int: ...
        async def join_group(
            self, host: str, port: int, rank_offset: int, world_size: int, transport: str, timeout_s: float
        ) -> list[int]: ...
        async def leave_group(self) -> None: ...
        async def parameters_bytes(self) -> bytes: ...


for _name, _forward in _FORWARDS.items():
    setattr(EngineRPC, _name, _sync_method(_name, _forward))
    setattr(AsyncEngineRPC, _name, _async_method(_name, _forward))
del _name, _forward
