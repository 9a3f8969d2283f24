"""RewardGroup on real Ray actors: sample routing and the cache, a worker that crashes or hangs is replaced
while the batch still comes back, and TRL's own reward functions score the driver's batches unchanged."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import pytest

from rlstack.data.prompts import rollout_prompt
from rlstack.model.tokenizer import build_tokenizer
from rlstack.rewards.config import RewardSpec, RewardWorkersConfig
from rlstack.rewards.group import RewardGroup
from rlstack.rewards.scoring import score_rollouts
from rlstack.types import Rollout

pytestmark = [pytest.mark.ray]

TOY = Path(__file__).parent


@pytest.fixture(scope="module")
def ray_local():
    import ray

    sys.path.insert(0, str(TOY))
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(TOY)}},
    )
    yield
    ray.shutdown()
    sys.path.remove(str(TOY))


def test_samples_are_routed_to_the_same_worker_so_the_cache_hits(ray_local) -> None:
    group = RewardGroup(
        [RewardSpec(import_path="toy_rewards:digit_fraction")],
        RewardWorkersConfig(num_workers=2, chunk_size=3),
    )
    try:
        completions = [f"a{i}b" for i in range(10)]
        prompts = [f"p{i % 5}" for i in range(10)]
        first = group(prompts, completions)
        assert first.total == [pytest.approx(1 / 3)] * 10 and first.cache_hits == 0
        second = group([*reversed(prompts), "p0", "p1"], [*reversed(completions), "xx", "7"])
        assert second.cache_hits == 10
        assert second.total == [pytest.approx(1 / 3)] * 10 + [0.0, 1.0]
    finally:
        group.shutdown()


def test_a_crashed_worker_costs_its_samples_and_is_replaced(ray_local) -> None:
    specs = [RewardSpec(import_path="toy_rewards:exits_the_process")]
    group = RewardGroup(specs, RewardWorkersConfig(num_workers=1, chunk_size=2))
    try:
        out = group(["p"] * 4, ["ok", "crash", "fine", "good"])
        label = specs[0].label
        # The chunk holding 'crash' was lost with the process, and again on the replacement (scored once
        # more, crashed again): its samples score None; both workers were replaced.
        assert out.workers_restarted == 2
        assert out.errors[label] >= 2 and out.per_reward[label].count(None) == out.errors[label]
        assert all(info["error"].startswith("reward worker lost") for info in out.info[label] if info)
        assert group(["p"], ["fine again"]).total == [1.0]
    finally:
        group.shutdown()


def test_a_reward_worker_killed_mid_batch_is_replaced_and_its_chunk_scored_again(ray_local) -> None:
    """SIGKILL on the reward worker's process while it scores: the replacement scores the chunk, so no
    sample goes unscored."""
    import ray

    specs = [RewardSpec(import_path="toy_rewards:slow_digit_fraction")]
    group = RewardGroup(specs, RewardWorkersConfig(num_workers=1))
    try:
        pid = ray.get(group._workers[0].pid.remote())
        threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()  # inside the 3 s plugin call
        out = group(["p"] * 4, ["1", "a", "22", "b2"])
        assert out.workers_restarted == 1
        assert out.total == [1.0, 0.0, 1.0, 0.5] and out.errors[specs[0].label] == 0
    finally:
        group.shutdown()


def test_a_worker_with_hung_plugin_calls_is_replaced(ray_local) -> None:
    specs = [
        RewardSpec(import_path="toy_rewards:sleeps_past_the_limit"),
        RewardSpec(import_path="toy_rewards:digit_fraction"),
    ]
    config = RewardWorkersConfig(num_workers=1, time_limit_s=0.5, max_abandoned_threads=0)
    group = RewardGroup(specs, config)
    try:
        out = group(["p"] * 3, ["abc", "a1", "zz"])
        sleeper, digits = (s.label for s in specs)
        assert out.per_reward[sleeper] == [0.0, None, 0.0]
        assert out.timeouts[sleeper] == 1
        assert out.per_reward[digits] == [0.0, 0.5, 0.0]
        assert out.total == [0.0, 0.5, 0.0]
        assert group.restarts == 1  # two abandoned threads > max_abandoned_threads = 0
        assert group(["p"], ["ok"]).total == [0.0]
    finally:
        group.shutdown()


# ---- TRL's reward functions, unchanged, on the driver's batches -----------------------------------------


def _chat(question: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "Think in <think></think>, then box the answer."},
        {"role": "user", "content": question},
    ]


TRL_ROWS = [  # (row, completion, number of completion tokens)
    (
        {
            "prompt_id": "third",
            "prompt": _chat("What is 1/3 of 1?"),
            "solution": "\\frac{1}{3}",
            "answer": "1/3",
        },
        "<think>1/3 of 1 is 1/3</think> The answer is \\boxed{\\frac{1}{3}}",
        3,
    ),
    (
        {
            "prompt_id": "third",
            "prompt": _chat("What is 1/3 of 1?"),
            "solution": "\\frac{1}{3}",
            "answer": "1/3",
        },
        "<think>hmm</think> \\boxed{\\frac{1}{2}}",
        8,
    ),
    (
        {
            "prompt_id": "half",
            "prompt": _chat("What is 1/2 of 2/3?"),
            "solution": "\\frac{1}{3}",
            "answer": "1/3",
        },
        "\\boxed{\\frac{1}{3}}",
        12,
    ),
    (  # a plain-text row: TRL's accuracy and format rewards expect conversational completions
        {"prompt_id": "plain", "prompt": "What is 1+1?", "solution": "2", "answer": "2"},
        "<think>1+1</think> \\boxed{2}",
        3,
    ),
]


def _trl_batch() -> list[Rollout]:
    """Rollouts as the driver builds them from rows (prompt, columns) and the engine returns them."""
    tok = build_tokenizer()
    batch = []
    for i, (row, text, length) in enumerate(TRL_ROWS):
        prompt = rollout_prompt(tok, row, f"5:{i}:{row['prompt_id']}")
        batch.append(
            Rollout(
                prompt_id=prompt.prompt_id,
                prompt_ids=tok.encode(prompt.text, add_special_tokens=False),
                response_ids=[7] * length,
                response_logprobs=[0.0] * length,
                finish_reason="stop",
                version=0,
                prompt_text=prompt.text,
                response_text=text,
                columns=dict(prompt.columns),
            )
        )
    return batch


def test_trl_reward_functions_score_unchanged_through_reward_workers(ray_local) -> None:
    from trl.rewards import accuracy_reward, think_format_reward

    specs = [
        RewardSpec(import_path="trl.rewards:accuracy_reward"),
        RewardSpec(import_path="trl.rewards:think_format_reward", weight=0.5),
        RewardSpec(
            import_path="trl.rewards:get_soft_overlong_punishment",
            factory=True,
            options={"max_completion_len": 10, "soft_punish_cache": 4},
        ),
        RewardSpec(name="math"),  # a built-in beside them, on the same conversational completions
    ]
    group = RewardGroup(specs, RewardWorkersConfig(num_workers=1))
    try:
        out = score_rollouts(group, _trl_batch())
    finally:
        group.shutdown()
    accuracy, think, overlong, math = (s.label for s in specs)
    # right, wrong, right; the plain-text row fails in TRL's functions (they index completion[0]["content"])
    assert out.per_reward[accuracy] == [1.0, 0.0, 1.0, None]
    assert out.per_reward[think] == [1.0, 1.0, 0.0, None]
    # DAPO soft overlong punishment with L_max = 10, L_cache = 4:
    # |y| <= 6 -> 0; |y| = 8 -> (6 - 8) / 4 = -0.5; |y| = 12 > 10 -> -1
    assert out.per_reward[overlong] == [0.0, -0.5, -1.0, 0.0]
    assert out.per_reward[math] == [1.0, 0.0, 1.0, 1.0]
    # weighted sums: 1 + 0.5 + 0 + 1; 0 + 0.5 - 0.5 + 0; 1 + 0 - 1 + 1; (None, None) + 0 + 1
    assert out.total == [2.5, 0.0, 1.0, 1.0]
    assert out.errors[accuracy] == out.errors[think] == 1 and out.errors[overlong] == 0
    failure = out.info[accuracy][3]
    assert failure["prompt_id"] == "5:3:plain" and failure["error"].startswith("TypeError")
    # the same functions called directly on the conversational samples agree with the workers
    chat = [[{"role": "assistant", "content": text}] for _, text, _ in TRL_ROWS[:3]]
    assert accuracy_reward(chat, solution=[row["solution"] for row, _, _ in TRL_ROWS[:3]]) == [1.0, 0.0, 1.0]
    assert think_format_reward(chat) == [1.0, 1.0, 0.0]
