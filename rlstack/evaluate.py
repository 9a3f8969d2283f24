"""Held-out accuracy of a policy with vLLM: greedy, and sampled (several responses per problem)."""

from __future__ import annotations

from typing import Any, Protocol

from rlstack.config import RunConfig
from rlstack.rewards.scoring import Scorer, score_rollouts
from rlstack.rollout.config import SamplingConfig
from rlstack.rollout.worker import Prompt
from rlstack.types import Rollout


class Generator(Protocol):
    """A RolloutGroup (Ray actors) or a RolloutWorker used in-process."""

    def generate(self, prompts: list[Prompt], sampling: SamplingConfig | None = None) -> list[Rollout]: ...


def accuracy(
    generator: Generator, tokenizer: Any, rewards: Scorer, rows: list[dict[str, Any]], cfg: RunConfig
) -> dict[str, float]:
    """Fraction of the scored responses the first configured reward scores as correct (> 0.5), per mode,
    and how many responses it could not score (`<mode>_unscored`: plugin error or time-out)."""
    from rlstack.data.prompts import rollout_prompt

    prompts = [rollout_prompt(tokenizer, row, f"eval:{row['prompt_id']}") for row in rows]
    max_tokens = cfg.rollout.sampling.max_tokens
    modes = {
        "greedy": SamplingConfig(n=1, temperature=0.0, max_tokens=max_tokens),
        "sampled": SamplingConfig(
            n=cfg.eval.samples, temperature=cfg.eval.temperature, max_tokens=max_tokens, seed=cfg.trainer.seed
        ),
    }
    label = cfg.rewards[0].label
    out = {"num_problems": float(len(rows))}
    for mode, sampling in modes.items():
        scores = score_rollouts(rewards, generator.generate(prompts, sampling)).per_reward[label]
        scored = [s for s in scores if s is not None]
        # unscored responses (the verifier failed or timed out) are reported apart, never counted wrong
        out[f"{mode}_accuracy"] = (
            sum(1.0 for s in scored if s > 0.5) / len(scored) if scored else float("nan")
        )
        out[f"{mode}_unscored"] = float(len(scores) - len(scored))
    return out
