"""`PolicyBatch`: a step's rollouts as right-padded tensors, and `collate` to build one.

Position convention (one index space for everything): row b holds prompt + response in
`input_ids[b, :n_b]`, right-padded. Every per-token tensor is (B, L) and scores the token AT its position:
`rollout_logp[b, t] = log pi_rollout(input_ids[b, t] | input_ids[b, :t])`. So the model's logits at t - 1
score position t, position 0 is never scored, and `loss_mask` is 1 exactly on policy-generated tokens
(prompt, padding and tool/environment tokens are 0). Every field is a plain tensor (or a `FilterResult`
of plain tensors), so a batch pickles through Ray's object store as is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rlstack.mispo.filters import FilterResult
from rlstack.types import Rollout

Rows = slice | Sequence[int] | torch.Tensor

# (B, L) tensors, then (B,) tensors: what select/cat/trim carry along
_TOKEN_FIELDS = (
    "input_ids",
    "attention_mask",
    "loss_mask",
    "rollout_logp",
    "old_logp",
    "advantages",
    "ref_logp",
    "returns",
    "token_versions",
    "rollout_experts",
    "replay_experts",
)
_SEQ_FIELDS = ("rewards", "group_ids", "truncated")
_ALL_FIELDS = (*_TOKEN_FIELDS, *_SEQ_FIELDS)


@dataclass
class PolicyBatch:
    """B sequences of length L (prompt + response, right-padded). See the module docstring for positions."""

    input_ids: torch.Tensor  # (B, L) long, pad_id after the last real token
    attention_mask: torch.Tensor  # (B, L) long, 1 on real tokens (prompt and response)
    loss_mask: torch.Tensor  # (B, L) float, 1 on policy-generated tokens only
    rollout_logp: torch.Tensor  # (B, L) float, log pi_rollout of generated tokens, 0 elsewhere
    rewards: torch.Tensor  # (B,) float, NaN where the rollout has no reward yet
    group_ids: torch.Tensor  # (B,) long, equal for the samples of one prompt
    truncated: torch.Tensor  # (B,) bool, generation hit the length limit
    token_versions: torch.Tensor  # (B, L) long, weights version that generated token t (0 off the response)
    old_logp: torch.Tensor | None = None  # (B, L) log pi_old (learner recompute), 0 off the loss mask
    advantages: torch.Tensor | None = None  # (B, L) A_t, 0 off the loss mask
    ref_logp: torch.Tensor | None = None  # (B, L) log pi_ref, only for the KL penalty
    filter: FilterResult | None = None  # the step's MIS filter output for these rows, (B, L) masks
    returns: torch.Tensor | None = None  # (B, L) critic targets R_t, 0 off the loss mask (critic only)
    rollout_experts: torch.Tensor | None = None  # (B, L, n_moe, k) int16: experts the engine used, -1 none
    replay_experts: torch.Tensor | None = None  # (B, L, n_moe, k) int16: experts the training forward
    # must use (routing replay: the engine's or pi_old's), -1 = the router chooses

    def oldest_versions(self) -> torch.Tensor:
        """(B,) long: the oldest weights version among each row's trained tokens (row max where it has
        none, so an empty row never looks stale)."""
        mask = self.loss_mask.bool()  # (B, L)
        big = torch.iinfo(torch.long).max
        oldest = torch.where(mask, self.token_versions, big).amin(-1)  # (B,)
        return torch.where(mask.any(-1), oldest, self.token_versions.amax(-1))

    def without_unscored(self) -> PolicyBatch:
        """The same rows, with the loss mask of every unscored row (reward NaN: no reward applied) set to
        0: such a sample trains nothing, counts in no loss denominator or filter statistic, and (with
        `mispo.group_advantages`, which skips NaN rewards) stays out of its group's mean and std."""
        scored = torch.isfinite(self.rewards)  # (B,)
        if bool(scored.all()):
            return self
        return self.replace(loss_mask=self.loss_mask * scored[:, None].to(self.loss_mask.dtype))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def replace(self, **fields: Any) -> PolicyBatch:
        """A copy with some fields replaced (tensors are shared, not copied)."""
        return dataclasses.replace(self, **fields)

    def select(self, rows: Rows) -> PolicyBatch:
        """The batch restricted to `rows` (a slice, a list of indices or an index/bool tensor), same L."""
        if not isinstance(rows, slice | torch.Tensor):
            rows = torch.as_tensor(list(rows), dtype=torch.long)
        out: dict[str, Any] = {name: _index(getattr(self, name), rows) for name in _ALL_FIELDS}
        return PolicyBatch(**out, filter=None if self.filter is None else self.filter.select(rows))

    def split(self, n: int) -> list[PolicyBatch]:
        """n contiguous shards whose sizes differ by at most one (earlier shards larger; some may be empty
        when n > B). Concatenating them in order gives the batch back."""
        if n < 1:
            raise ValueError(f"cannot split a batch into {n} shards")
        base, extra = divmod(len(self), n)
        out, start = [], 0
        for i in range(n):
            size = base + (1 if i < extra else 0)
            out.append(self.select(slice(start, start + size)))
            start += size
        return out

    def chunks(self, size: int) -> list[PolicyBatch]:
        """Contiguous micro-batches of at most `size` rows (none for an empty batch)."""
        if size < 1:
            raise ValueError(f"micro-batch size must be >= 1, got {size}")
        return [self.select(slice(i, i + size)) for i in range(0, len(self), size)]

    def trim(self) -> PolicyBatch:
        """Drop trailing columns that are padding in every row (saves compute; results are unchanged
        because attention is causal and right padding follows every real token)."""
        used = int(self.attention_mask.sum(-1).max()) if len(self) else 0
        if used >= self.seq_len:
            return self
        cols = slice(0, max(used, 1))
        out: dict[str, Any] = {name: _index_cols(getattr(self, name), cols) for name in _TOKEN_FIELDS}
        out |= {name: getattr(self, name) for name in _SEQ_FIELDS}
        flt = None
        if self.filter is not None:
            flt = dataclasses.replace(
                self.filter,
                token_mask=self.filter.token_mask[:, cols],
                combined=self.filter.combined[:, cols],
                log_ratio=self.filter.log_ratio[:, cols],
            )
        return PolicyBatch(**out, filter=flt)

    @staticmethod
    def cat(batches: Sequence[PolicyBatch]) -> PolicyBatch:
        """Concatenate batches of the same L along rows (optional fields: all set or all None)."""
        if not batches:
            raise ValueError("PolicyBatch.cat needs at least one batch")
        lengths = {b.seq_len for b in batches}
        if len(lengths) != 1:
            raise ValueError(
                f"PolicyBatch.cat: sequence lengths differ {sorted(lengths)}; pad to one L first"
            )
        out: dict[str, Any] = {name: _cat([getattr(b, name) for b in batches], name) for name in _ALL_FIELDS}
        filters = [b.filter for b in batches]
        flt = None
        if any(f is not None for f in filters):
            if any(f is None for f in filters):
                raise ValueError("PolicyBatch.cat: some batches carry a filter result and some do not")
            first = filters[0]
            assert first is not None
            masks: dict[str, Any] = {
                name: torch.cat([getattr(f, name) for f in filters])
                for name in ("token_mask", "traj_mask", "combined", "log_ratio", "log_rho")
            }
            flt = dataclasses.replace(first, **masks)
        return PolicyBatch(**out, filter=flt)

    def inert_copy(self) -> PolicyBatch:
        """The same rows with nothing to train: loss mask zero everywhere. Used to pad a rank's work so
        every rank runs the same number of forward/backward passes (ZeRO collectives need it)."""
        flt = self.filter
        if flt is not None:
            flt = dataclasses.replace(flt, combined=torch.zeros_like(flt.combined))
        return self.replace(loss_mask=torch.zeros_like(self.loss_mask), filter=flt)


def _index(t: torch.Tensor | None, rows: slice | torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t[rows]


def _index_cols(t: torch.Tensor | None, cols: slice) -> torch.Tensor | None:
    return None if t is None else t[:, cols]


def _cat(tensors: list[torch.Tensor | None], name: str) -> torch.Tensor | None:
    present = [t is not None for t in tensors]
    if not any(present):
        return None
    if not all(present):
        raise ValueError(f"PolicyBatch.cat: field {name} is set in some batches and None in others")
    return torch.cat([t for t in tensors if t is not None])


def _collate_routes(rollouts: Sequence[Rollout], L: int) -> torch.Tensor | None:
    """(B, L, n_moe, k) int16 of the rollouts' recorded routing (-1 where none), or None if none has any."""
    have = [r.routed_experts is not None for r in rollouts]
    if not any(have):
        return None
    if not all(have):
        missing = sorted({r.prompt_id for r in rollouts if r.routed_experts is None})
        raise ValueError(
            f"collate: {len(missing)} of {len(rollouts)} rollouts carry no routed experts (e.g. prompt "
            f"{missing[0]}) while others do: the engines must all record routing or none"
        )
    first = rollouts[0].routed_experts
    out = torch.full((len(rollouts), L, *first.shape[1:]), -1, dtype=torch.int16)
    for b, r in enumerate(rollouts):
        routes = np.asarray(r.routed_experts)  # (n_b, n_moe, k) compact: uint8 (255 = none) or int16 (-1)
        wide = routes.astype(np.int16)
        if routes.dtype.kind == "u":
            wide[routes == np.iinfo(routes.dtype).max] = -1
        out[b, : routes.shape[0]] = torch.from_numpy(wide)
    return out


def collate(rollouts: Sequence[Rollout], pad_id: int) -> PolicyBatch:
    """Stack rollouts into a right-padded `PolicyBatch` (see the module docstring for positions).

    Group ids number distinct `prompt_id`s in order of first appearance. Tool/environment tokens
    (`response_mask == 0`) are attended to but never trained and carry rollout log-prob 0.
    """
    if not rollouts:
        raise ValueError("collate: no rollouts to batch")
    for r in rollouts:
        if not r.prompt_ids:
            raise ValueError(
                f"collate: rollout {r.prompt_id} has an empty prompt; the first response token would have "
                "no context to be scored from (add a BOS token to the prompt)"
            )
    B = len(rollouts)
    L = max(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    loss_mask = torch.zeros(B, L, dtype=torch.float32)
    rollout_logp = torch.zeros(B, L, dtype=torch.float32)
    token_versions = torch.zeros(B, L, dtype=torch.long)
    group_of: dict[str, int] = {}
    for b, r in enumerate(rollouts):
        p, n = len(r.prompt_ids), len(r.prompt_ids) + len(r.response_ids)
        input_ids[b, :n] = torch.tensor([*r.prompt_ids, *r.response_ids], dtype=torch.long)
        attention_mask[b, :n] = 1
        if n > p:
            mask = torch.tensor(r.response_mask, dtype=torch.float32)  # (n - p,)
            loss_mask[b, p:n] = mask
            logp = torch.tensor(r.response_logprobs, dtype=torch.float32)  # (n - p,)
            rollout_logp[b, p:n] = torch.where(mask.bool(), logp, 0.0)
            token_versions[b, p:n] = torch.tensor(r.response_versions, dtype=torch.long)
        group_of.setdefault(r.prompt_id, len(group_of))
    return PolicyBatch(
        rollout_experts=_collate_routes(rollouts, L),
        input_ids=input_ids,
        attention_mask=attention_mask,
        loss_mask=loss_mask,
        rollout_logp=rollout_logp,
        rewards=torch.tensor([float("nan") if r.reward is None else r.reward for r in rollouts]),
        group_ids=torch.tensor([group_of[r.prompt_id] for r in rollouts], dtype=torch.long),
        truncated=torch.tensor([r.truncated for r in rollouts], dtype=torch.bool),
        token_versions=token_versions,
    )
