"""The `metarm` reward: a second judge pass that audits the reasoning behind a verdict.

A base reward gives the verdict (`base`: `genrm`, or any registered verifier such as `math` or
`preference`, with `base_options`). Where the verdict is right (base score >= `right_threshold`), the
MetaRM judge reads the task, the response and the rationale and says whether the reasoning is sound;
when it is not (soundness < `sound_threshold`) the verdict was right for the wrong reasons and the
reward is penalised:

    combine: subtract   reward = base - penalty
    combine: multiply   reward = base * (1 - penalty)

`output: combined` returns that reward; `output: adjustment` returns only reward - base (0 or negative),
to be summed with the base reward listed on its own (its metrics then show both terms).

The rationale (`rationale`): `judge` = the GenRM judge's own reply (base genrm), `completion` = the
response's own reasoning (a verifier base; or the policy *is* a judge being trained, whose completion
holds its verdict and its rationale), `column:NAME` = a dataset column. `auto` picks `judge` for a genrm
base, else `completion`. An unreadable MetaRM reply never penalises: the sample keeps its base reward,
and the failure is logged and counted.

Training a GenRM with rlstack (configs/genrm.yaml): the policy answers preference questions with
`[[A]]`/`[[B]]` and a short rationale; reward = `preference` (1 for the gold choice) + `metarm` with
`base: preference, output: adjustment` (minus the penalty for a right choice with unsound reasoning).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from rlstack.rewards.judges.genrm import (
    JudgeOptions,
    check_columns,
    genrm_reward,
    log_failure,
    verdict_info,
)
from rlstack.rewards.judges.parsing import STATS, parse_soundness
from rlstack.rewards.judges.prompts import (
    check_template,
    clean_text,
    conversation,
    load_template,
    question_text,
    render,
)
from rlstack.rewards.judges.worker import judge_generate
from rlstack.rewards.registry import (
    RewardResult,
    call_reward_with_info,
    get_reward,
    options_model,
    parse_options,
    register,
    split_options,
)

logger = logging.getLogger(__name__)


class MetaRMOptions(JudgeOptions):
    """Options of the `metarm` reward (see the module docstring), besides the judge's (`JudgeOptions`)."""

    base: str = "genrm"
    """The registered reward giving the verdict: genrm, or a verifier such as math or preference."""
    base_options: dict[str, Any] = Field(default_factory=dict)
    """Options of the base reward, checked against its options model."""
    rationale: str = "auto"
    """auto | judge | completion | column:NAME: where the reasoning to audit comes from."""
    penalty: float = 0.5
    """Taken off a right verdict whose reasoning is unsound (<= 1 with combine: multiply)."""
    combine: Literal["subtract", "multiply"] = "subtract"
    """reward = base - penalty, or base * (1 - penalty)."""
    output: Literal["combined", "adjustment"] = "combined"
    """The combined reward, or only reward - base (to be summed with the base reward listed on its own)."""
    right_threshold: float = 0.5
    """A base score at least this counts as a right verdict (audited)."""
    sound_threshold: float = 0.5
    """Soundness below this penalises."""
    samples: int = Field(1, ge=1)
    """MetaRM verdicts per audited sample."""

    @property
    def source(self) -> str:
        """The rationale with `auto` resolved: `judge` for a genrm base, else `completion`."""
        if self.rationale == "auto":
            return "judge" if self.base == "genrm" else "completion"
        return self.rationale

    @field_validator("base")
    @classmethod
    def _known_base(cls, base: str) -> str:
        if base == "metarm":
            raise ValueError("metarm cannot be its own base")
        get_reward(base)  # an unknown name fails here, naming the rewards there are
        return base

    @field_validator("base_options")
    @classmethod
    def _base_options(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        base = info.data.get("base")
        model = options_model(get_reward(base)) if base is not None else None
        if base is not None and model is not None:
            parse_options(model, options, base)
        return options

    @model_validator(mode="after")
    def _check(self) -> MetaRMOptions:
        if self.penalty < 0 or (self.combine == "multiply" and self.penalty > 1):
            raise ValueError(
                f"option penalty must be >= 0 (<= 1 with combine: multiply), got {self.penalty!r}"
            )
        if self.source not in ("judge", "completion") and not self.source.startswith("column:"):
            raise ValueError(
                f"option rationale must be auto, judge, completion or column:NAME, got {self.rationale!r}"
            )
        if self.source == "judge" and self.base != "genrm":
            raise ValueError("rationale 'judge' needs base: genrm (a verifier has no judge text)")
        return self


def apply_penalty(base: float, penalised: bool, penalty: float, combine: str) -> float:
    """The combined reward (see the module docstring).

    >>> apply_penalty(1.0, True, 0.5, "subtract"), apply_penalty(0.8, True, 0.25, "multiply")
    (0.5, 0.6000000000000001)
    """
    if not penalised:
        return base
    return base - penalty if combine == "subtract" else base * (1.0 - penalty)


def _base_scores(
    base: str, base_options: dict[str, Any], prompts: Sequence[Any], completions: Sequence[Any], columns: Any
) -> tuple[list[float | None], list[dict[str, Any] | None]]:
    if base == "genrm":
        result = genrm_reward(prompts, completions, **base_options, **columns)
        return result.scores, result.info
    fn = get_reward(base)
    if base_options:
        fn = functools.partial(fn, **base_options)
    return call_reward_with_info(fn, prompts, completions, name=base, **columns)


def _rationale(source: str, i: int, completion: Any, base_info: dict[str, Any] | None, columns: Any) -> str:
    if source == "completion":
        return clean_text(completion)
    if source == "judge":
        texts = (base_info or {}).get("judge") or []
        return clean_text(texts[0]) if texts else ""
    return clean_text(columns[source.removeprefix("column:")][i])


@register("metarm", options=MetaRMOptions)
def metarm_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> RewardResult:
    """Base reward, penalised where the verdict is right but the MetaRM judge finds the reasoning unsound;
    None where the base reward is None. Options: `MetaRMOptions`; the other keywords are dataset columns."""
    options, columns = split_options(MetaRMOptions, kwargs, "metarm")
    source = options.source
    if source.startswith("column:") and source.removeprefix("column:") not in columns:
        raise ValueError(f"metarm: rationale {source!r} names a column the batch does not have")
    check_columns("metarm", columns, len(completions))
    settings = options.settings()
    name = options.template or ("metarm_self" if source == "completion" else "metarm")
    user = load_template(name)
    check_template(user, {"question", "response", "verdict", "rationale"}, name)
    system = load_template(options.system_template) if options.system_template else None
    base_scores, base_info = _base_scores(options.base, options.base_options, prompts, completions, columns)
    audited, conversations = [], []
    for i, score in enumerate(base_scores):
        if score is None or score < options.right_threshold:
            continue
        text = _rationale(source, i, completions[i], base_info[i], columns)
        if not text:
            continue
        fields = {
            "question": question_text(prompts[i]),
            "response": clean_text(completions[i]),
            "verdict": f"right (reward {score:.2g})",
            "rationale": text,
        }
        audited.append(i)
        conversations.append(conversation(render(user, **fields), system))
    outputs = judge_generate(
        settings,
        conversations,
        n=options.samples,
        max_tokens=options.max_tokens,
        temperature=options.temperature,
    )

    scores: list[float | None] = [None if s is None else float(s) for s in base_scores]
    info: list[dict[str, Any] | None] = [
        {"base": s, "audited": False, "base_info": b} for s, b in zip(base_scores, base_info, strict=True)
    ]
    for i, out in zip(audited, outputs, strict=True):
        parsed = [parse_soundness(t) for t in out.texts]
        for text, value in zip(out.texts, parsed, strict=True):
            STATS.record("metarm", value is not None)
            if value is None:
                log_failure("metarm", i, text)
        readable = [v for v in parsed if v is not None]
        soundness = sum(readable) / len(readable) if readable else None
        penalised = soundness is not None and soundness < options.sound_threshold
        base_score = float(base_scores[i])  # type: ignore[arg-type]
        scores[i] = apply_penalty(base_score, penalised, options.penalty, options.combine)
        info[i] = {
            **verdict_info(out.texts, soundness=soundness, penalised=penalised, truncated=out.truncated),
            "base": base_scores[i],
            "audited": True,
            "base_info": base_info[i],
        }
    if options.output == "adjustment":
        scores = [
            None if s is None or b is None else s - float(b) for s, b in zip(scores, base_scores, strict=True)
        ]
    return RewardResult(scores, info)
