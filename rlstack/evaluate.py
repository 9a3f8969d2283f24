"""Held-out accuracy of a policy with vLLM: greedy, and sampled (several responses per problem)."""

from __future__ import annotations

from typing import Any, Protocol

from rlstack.config import RunConfig
from rlstack.rollout.config import SamplingConfig
from rlstack.rollout.worker import Prompt
from rlstack.types import Rollout


class Generator(Protocol):
    """A RolloutGroup (Ray actors) or a RolloutWorker used in-process."""

    def generate(self, prompts: list[Prompt], sampling: SamplingConfig | None = None) -> list[Rollout]: ...


def accuracy(
    generator: Generator, tokenizer: Any, rewards: Any, rows: list[dict[str, Any]], cfg: RunConfig
) -> dict[str, float]:
    """Fraction of responses the first configured reward scores as correct (> 0.5)."""
    from rlstack.driver import render_prompt, score_rollouts

    prompts = [
        Prompt(
            prompt_id=f"eval:{row['prompt_id']}",
            text=render_prompt(tokenizer, row["prompt"]),
            columns={k: v for k, v in row.items() if k not in ("prompt", "prompt_id")},
        )
        for row in rows
    ]
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
        out[f"{mode}_accuracy"] = sum(1.0 for s in scores if s is not None and s > 0.5) / len(scores)
    return out
