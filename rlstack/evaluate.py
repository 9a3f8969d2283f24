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

    def generate(
        self, prompts: list[Prompt], sampling: SamplingConfig | None = None, tools: bool = True
    ) -> list[Rollout]: ...


def accuracy(
    generator: Generator, tokenizer: Any, rewards: Scorer, rows: list[dict[str, Any]], cfg: RunConfig
) -> dict[str, float]:
    """Fraction of the scored responses the first configured reward scores as correct (> 0.5), per mode,
    and how many responses it could not score (`<mode>_unscored`: plugin error or time-out). With an
    `env:` also each mode's tool-call rate and turns per problem, and both modes without the tool
    (`<mode>_notool_accuracy`: single turns, a tool call is not run)."""
    from rlstack.data.prompts import rollout_prompt
    from rlstack.envs.registry import env_tool_schemas

    schemas = env_tool_schemas(cfg.env)
    template = cfg.data.chat_template
    prompts = [rollout_prompt(tokenizer, row, f"eval:{row['prompt_id']}", schemas, template) for row in rows]
    max_tokens = cfg.rollout.sampling.max_tokens
    modes = {
        "greedy": SamplingConfig(n=1, temperature=0.0, max_tokens=max_tokens),
        "sampled": SamplingConfig(
            n=cfg.eval.samples, temperature=cfg.eval.temperature, max_tokens=max_tokens, seed=cfg.trainer.seed
        ),
    }
    runs = [(mode, sampling, True) for mode, sampling in modes.items()]
    if cfg.env is not None:
        runs += [(f"{mode}_notool", sampling, False) for mode, sampling in modes.items()]
    label = cfg.rewards[0].label
    out = {"num_problems": float(len(rows))}
    for mode, sampling, tools in runs:
        rollouts = generator.generate(prompts, sampling, tools)
        if cfg.env is not None and tools:
            from rlstack.rollout.multiturn import episode_metrics

            found = episode_metrics(rollouts, prefix=f"{mode}_")
            out |= {k: found[k] for k in (f"{mode}_tool_call_rate", f"{mode}_turns_mean") if k in found}
        scores = score_rollouts(rewards, rollouts).per_reward[label]
        scored = [s for s in scores if s is not None]
        # unscored responses (the verifier failed or timed out) are reported apart, never counted wrong
        out[f"{mode}_accuracy"] = (
            sum(1.0 for s in scored if s > 0.5) / len(scored) if scored else float("nan")
        )
        out[f"{mode}_unscored"] = float(len(scores) - len(scored))
    return out
