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
from typing import Any

from rlstack.rewards.judges.checkpoint import DEFAULT_JUDGE
from rlstack.rewards.judges.genrm import (
    check_columns,
    check_sampling,
    genrm_reward,
    judge_settings,
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
from rlstack.rewards.registry import RewardResult, call_reward_with_info, get_reward, register

logger = logging.getLogger(__name__)

COMBINES = ("subtract", "multiply")
OUTPUTS = ("combined", "adjustment")


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


@register("metarm")
def metarm_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    base: str = "genrm",
    base_options: dict[str, Any] | None = None,
    rationale: str = "auto",
    penalty: float = 0.5,
    combine: str = "subtract",
    output: str = "combined",
    right_threshold: float = 0.5,
    sound_threshold: float = 0.5,
    max_tokens: int = 64,
    temperature: float = 0.0,
    samples: int = 1,
    template: str | None = None,
    system_template: str | None = "system",
    model: str = DEFAULT_JUDGE,
    num_cpus: float = 1.0,
    threads: int | None = None,
    kv_cache_mb: int = 256,
    max_model_len: int = 1024,
    max_num_seqs: int = 32,
    seed: int = 0,
    **columns: Any,
) -> RewardResult:
    """Base reward, penalised where the verdict is right but the MetaRM judge finds the reasoning unsound;
    None where the base reward is None. The judge-engine options are those of `genrm`."""
    base_options = dict(base_options or {})
    if base == "metarm":
        raise ValueError("metarm: option base cannot be metarm itself")
    if combine not in COMBINES:
        raise ValueError(f"metarm: option combine must be one of {', '.join(COMBINES)}, got {combine!r}")
    if output not in OUTPUTS:
        raise ValueError(f"metarm: option output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    if not isinstance(penalty, int | float) or penalty < 0 or (combine == "multiply" and penalty > 1):
        raise ValueError(
            f"metarm: option penalty must be >= 0 (<= 1 with combine: multiply), got {penalty!r}"
        )
    source = ("judge" if base == "genrm" else "completion") if rationale == "auto" else rationale
    if source not in ("judge", "completion") and not source.startswith("column:"):
        raise ValueError(
            f"metarm: option rationale must be auto, judge, completion or column:NAME, got {rationale!r}"
        )
    if source == "judge" and base != "genrm":
        raise ValueError("metarm: rationale 'judge' needs base: genrm (a verifier has no judge text)")
    if source.startswith("column:") and source.removeprefix("column:") not in columns:
        raise ValueError(f"metarm: rationale {source!r} names a column the batch does not have")
    check_sampling("metarm", max_tokens, temperature, samples)
    check_columns("metarm", columns, len(completions))
    settings = judge_settings(
        "metarm", model, num_cpus, threads, kv_cache_mb, max_model_len, max_num_seqs, seed
    )
    name = template or ("metarm_self" if source == "completion" else "metarm")
    user = load_template(name)
    check_template(user, {"question", "response", "verdict", "rationale"}, name)
    system = load_template(system_template) if system_template else None

    base_scores, base_info = _base_scores(base, base_options, prompts, completions, columns)
    audited, conversations = [], []
    for i, score in enumerate(base_scores):
        if score is None or score < right_threshold:
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
        settings, conversations, n=samples, max_tokens=max_tokens, temperature=float(temperature)
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
        penalised = soundness is not None and soundness < sound_threshold
        base_score = float(base_scores[i])  # type: ignore[arg-type]
        scores[i] = apply_penalty(base_score, penalised, float(penalty), combine)
        info[i] = {
            **verdict_info(out.texts, soundness=soundness, penalised=penalised, truncated=out.truncated),
            "base": base_scores[i],
            "audited": True,
            "base_info": base_info[i],
        }
    if output == "adjustment":
        scores = [
            None if s is None or b is None else s - float(b) for s, b in zip(scores, base_scores, strict=True)
        ]
    return RewardResult(scores, info)
