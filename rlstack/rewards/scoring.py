"""How the trainer calls the rewards, in one place: TRL-style arguments built from samples
(`score_samples`, `score_rollouts`), and what a sample's result means (`sample_info`, `unscored_reason`).

The driver, `rlstack eval` and `rlstack rewards try` all score through here and a `RewardGroup`, so a plugin
author sees exactly what training sees.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from rlstack.data.prompts import PromptValue, is_conversational, reward_prompt
from rlstack.rewards.registry import CALL_ARGS, CombinedRewards

if TYPE_CHECKING:
    from rlstack.types import Rollout

ENVIRONMENTS = "environments"
"""The keyword under which reward functions get multi-turn episodes' environment instances (TRL's)."""
ENV_LABEL = "env"
"""How a sample's details name a failed episode (its sandbox broke): such a sample is never scored."""
RESERVED = (*CALL_ARGS, "sample_ids", ENVIRONMENTS)
"""Never passed as columns: what every call passes itself (as TRL leaves out `completion_ids`)."""


class Scorer(Protocol):
    """A `RewardGroup` (or anything called like one)."""

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        *,
        sample_ids: Sequence[str] | None = None,
        **columns: Any,
    ) -> CombinedRewards: ...


def score_samples(
    rewards: Scorer,
    prompts: Sequence[PromptValue],
    columns: Sequence[Mapping[str, Any]],
    texts: Sequence[str],
    completion_ids: Sequence[Sequence[int]],
    sample_ids: Sequence[str],
    messages: Sequence[list[dict[str, Any]] | None] | None = None,
    extra: Mapping[str, list[Any]] | None = None,
) -> Any:
    """Call `rewards` as TRL's GRPOTrainer calls reward functions: `prompts` (each row's original prompt:
    the string, or a conversational row's message list), `completions` (the text, or
    `[{"role": "assistant", "content": text}]` for a conversational prompt), `completion_ids` (the response
    token ids) and every other column as a keyword list aligned with the samples (None where a row lacks it;
    a column named like a call argument is left out). `sample_ids` (prompt ids) only name failed samples.
    No `trainer_state` (see rlstack.rewards.registry): a score depends on the sample alone. A multi-turn
    sample's completion is its `messages` (assistant turns with tool calls, tool results), as in TRL;
    `extra` adds keyword lists (e.g. `environments`)."""
    messages = messages or [None] * len(texts)
    completions = [
        m if m is not None else [{"role": "assistant", "content": text}] if is_conversational(p) else text
        for p, text, m in zip(prompts, texts, messages, strict=True)
    ]
    names = sorted({k for row in columns for k in row if k not in RESERVED})
    return rewards(
        list(prompts),
        completions,
        completion_ids=[list(ids) for ids in completion_ids],
        sample_ids=list(sample_ids),
        **{k: [row.get(k) for row in columns] for k in names},
        **(extra or {}),
    )


def score_rollouts(rewards: Scorer, rollouts: Sequence[Rollout]) -> Any:
    """`score_samples` over rollouts: each one's original prompt and columns (`reward_prompt`), response text
    and token ids, prompt id; for multi-turn episodes their messages and, as `environments=`, their
    environment instances. An episode that failed (its sandbox broke) gets no reward."""
    pairs = [reward_prompt(r.columns, r.prompt_text) for r in rollouts]
    episodic = any(r.episode is not None for r in rollouts)
    result = score_samples(
        rewards,
        [prompt for prompt, _ in pairs],
        [columns for _, columns in pairs],
        [r.response_text for r in rollouts],
        [r.response_ids for r in rollouts],
        [r.prompt_id for r in rollouts],
        messages=[r.episode.messages if r.episode else None for r in rollouts] if episodic else None,
        extra={ENVIRONMENTS: [r.episode.environment if r.episode else None for r in rollouts]}
        if episodic
        else None,
    )
    failed = [i for i, r in enumerate(rollouts) if r.episode is not None and r.episode.error]
    if failed:
        result.info = dict(result.info or {})
        details: list[dict[str, Any] | None] = [None] * len(rollouts)
        for i in failed:
            result.total[i] = None
            details[i] = {"error": f"the episode failed: {rollouts[i].episode.error}"}  # type: ignore[union-attr]
        result.info[ENV_LABEL] = details
    return result


def sample_info(result: CombinedRewards, i: int) -> dict[str, Any]:
    """Sample `i`'s reward details by label, the plugins that gave none left out."""
    return {label: info[i] for label, info in (result.info or {}).items() if info[i] is not None}


def unscored_reason(details: dict[str, Any]) -> str:
    """Why a sample has no reward, from its per-reward details: the plugins' errors and time-outs, or
    that no configured reward applies to it.

    >>> unscored_reason({"math": {"error": "ValueError: bad"}, "puzzle": {"timeout": 2.0}})
    'math: ValueError: bad; puzzle: timeout: 2.0'
    """
    reasons = [
        f"{label}: {d['error'] if 'error' in d else 'timeout: ' + str(d['timeout'])}"
        for label, d in details.items()
        if isinstance(d, dict) and ("error" in d or "timeout" in d)
    ]
    return "; ".join(reasons) if reasons else "no configured reward applies (every reward returned None)"
