"""The `genrm` reward: a generative judge model (served by its own vLLM Ray actor) grades completions.

Modes (reward option `mode`):
- `pointwise`: the judge reads the task and the completion and ends with `Score: N/10`; the reward is
  N/10 in [0, 1], averaged over `samples` verdicts.
- `pairwise`: the judge compares the completion with the row's reference answer (column
  `reference_column`, by default the task's worked `solution`) with A/B positions swapped across its
  `samples`; the verdicts give P(win) and the reward is the Bradley–Terry win rate within the prompt's
  group (`pairwise_reward: bradley_terry`, see rlstack.rewards.judges.pairwise) or P(win) itself
  (`win_rate`). The group is the completions of the prompt that arrive in the same call: all of them
  with one reward worker whose `chunk_size` holds the batch; a split group gets win rates within its part.

A judge reply with no readable verdict counts as a parse failure (logged with the raw text, counted in
`parsing.STATS` and the sample's info); a sample with no readable verdict at all scores None. The raw
judge text travels in `RewardResult.info` (key `judge`), where MetaRM reads it as the rationale.

    rewards:
      - {name: genrm, options: {mode: pairwise, samples: 4, temperature: 0.7}}
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from rlstack.rewards.judges.pairwise import grouped_bt_win_rates, swapped_wins, win_probability
from rlstack.rewards.judges.parsing import STATS, parse_score
from rlstack.rewards.judges.prompts import (
    check_template,
    clean_text,
    conversation,
    load_template,
    question_text,
    render,
)
from rlstack.rewards.judges.worker import DEFAULT_JUDGE, JudgeOutput, JudgeSettings, judge_generate
from rlstack.rewards.registry import RewardResult, register, split_options

logger = logging.getLogger(__name__)

INFO_CHARS = 400
"""Characters of each judge reply kept in the sample's info."""


class JudgeOptions(JudgeSettings):
    """Options every judge reward (genrm, metarm) takes: the judge's sampling and templates, and the
    engine's settings (`JudgeSettings`)."""

    max_tokens: int = Field(64, ge=1)
    """Tokens of each judge reply."""
    temperature: float = Field(0.0, ge=0.0)
    """Judge sampling temperature (0: greedy)."""
    template: str | None = None
    """The user-turn template: a built-in name or a file (None: the reward's default)."""
    system_template: str | None = "system"
    """The system-turn template (None: no system turn)."""

    def settings(self) -> JudgeSettings:
        """The judge engine these options ask for (equal settings share one judge actor)."""
        model = self.model
        if model != DEFAULT_JUDGE:  # the judge actor may run in another working directory
            model = str(Path(model).expanduser().resolve())
        return JudgeSettings(**{**self.engine(), "model": model})


class GenRMOptions(JudgeOptions):
    """Options of the `genrm` reward (see the module docstring)."""

    mode: Literal["pointwise", "pairwise"] = "pointwise"
    """pointwise: a 0-10 score per completion; pairwise: verdicts against the reference answer."""
    samples: int | None = Field(None, ge=1)
    """Verdicts per completion (default 1 pointwise, 2 pairwise: one per A/B order; with temperature 0 at
    most one per order, as greedy replies repeat)."""
    reference_column: str = "solution"
    """Pairwise: the column holding the reference answer."""
    pairwise_reward: Literal["bradley_terry", "win_rate"] = "bradley_terry"
    """Pairwise: the Bradley-Terry win rate within the prompt's group, or P(win) itself."""
    prior: float = Field(0.5, ge=0.0)
    """Pairwise: the prior α added to the wins in P(win)."""


def check_columns(name: str, columns: dict[str, Any], n: int) -> None:
    """Dataset columns arrive as lists; a scalar keyword can only be a misspelled option."""
    for key, value in columns.items():
        if isinstance(value, str | int | float | bool | dict) or value is None:
            raise ValueError(
                f"{name}: unknown option '{key}' (dataset columns are lists, one per completion)"
            )
        if isinstance(value, list | tuple) and len(value) != n:
            raise ValueError(f"{name}: column '{key}' has {len(value)} values for {n} completions")


def verdict_info(texts: Sequence[str], **extra: Any) -> dict[str, Any]:
    return {"judge": [t[:INFO_CHARS] for t in texts], **extra}


def log_failure(name: str, index: int, text: str) -> None:
    logger.warning("%s: no verdict in the judge's reply for sample %d: %r", name, index, text[:300])


@register("genrm", options=GenRMOptions)
def genrm_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> RewardResult:
    """Judge scores in [0, 1] (or None: no readable verdict / no reference), with the judge's text as info.
    Options: `GenRMOptions`; the other keywords are dataset columns."""
    options, columns = split_options(GenRMOptions, kwargs, "genrm")
    samples = options.samples or (1 if options.mode == "pointwise" else 2)
    check_columns("genrm", columns, len(completions))
    settings = options.settings()
    system = load_template(options.system_template) if options.system_template else None
    sampling = {"max_tokens": options.max_tokens, "temperature": options.temperature}
    template = options.template
    if options.mode == "pointwise":
        user = load_template(template or "pointwise")
        check_template(user, {"question", "response"}, template or "pointwise")
        return _pointwise(prompts, completions, settings, user, system, samples, sampling)
    user = load_template(template or "pairwise")
    check_template(user, {"question", "response_a", "response_b"}, template or "pairwise")
    reference_column = options.reference_column
    if reference_column not in columns:
        raise ValueError(
            f"genrm pairwise: no '{reference_column}' column to compare with (option reference_column); "
            f"columns: {', '.join(sorted(columns)) or '(none)'}"
        )
    p_win, info = pairwise_win_probabilities(
        prompts,
        completions,
        columns[reference_column],
        settings,
        user,
        system,
        samples,
        options.prior,
        sampling,
    )
    if options.pairwise_reward == "win_rate":
        return RewardResult(p_win, info)
    groups = [
        (question_text(p), clean_text(r)) for p, r in zip(prompts, columns[reference_column], strict=True)
    ]
    return RewardResult(grouped_bt_win_rates(p_win, groups), info)


def _pointwise(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    settings: JudgeSettings,
    user: str,
    system: str | None,
    samples: int,
    sampling: dict[str, Any],
) -> RewardResult:
    conversations = [
        conversation(render(user, question=question_text(p), response=clean_text(c)), system)
        for p, c in zip(prompts, completions, strict=True)
    ]
    outputs = judge_generate(settings, conversations, n=samples, **sampling)
    scores: list[float | None] = []
    info: list[dict[str, Any] | None] = []
    for i, out in enumerate(outputs):
        parsed = [parse_score(t) for t in out.texts]
        for text, value in zip(out.texts, parsed, strict=True):
            STATS.record("genrm", value is not None)
            if value is None:
                log_failure("genrm", i, text)
        readable = [v for v in parsed if v is not None]
        scores.append(sum(readable) / len(readable) if readable else None)
        info.append(verdict_info(out.texts, scores=parsed, truncated=out.truncated))
    return RewardResult(scores, info)


def pairwise_win_probabilities(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    references: Sequence[Any],
    settings: JudgeSettings,
    user: str,
    system: str | None,
    samples: int,
    prior: float,
    sampling: dict[str, Any],
) -> tuple[list[float | None], list[dict[str, Any] | None]]:
    """P(completion beats reference) per sample, from verdicts in both A/B orders; None without one."""
    greedy = sampling["temperature"] == 0
    n_first = 1 if greedy else (samples + 1) // 2  # completion shown as A
    n_second = min(1, samples // 2) if greedy else samples // 2  # completion shown as B
    rows = [i for i, r in enumerate(references) if r is not None and clean_text(r)]
    first, second = [], []
    for i in rows:
        q, c, r = question_text(prompts[i]), clean_text(completions[i]), clean_text(references[i])
        first.append(conversation(render(user, question=q, response_a=c, response_b=r), system))
        second.append(conversation(render(user, question=q, response_a=r, response_b=c), system))
    as_a = judge_generate(settings, first, n=n_first, **sampling)
    as_b = (
        judge_generate(settings, second, n=n_second, **sampling)
        if n_second
        else [JudgeOutput([])] * len(rows)
    )
    p_win: list[float | None] = [None] * len(completions)
    info: list[dict[str, Any] | None] = [{"skipped": "no reference answer"} for _ in completions]
    for i, out_a, out_b in zip(rows, as_a, as_b, strict=True):
        wins = swapped_wins(out_a.texts, out_b.texts)
        for text, win in zip(out_a.texts + out_b.texts, wins, strict=True):
            STATS.record("genrm", win is not None)
            if win is None:
                log_failure("genrm", i, text)
        p_win[i] = win_probability(wins, prior)
        info[i] = verdict_info(
            out_a.texts + out_b.texts, wins=wins, p_win=p_win[i], truncated=out_a.truncated or out_b.truncated
        )
    return p_win, info
