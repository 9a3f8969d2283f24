"""What a reward plugin receives from the driver (`score_rollouts`), TRL-style: the original prompts,
plain or conversational completions, completion_ids and the columns; built-ins take both completion forms;
a failed sample is named by its prompt id."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from rlstack.data.prompts import rollout_prompt
from rlstack.model.tokenizer import build_tokenizer
from rlstack.rewards import RewardGroup, RewardSpec
from rlstack.rewards.config import RewardWorkersConfig
from rlstack.rewards.scoring import score_rollouts
from rlstack.types import Rollout

CHAT = [
    {"role": "system", "content": "Answer with a boxed number."},
    {"role": "user", "content": "What is 2+4?"},
]
ROWS = [
    {"prompt_id": "r1", "prompt": "What is 2+3?", "answer": "5", "level": 1},
    {"prompt_id": "r2", "prompt": CHAT, "answer": "6", "level": 2},
]
CALLS: list[dict[str, Any]] = []


def record(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    CALLS.append({"prompts": prompts, "completions": completions, **kwargs})
    return [1.0 for _ in completions]


def fails_on_chat(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    return [float(len(c.strip())) for c in completions]  # a list has no .strip(): conversational rows fail


def rollouts(texts: list[str], step: int = 0) -> list[Rollout]:
    """Rollouts as the rollout workers make them from the driver's prompts (no engine needed here)."""
    tok = build_tokenizer()
    out = []
    for i, (row, text) in enumerate(zip(ROWS, texts, strict=True)):
        prompt = rollout_prompt(tok, row, f"{step}:{i}:{row['prompt_id']}")
        ids = tok.encode(text, add_special_tokens=False)
        out.append(
            Rollout(
                prompt_id=prompt.prompt_id,
                prompt_ids=tok.encode(prompt.text, add_special_tokens=False),
                response_ids=ids,
                response_logprobs=[0.0] * len(ids),
                finish_reason="stop",
                version=0,
                prompt_text=prompt.text,
                response_text=text,
                columns=dict(prompt.columns),
            )
        )
    return out


def spec(fn: Any, **kw: Any) -> RewardSpec:
    return RewardSpec(import_path=f"{__name__}:{fn.__name__}", **kw)


def test_plugins_get_what_trl_passes() -> None:
    CALLS.clear()
    rewards = RewardGroup(specs=[spec(record)], config=RewardWorkersConfig(num_workers=0))
    batch = rollouts(["so \\boxed{5}", "so \\boxed{7}"])
    assert score_rollouts(rewards, batch).total == [1.0, 1.0]
    (call,) = CALLS
    assert call["prompts"] == ["What is 2+3?", CHAT]  # the originals, not the chat-templated text
    assert call["completions"] == ["so \\boxed{5}", [{"role": "assistant", "content": "so \\boxed{7}"}]]
    assert call["completion_ids"] == [r.response_ids for r in batch] and len(call["completion_ids"][0]) > 3
    assert call["answer"] == ["5", "6"] and call["level"] == [1, 2]
    # the prompt travels as `prompts` only; prompt ids only name failures; no trainer_state
    assert not {"prompt", "prompt_id", "sample_ids", "trainer_state"} & set(call)


def test_builtin_rewards_take_plain_and_conversational_completions() -> None:
    specs = [RewardSpec(name="math"), RewardSpec(name="preference", options={"label_column": "gold"})]
    group = RewardGroup.in_process(specs)
    batch = rollouts(["so \\boxed{5}", "so \\boxed{7}"])
    out = score_rollouts(group, batch)
    assert out.per_reward["math"] == [1.0, 0.0] and out.errors["math"] == 0
    assert out.per_reward["preference"] == [None, None]  # no gold column: does not apply
    chat = [[{"role": "assistant", "content": "[[B]]"}], "[[A]]"]
    ids = [[1, 2], [3]]
    assert group(["q", CHAT], chat, completion_ids=ids, gold=["B", "B"]).per_reward["preference"] == [
        1.0,
        0.0,
    ]
    puzzle = RewardGroup.in_process([RewardSpec(name="puzzle")])
    got = puzzle(
        [CHAT, CHAT],
        [
            [{"role": "assistant", "content": "\\boxed{2*3+4}"}],
            [{"role": "assistant", "content": "\\boxed{9}"}],
        ],
        completion_ids=ids,
        numbers=[[2, 3, 4]] * 2,
        target=[10, 10],
    )
    assert got.total == [1.0, 0.0]


def test_a_failed_sample_is_named_by_its_prompt_id(caplog: pytest.LogCaptureFixture) -> None:
    batch = rollouts(["so \\boxed{5}", "so \\boxed{7}"], step=3)
    for rewards in (
        RewardGroup.in_process([spec(fails_on_chat)]),
        RewardGroup.in_process([spec(fails_on_chat)], RewardWorkersConfig(num_workers=2, cache_size=0)),
    ):
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            out = score_rollouts(rewards, batch)
        label = spec(fails_on_chat).label
        assert out.per_reward[label] == [12.0, None] and out.errors[label] == 1
        assert out.info[label][1]["prompt_id"] == "3:1:r2"
        assert "AttributeError" in out.info[label][1]["error"]
        assert "failed on sample 1 (prompt 3:1:r2)" in caplog.text
