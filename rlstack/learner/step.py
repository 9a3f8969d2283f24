"""One mini-batch of policy-gradient accumulation on one data-parallel rank, in plain PyTorch.

No DeepSpeed here: the worker plugs its engine in through `GradSink`, tests plug in `loss.backward()`.
The arithmetic that makes N ranks equal one rank (and 8 micro-batches of 1 equal 1 of 8):

- the loss normaliser (generated tokens or sequences of the WHOLE mini-batch) is a sum over ranks of
  local counts, all-reduced before the first forward;
- each micro-batch's loss is `sum(its tokens) / global normaliser`, so micro-batch losses and gradients
  add up to the mini-batch's over all ranks;
- data parallelism AVERAGES gradients over W ranks, so each rank backpropagates W * loss; and the engine
  must not divide by its accumulation count (DeepSpeed: `backward(loss, scale_wrt_gas=False)`).
Every rank runs the same number of forward/backward passes (inert micro-batches pad the short ones),
because ZeRO-3 gathers parameters with collectives inside each forward.

Rows without learning signal (no trainable token with a nonzero advantage; with KL, no trainable token)
skip the forward/backward where that leaves the update unchanged (`skip_is_exact`, `signal_rows`): their
loss and gradient are exactly 0, and the normaliser is counted from the masks of ALL rows beforehand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist

from rlstack.learner.batch import PolicyBatch
from rlstack.learner.config import MoEConfig
from rlstack.learner.logprobs import SamplingTransform, TokenScores, score_tokens
from rlstack.learner.micro import Micro, MicroSplit, as_split, cut
from rlstack.learner.moe import balance_loss, logp_gap, routing_arrays, routing_mismatch
from rlstack.learner.signal import signal_rows, skip_is_exact, trainable_tokens
from rlstack.mispo import AlgorithmConfig, apply_filters, compute_policy_loss

# Metrics that are already divided by the global normaliser: they add up over micro-batches and ranks.
SUMMED = ("actor/loss", "actor/pg_loss", "moe/balance_loss")
# Token and row counts: they add up over micro-batches, ranks and mini-batches.
SKIPPED = "actor/skipped_rows"
COUNTED = ("actor/signal_tokens", "actor/nonfinite_logp_tokens", SKIPPED)


def old_logp_from_forward_is_exact(n_minibatches: int, algo_cfg: AlgorithmConfig) -> bool:
    """Whether pi_old may come from the training forward: one optimizer step per train step (none has run
    when pi_old is read) and a trajectory filter that can be applied per micro-batch."""
    return n_minibatches == 1 and algo_cfg.traj_filter_is_stateless


class Reducer(Protocol):
    """Collectives over the data-parallel group (in place on float64 CPU tensors)."""

    world_size: int

    def sum_(self, t: torch.Tensor) -> torch.Tensor: ...

    def max_(self, t: torch.Tensor) -> torch.Tensor: ...


class LocalReducer:
    """A single process: every collective is the identity."""

    world_size = 1

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        return t


class DistReducer:
    """torch.distributed's default group (gloo or nccl; tensors are moved to `device` for the call)."""

    def __init__(self, device: torch.device) -> None:
        self.world_size = dist.get_world_size()
        self.device = device

    def _reduce(self, t: torch.Tensor, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
        moved = t.to(self.device)
        dist.all_reduce(moved, op=op)
        t.copy_(moved.cpu())
        return t

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, dist.ReduceOp.SUM)

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, dist.ReduceOp.MAX)


class GradSink(Protocol):
    """Where micro-batch losses go: `begin(is_last)` before each forward, `backward(loss)` after it."""

    def begin(self, is_last: bool) -> None: ...

    def backward(self, loss: torch.Tensor) -> None: ...


class TorchSink:
    """Plain autograd accumulation into `.grad` (tests, and a single process without DeepSpeed)."""

    def begin(self, is_last: bool) -> None:
        pass

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()


@dataclass
class MetricSums:
    """Metric accumulators: `sums[k]` adds up; `weighted[k] = (sum of w * value, sum of w)`."""

    sums: dict[str, float] = field(default_factory=dict)
    weighted: dict[str, list[float]] = field(default_factory=dict)
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)
    """Summed float64 tensors (per-layer x per-expert token counts and the like)."""

    def add(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value

    def add_array(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().double().cpu()
        self.arrays[key] = self.arrays[key] + value if key in self.arrays else value.clone()

    def add_weighted(self, key: str, value: float, weight: float) -> None:
        acc = self.weighted.setdefault(key, [0.0, 0.0])
        acc[0] += value * weight
        acc[1] += weight

    def merge(self, other: MetricSums) -> None:
        for k, v in other.sums.items():
            self.add(k, v)
        for k, (vw, w) in other.weighted.items():
            acc = self.weighted.setdefault(k, [0.0, 0.0])
            acc[0] += vw
            acc[1] += w
        for k, arr in other.arrays.items():
            self.add_array(k, arr)

    def all_reduce(self, reducer: Reducer) -> MetricSums:
        """Sum every accumulator over ranks (every rank must hold the same keys)."""
        keys, wkeys, akeys = sorted(self.sums), sorted(self.weighted), sorted(self.arrays)
        n = len(keys) + len(wkeys) + sum(self.arrays[k].numel() for k in akeys)
        lo_hi = reducer.max_(torch.tensor([n, -n], dtype=torch.float64))
        if lo_hi[0] != n or -lo_hi[1] != n:
            raise RuntimeError(f"learner ranks produced different metric keys ({n} here); cannot reduce them")
        flat = [self.sums[k] for k in keys] + [x for k in wkeys for x in self.weighted[k]]
        arrays = [self.arrays[k].reshape(-1) for k in akeys]
        t = reducer.sum_(torch.cat([torch.tensor(flat, dtype=torch.float64), *arrays]))
        out = MetricSums(sums={k: float(t[i]) for i, k in enumerate(keys)})
        base = len(keys)
        for i, k in enumerate(wkeys):
            out.weighted[k] = [float(t[base + 2 * i]), float(t[base + 2 * i + 1])]
        base += 2 * len(wkeys)
        for k in akeys:
            size = self.arrays[k].numel()
            out.arrays[k] = t[base : base + size].reshape(self.arrays[k].shape).clone()
            base += size
        return out

    def zeros_like(self) -> MetricSums:
        """The same keys with every value 0 (what a pad micro-batch adds)."""
        return MetricSums(
            sums=dict.fromkeys(self.sums, 0.0),
            weighted={k: [0.0, 0.0] for k in self.weighted},
            arrays={k: torch.zeros_like(v) for k, v in self.arrays.items()},
        )

    def result(self) -> dict[str, float]:
        """Sums as they are, weighted means; a mean with no weight at all (no token contributed to it, e.g.
        the entropy of a step whose every row skipped the forward) is left out rather than reported as 0."""
        out = dict(self.sums)
        for k, (vw, w) in self.weighted.items():
            if w > 0:
                out[k] = vw / w
        return out


def local_norm_count(loss_mask: torch.Tensor, loss_norm: str) -> int:
    """This rank's share of `mispo.loss_normalizer` before its clamp to >= 1: generated tokens
    (`token_mean`) or sequences with at least one generated token (`seq_mean`)."""
    mask = loss_mask.bool()  # (B, T)
    return int(mask.sum()) if loss_norm == "token_mean" else int(mask.any(-1).sum())


def global_normalizer(shard: PolicyBatch, loss_norm: str, reducer: Reducer) -> float:
    """The mini-batch normaliser over all ranks' shards, as `mispo.loss_normalizer` of the whole batch."""
    count = reducer.sum_(torch.tensor([local_norm_count(shard.loss_mask, loss_norm)], dtype=torch.float64))
    return float(max(int(count.item()), 1))


def padded_micro_batches(
    shard: PolicyBatch,
    split: MicroSplit | int,
    reducer: Reducer,
    pad_from: PolicyBatch | None = None,
    at_least: int = 1,
) -> list[Micro]:
    """The shard in micro-batches (`split`: rows per micro-batch, or a token budget), padded with inert
    copies (loss mask 0, no rows) to the largest count of any rank, and to at least `at_least` (the engine
    steps after a backward). The copies are of `pad_from`'s first row (default `shard`), so `shard` may be
    empty when `pad_from` is not (every row skipped)."""
    source = shard if pad_from is None else pad_from
    if len(source) == 0:
        raise ValueError("a learner rank got no rows; give every rank at least one row per mini-batch")
    micro = cut(shard, as_split(split))
    n = max(int(reducer.max_(torch.tensor([len(micro)], dtype=torch.float64)).item()), at_least)
    inert = Micro(source.select(slice(0, 1)).inert_copy(), torch.zeros(0, dtype=torch.long))
    return micro + [inert] * (n - len(micro))


def check_trainable(batch: PolicyBatch, algo_cfg: AlgorithmConfig, old_from_forward: bool) -> None:
    if batch.old_logp is None and not old_from_forward:
        raise ValueError("PolicyBatch.old_logp is None: compute pi_old with compute_logprobs(batch) first")
    if batch.advantages is None:
        raise ValueError("PolicyBatch.advantages is None: set them with rlstack.mispo.compute_advantages")
    if batch.old_logp is None and (batch.filter is not None or not algo_cfg.traj_filter_is_stateless):
        raise ValueError(
            "pi_old from the training forward (old_logp None) computes the MIS filter per micro-batch, so it "
            "needs a stateless trajectory filter ('fixed' or 'off') and no precomputed batch.filter; "
            f"got traj_filter '{algo_cfg.traj_filter}'"
            + (" and a filter" if batch.filter is not None else "")
        )


def accumulate_minibatch(
    model: Callable[..., object],
    shard: PolicyBatch,
    algo_cfg: AlgorithmConfig,
    sink: GradSink,
    reducer: Reducer,
    split: MicroSplit | int,
    device: torch.device | None = None,
    old_from_forward: bool = False,
    old_logp_out: list[torch.Tensor] | None = None,
    *,
    ref_model: Callable[..., object] | None = None,
    transform: SamplingTransform | None = None,
    moe: MoEConfig | None = None,
    probe: bool = False,
    skip_zero_signal: bool = True,
) -> MetricSums:
    """Forward/backward this rank's rows of one mini-batch into `sink`; returns this rank's metric sums
    (all-reduce them for the global numbers). Gradients afterwards are exactly those of the mini-batch
    loss once the caller's data-parallel layer has averaged them over ranks.

    `old_from_forward` with `shard.old_logp` None: pi_old is each micro-batch's own forward, detached (no
    separate forward pass, as TRL does with one iteration). Exact only before the train step's first
    optimizer step, so the caller must make this the step's only mini-batch. The MIS filter is then
    computed per micro-batch (stateless trajectory filters only). `old_logp_out` receives this rank's pi_old,
    one (B, L) tensor in the shard's row order.

    `ref_model` (the frozen reference policy, needed when `algo_cfg.kl_coef > 0`) scores each micro-batch
    for the KL term; `transform` is the sampling transformation (temperature, top-k/top-p) under which
    every log-prob here (pi_theta, pi_old, pi_ref) is computed, the one the rollout engine sampled from.

    MoE (`moe`, a model with routing statistics): the training forward replays `shard.replay_experts` when
    set; the balancing loss is added with `moe.balance_coef`; every forward's routing facts go to
    `MetricSums.arrays` (learner.moe.health_metrics). `probe`: one extra no-grad forward per micro-batch
    measures routing mismatch and the log-prob gap to the engine with and without replay (needs the
    rollouts' recorded routing, `shard.rollout_experts`).

    `skip_zero_signal`: rows without learning signal (`signal.signal_rows`) run no backward where that is
    exact (`signal.skip_is_exact`); the normaliser still counts them. With pi_old in the batch they run no
    forward either: `batch/tokens`, `batch/sequences`, `actor/train_frac` and the MIS filter's metrics still
    cover them (from their masks), metrics that need a forward (entropy, clip fraction, KL, routing facts,
    ...) cover the rows that ran. With pi_old from the forward they run a forward without gradient (their
    pi_old is an output), so every metric covers them. `actor/skipped_rows` counts them."""
    check_trainable(shard, algo_cfg, old_from_forward)
    if algo_cfg.kl_coef > 0.0 and ref_model is None and shard.ref_logp is None:
        raise ValueError(
            f"algorithm.kl_coef = {algo_cfg.kl_coef} needs the reference policy: build the learner with "
            "a reference model (LearnerGroup(..., reference=True)) or put ref_logp into the batch"
        )
    from_forward = shard.old_logp is None
    normalizer = global_normalizer(shard, algo_cfg.loss_norm, reducer)  # over ALL rows, idle ones too
    probing = probe and shard.rollout_experts is not None  # the probe runs only with recorded routing
    keep = torch.ones(len(shard), dtype=torch.bool)  # (B,) rows that run forward and backward
    if skip_zero_signal and skip_is_exact(moe, probe=probing, model=model):
        keep = signal_rows(shard, algo_cfg)
    # no copy of the shard when every row runs (the common case without skipping)
    rows, idle = (
        (shard, shard.select(slice(0, 0))) if bool(keep.all()) else (shard.select(keep), shard.select(~keep))
    )
    stats = MetricSums(sums={SKIPPED: float(len(idle))})  # every rank holds every key
    forward = _MicroForward(model, algo_cfg, normalizer, device, ref_model, transform, stats)
    old_logp = torch.zeros(len(shard), shard.seq_len) if from_forward else None  # (B, L) pi_old out
    if from_forward:
        # pi_old of the idle rows is an output (the filter, the samples, the log-ratio record): a forward
        # without gradient. ZeRO-3 gathers parameters in every forward: ranks pad to one count here too.
        idle_ids = (~keep).nonzero().flatten()  # (b,) the shard's rows of `idle`
        with torch.no_grad():
            for m in padded_micro_batches(idle, split, reducer, pad_from=shard, at_least=0):
                _, mb, _ = forward(m.batch, pad=m.pad)
                _store_rows(old_logp, idle_ids, m, mb.old_logp)
    else:
        _collect_skipped(stats, idle, algo_cfg)
    micro = padded_micro_batches(rows, split, reducer, pad_from=shard)
    row_ids = keep.nonzero().flatten()  # (b,) the shard's rows of `rows`
    balance_coef = moe.balance_coef if moe is not None else 0.0
    real_tokens = 0.0  # the balancing loss's token weights: all ranks' real tokens, reduced only when used
    if balance_coef > 0.0:
        local = torch.tensor([float(shard.attention_mask.sum())], dtype=torch.float64)
        real_tokens = float(reducer.sum_(local))
    for i, m in enumerate(micro):
        sink.begin(is_last=i == len(micro) - 1)
        pad = m.pad
        loss, mb, scores = forward(m.batch, pad=pad)
        _store_rows(old_logp, row_ids, m, mb.old_logp)
        if scores.router_stats and balance_coef > 0.0:
            aux = balance_loss(scores.router_stats, moe.balance_groups if moe is not None else None)
            share = float(mb.attention_mask.sum()) / max(real_tokens, 1.0) if not pad else 0.0
            loss = loss + balance_coef * share * aux
            stats.add("moe/balance_loss", float(aux.detach()) * share)
        sink.backward(loss * reducer.world_size)
        if probe and mb.rollout_experts is not None and scores.router_stats:
            facts = _probe(model, mb, scores, transform)
            stats.merge(facts.zeros_like() if pad else facts)
    if old_logp is not None and old_logp_out is not None:
        old_logp_out.append(old_logp)
    return stats


@dataclass
class _MicroForward:
    """One micro-batch's scoring forward and policy loss (with or without gradient, as the caller runs
    it); its metrics and routing facts go to `stats`. A pad (an inert copy) adds zero-weight metrics and
    zero routing facts, so every rank holds the same keys and pads count nowhere."""

    model: Callable[..., object]
    algo_cfg: AlgorithmConfig
    normalizer: float
    device: torch.device | None
    ref_model: Callable[..., object] | None
    transform: SamplingTransform | None
    stats: MetricSums

    def __call__(self, mb: PolicyBatch, *, pad: bool) -> tuple[torch.Tensor, PolicyBatch, TokenScores]:
        """(loss, the micro-batch on the device with pi_old and pi_ref filled in, its scores)."""
        mb = _to(mb.trim(), self.device or torch.device("cpu"))
        if self.algo_cfg.kl_coef > 0.0 and self.ref_model is not None:
            with torch.no_grad():
                ref = score_tokens(
                    self.ref_model,
                    mb.input_ids,
                    mb.attention_mask,
                    with_entropy=False,
                    with_routing=False,
                    transform=self.transform,
                ).logp  # (b, l)
            mb = mb.replace(ref_logp=ref)
        scores = score_tokens(
            self.model,
            mb.input_ids,
            mb.attention_mask,
            transform=self.transform,
            routed_experts=mb.replay_experts,
        )
        if mb.old_logp is None:  # pi_old from this forward
            mb = mb.replace(old_logp=torch.where(mb.attention_mask.bool(), scores.logp.detach(), 0.0))
        # check_trainable: advantages are set, and old_logp is (from the batch, or from the forward above)
        assert mb.old_logp is not None and mb.advantages is not None
        loss, metrics = compute_policy_loss(
            self.algo_cfg,
            scores.logp,
            mb.old_logp,
            mb.rollout_logp,
            mb.advantages,
            mb.loss_mask,
            self.normalizer,
            filter_result=mb.filter,
            ref_logp=mb.ref_logp,
            entropy=scores.entropy,
        )
        if scores.router_stats:
            facts = _routing_facts(scores, mb)
            self.stats.merge(facts.zeros_like() if pad else facts)
        _collect(self.stats, metrics, mb, scores.routing_confidence)
        return loss, mb, scores


def _store_rows(
    out: torch.Tensor | None, ids: torch.Tensor, micro: Micro, values: torch.Tensor | None
) -> None:
    """Write a micro-batch's (b, l) `values` into `out` (B, L) at the shard rows `ids[micro.rows]` (`micro`
    was cut from the selection `ids` of the shard); a pad writes nothing."""
    if out is None or values is None or micro.pad:
        return
    out[ids[micro.rows], : values.shape[1]] = values.float().cpu()


def _routing_facts(scores: TokenScores, mb: PolicyBatch) -> MetricSums:
    """The forward's routing arrays; with replay, also how many token-layer decisions it overrode (the
    router's own top-k differs from the replayed experts)."""
    out = MetricSums()
    assert scores.router_stats is not None
    for k, v in routing_arrays(scores.router_stats, mb.attention_mask).items():
        out.add_array(k, v)
    if mb.replay_experts is not None:
        B, T = mb.input_ids.shape
        free = torch.stack([s.free_ids for s in scores.router_stats], dim=1).view(
            B, T, len(scores.router_stats), -1
        )
        differ, total = routing_mismatch(free, mb.replay_experts, mb.attention_mask)
        out.add("moe/replay_overridden", float(differ))
        out.add("moe/replay_decisions", float(total))
    return out


@torch.no_grad()
def _probe(model: Callable[..., object], mb: PolicyBatch, scores: TokenScores, transform: Any) -> MetricSums:
    """Routing mismatch (learner's own routing vs the engine's) and the log-prob gap to the engine with
    the engine's routing replayed and without replay; the training forward is reused for whichever of the
    two it was. Sums in `moe/probe_*` (every rank adds every key, inert micro-batches with zeros)."""
    assert mb.rollout_experts is not None
    out = MetricSums()
    replayed_rollout = mb.replay_experts is not None and torch.equal(mb.replay_experts, mb.rollout_experts)
    free = scores if mb.replay_experts is None else None
    replay = scores if replayed_rollout else None
    if free is None:
        free = score_tokens(model, mb.input_ids, mb.attention_mask, with_entropy=False, transform=transform)
    if replay is None:
        replay = score_tokens(
            model,
            mb.input_ids,
            mb.attention_mask,
            with_entropy=False,
            transform=transform,
            routed_experts=mb.rollout_experts,
        )
    assert free.expert_ids is not None
    differ, total = routing_mismatch(free.expert_ids, mb.rollout_experts, mb.attention_mask)
    out.add("moe/probe_routing_differ", float(differ))
    out.add("moe/probe_routing_total", float(total))
    for name, scored in (("free", free), ("replay", replay)):
        gap, n = logp_gap(scored.logp, mb.rollout_logp, mb.loss_mask)
        out.add(f"moe/probe_gap_{name}_sum", gap)
        out.add(f"moe/probe_gap_{name}_n", n)
    return out


def probe_metrics(sums: dict[str, float]) -> dict[str, float]:
    """The probe's ratios from its summed counts (popped from `sums`), and the share of replayed
    token-layer decisions that overrode the router's own choice (`moe/replay_overrides`)."""
    out: dict[str, float] = {}
    if "moe/replay_decisions" in sums:
        overridden, total = sums.pop("moe/replay_overridden"), sums.pop("moe/replay_decisions")
        out["moe/replay_overrides"] = overridden / total if total else 0.0
    if "moe/probe_routing_total" not in sums:
        return out
    differ, total = sums.pop("moe/probe_routing_differ"), sums.pop("moe/probe_routing_total")
    out["moe/routing_mismatch"] = differ / total if total else 0.0
    for name in ("free", "replay"):
        gap, n = sums.pop(f"moe/probe_gap_{name}_sum"), sums.pop(f"moe/probe_gap_{name}_n")
        out[f"moe/logp_gap_{name}"] = gap / n if n else 0.0
    return out


def _collect(
    stats: MetricSums, metrics: dict[str, float], mb: PolicyBatch, routing: torch.Tensor | None
) -> None:
    """Fold one micro-batch's metrics in. Every rank must create the same keys, in every micro-batch
    (inert ones included, with weight 0), or the all-reduce of the sums would not line up."""
    mask = mb.loss_mask.bool()  # (b, T)
    n_tok = float(mask.sum())
    for k, v in metrics.items():
        if k in SUMMED or k in COUNTED:
            stats.add(k, v)
        else:
            stats.add_weighted(k, v if n_tok else 0.0, n_tok)
    stats.add("batch/tokens", n_tok)
    stats.add("batch/sequences", float(mask.any(-1).sum()))
    if routing is not None:
        stats.add_weighted("actor/routing_confidence", float(routing[mask].mean()) if n_tok else 0.0, n_tok)


def _collect_skipped(stats: MetricSums, skipped: PolicyBatch, algo_cfg: AlgorithmConfig) -> None:
    """Fold in what the skipped rows' masks say without a forward: their tokens and sequences, their
    trained tokens for `actor/train_frac` (signal tokens: 0 by construction), and the MIS filter's metrics
    (the step's, or for a stateless filter computed here as `compute_policy_loss` would), weighted by their
    tokens as `_collect` weighs a micro-batch's."""
    mask = skipped.loss_mask.bool()  # (b, L)
    n_tok = float(mask.sum())
    stats.add("batch/tokens", n_tok)
    stats.add("batch/sequences", float(mask.any(-1).sum()))
    if not n_tok:
        return
    flt = skipped.filter
    if flt is None and algo_cfg.traj_filter_is_stateless:
        assert skipped.old_logp is not None  # a skip without a forward needs pi_old in the batch
        band = algo_cfg.traj_band if algo_cfg.traj_filter == "fixed" else None
        flt = apply_filters(skipped.old_logp, skipped.rollout_logp, mask, algo_cfg.token_band, band)
    trained = float(trainable_tokens(skipped.replace(filter=flt), algo_cfg).sum())
    stats.add_weighted("actor/train_frac", trained / n_tok, n_tok)
    for k, v in (flt.metrics if flt is not None else {}).items():
        stats.add_weighted(k, v, n_tok)


def _to(batch: PolicyBatch, device: torch.device) -> PolicyBatch:
    if device.type == "cpu":
        return batch
    moved = {k: v.to(device) for k, v in vars(batch).items() if isinstance(v, torch.Tensor)}
    flt = batch.filter
    if flt is not None:
        names = ("token_mask", "traj_mask", "combined", "log_ratio", "log_rho")
        flt = dataclasses.replace(flt, **{name: getattr(flt, name).to(device) for name in names})
    return batch.replace(**moved, filter=flt)


def iter_minibatches(batch: PolicyBatch, n: int) -> Iterator[PolicyBatch]:
    """The step's batch as `n` contiguous mini-batches (one optimizer step each)."""
    if n > len(batch):
        raise ValueError(f"learner.n_minibatches = {n} but the batch has only {len(batch)} rows")
    yield from batch.split(n)
