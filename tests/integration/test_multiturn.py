"""Multi-turn episodes with real vLLM and real sandboxes: token in / token out across turns, the loss mask,
log-prob parity with the learner, and a TRL environment used unchanged.

The policy is the tiny model taught (a few seconds of plain PyTorch) to act out two fixed episodes, so the
real engine really writes tool calls: a 3-turn `python_tool` episode (two programs run in bubblewrap, then
the answer) and a call of a TRL-style calculator's `multiply`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from rlstack.data.prompts import rollout_prompt
from rlstack.envs.config import EnvConfig, SandboxConfig
from rlstack.envs.tool_calls import ToolOutcome, tool_suffix_ids
from rlstack.learner.batch import collate
from rlstack.learner.logprobs import SamplingTransform, score_tokens
from rlstack.model import Step3p5ForCausalLM, init_checkpoint, tiny
from rlstack.rewards.config import RewardSpec, RewardWorkersConfig
from rlstack.rewards.group import RewardGroup
from rlstack.rewards.scoring import score_rollouts
from rlstack.rollout.config import RolloutConfig, SamplingConfig
from rlstack.rollout.worker import RolloutWorker
from rlstack.sft import memorize
from rlstack.types import Rollout

pytestmark = [pytest.mark.vllm, pytest.mark.bubblewrap]


def _call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


PYTHON_EPISODE = (
    "What is 6*7+1?",
    [
        {"role": "assistant", "content": "", "tool_calls": [_call("python", code="print(6*7)")]},
        {"role": "tool", "name": "python", "content": "42\n"},
        {"role": "assistant", "content": "", "tool_calls": [_call("python", code="print(42+1)")]},
        {"role": "tool", "name": "python", "content": "43\n"},
        {"role": "assistant", "content": "\\boxed{43}"},
    ],
)
CALCULATOR_EPISODE = (
    "Use the calculator: 12 times 34",
    [
        {"role": "assistant", "content": "", "tool_calls": [_call("multiply", a=12, b=34)]},
        {"role": "tool", "name": "multiply", "content": "408"},
        {"role": "assistant", "content": "\\boxed{408}"},
    ],
)
SAMPLING = SamplingConfig(n=2, temperature=1.0, max_tokens=100, seed=3)


@pytest.fixture(scope="module")
def tool_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny policy after memorising both episodes (cross-entropy on the model tokens only)."""
    path = init_checkpoint(tiny(), tmp_path_factory.mktemp("tool_policy"), seed=0)
    loss = memorize(path, [PYTHON_EPISODE, CALCULATOR_EPISODE])
    assert loss < 1e-2, f"the tiny policy did not learn the episodes (loss {loss:.3g})"
    return path


def _worker(path: Path, env: EnvConfig, record_routing: bool = False) -> Iterator[RolloutWorker]:
    worker = RolloutWorker(
        path,
        RolloutConfig(max_model_len=512, kv_cache_mb=32),
        env=env,
        sandbox=SandboxConfig(backend="bubblewrap"),
        record_routing=record_routing,
    )
    try:
        yield worker
    finally:
        worker.shutdown()


@pytest.fixture(scope="module")
def python_worker(tool_policy: Path) -> Iterator[RolloutWorker]:
    yield from _worker(tool_policy, EnvConfig(name="python_tool", max_turns=4), record_routing=True)


def test_three_turn_python_tool_episode_is_token_in_token_out(
    python_worker: RolloutWorker, tool_policy: Path
) -> None:
    tokenizer = python_worker.tokenizer
    engine_prompts: list[list[list[int]]] = []  # per engine call, each request's prompt ids
    generate = python_worker.llm.generate

    def recording_generate(inputs: list[Any], params: Any, **kwargs: Any) -> Any:
        engine_prompts.append([list(i["prompt_token_ids"]) for i in inputs])
        return generate(inputs, params, **kwargs)

    python_worker.llm.generate = recording_generate  # type: ignore[method-assign]
    try:
        row = {"prompt_id": "p", "prompt": PYTHON_EPISODE[0], "answer": "43"}
        rollouts = python_worker.generate([rollout_prompt(tokenizer, row, "p")], SAMPLING)
    finally:
        python_worker.llm.generate = generate  # type: ignore[method-assign]

    assert len(rollouts) == 2 and len(engine_prompts) == 3  # three turns, both episodes in each call
    for r in rollouts:
        assert r.episode is not None and r.episode.error is None
        assert (r.episode.turns, r.episode.tool_calls, r.episode.tool_errors) == (3, 2, 0)
        assert [m["role"] for m in r.episode.messages] == [
            "assistant",
            "tool",
            "assistant",
            "tool",
            "assistant",
        ]
        assert r.episode.messages[1]["content"] == "42\n" and r.episode.messages[3]["content"] == "43\n"
        assert r.finish_reason == "stop" and r.response_text.endswith("\\boxed{43}</s>")

    # Turn k+1's prompt is turn k's prompt + its response + the tool-result tokens, exactly; and it is also
    # what the chat template renders for the conversation so far (our template only appends).
    r = rollouts[0]
    mask = r.response_mask
    assert mask is not None
    runs = _runs(mask)  # [(start, end, is_model)] over the response
    assert [m for _, _, m in runs] == [1, 0, 1, 0, 1]
    turn_prompts = [calls[0] for calls in engine_prompts]
    for k in range(2):
        (s, e, _), (ts, te, _) = runs[2 * k], runs[2 * k + 1]
        response, tool_ids = r.response_ids[s:e], r.response_ids[ts:te]
        assert tool_ids == tool_suffix_ids(
            tokenizer, [ToolOutcome("python", r.episode.messages[2 * k + 1]["content"])]
        )
        assert turn_prompts[k + 1] == turn_prompts[k] + response + tool_ids
    conversation = [{"role": "user", "content": PYTHON_EPISODE[0]}, *r.episode.messages[:4]]
    rendered = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert turn_prompts[2] == tokenizer.encode(rendered, add_special_tokens=False)
    assert r.prompt_ids + r.response_ids[: runs[3][1]] == turn_prompts[2]

    # Loss mask: exactly the model's tokens; tool tokens carry log-prob 0 and never train.
    assert sum(mask) == sum(e - s for s, e, m in runs if m) and all(
        r.response_logprobs[i] == 0.0 for i, m in enumerate(mask) if not m
    )
    # The learner's log-probs of the model tokens (same sampling transform, fp32) agree with vLLM's.
    batch = collate(rollouts, pad_id=tokenizer.pad_token_id)
    model = Step3p5ForCausalLM.from_pretrained(tool_policy, dtype=torch.float32).eval()
    with torch.no_grad():
        scores = score_tokens(
            model,
            batch.input_ids,
            batch.attention_mask,
            transform=SamplingTransform.from_sampling(SAMPLING),
        )
    trained = batch.loss_mask.bool()  # (B, L)
    assert trained.sum().item() == sum(sum(x.response_mask or []) for x in rollouts)
    diff = (scores.logp - batch.rollout_logp)[trained].abs().max().item()
    assert diff < 1e-3, f"learner vs vLLM log-probs differ by {diff:.2e} on model tokens"

    # Routing records (routing replay) cover prompt, model and tool tokens: each position's experts from
    # the request that first fed it (tool tokens: the next turn's prefill); only the last token has none.
    assert batch.rollout_experts is not None and scores.expert_ids is not None
    n = len(r.prompt_ids) + len(r.response_ids)
    assert r.routed_experts is not None and r.routed_experts.shape == (n, 3, 2)
    recorded = batch.rollout_experts[0, : n - 1].long().sort(-1).values  # (n - 1, L, k)
    assert torch.equal(recorded, scores.expert_ids[0, : n - 1].sort(-1).values)  # fp32 engine: exact
    assert (batch.rollout_experts[0, n - 1] == -1).all()


def _runs(mask: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of equal mask values: (start, end, value)."""
    runs: list[tuple[int, int, int]] = []
    for i, m in enumerate(mask):
        if runs and runs[-1][2] == m:
            runs[-1] = (runs[-1][0], i + 1, m)
        else:
            runs.append((i, i + 1, m))
    return runs


def test_async_engine_runs_each_episode_as_a_coroutine_with_the_same_tokens(
    python_worker: RolloutWorker, tool_policy: Path
) -> None:
    """`engine: async`: one coroutine per episode (tools in the env pool) gives the same episodes, token for
    token, as the sync engine's batched turns: both seed each episode's turns alike."""
    import asyncio

    from rlstack.rollout.async_worker import AsyncRolloutWorker

    row = {"prompt_id": "p", "prompt": PYTHON_EPISODE[0], "answer": "43"}
    prompt = rollout_prompt(python_worker.tokenizer, row, "p")
    expected = python_worker.generate([prompt], SAMPLING)

    async def run() -> list[Rollout]:
        worker = AsyncRolloutWorker(
            tool_policy,
            RolloutConfig(max_model_len=512, kv_cache_mb=32, engine="async"),
            env=EnvConfig(name="python_tool", max_turns=4),
            sandbox=SandboxConfig(backend="bubblewrap"),
            record_routing=True,
        )
        try:
            return await worker.generate([prompt], SAMPLING)
        finally:
            await worker.shutdown()

    got = asyncio.run(run())
    assert [r.response_ids for r in got] == [r.response_ids for r in expected]
    assert [r.response_mask for r in got] == [r.response_mask for r in expected]
    assert all(r.episode is not None and r.episode.turns == 3 for r in got)
    for g, e in zip(got, expected, strict=True):  # the async engine records the same routing, per episode
        assert g.routed_experts is not None and (g.routed_experts == e.routed_experts).all()
    diff = max(
        abs(a - b)
        for g, e in zip(got, expected, strict=True)
        for a, b in zip(g.response_logprobs, e.response_logprobs, strict=True)
    )
    assert diff < 1e-4


# Last: a second in-process engine, once closed, takes vLLM's process-wide parallel state with it, so
# `python_worker` cannot generate after this test.
def test_trl_environment_and_reward_run_unchanged(tool_policy: Path) -> None:
    """tests/integration/trl_envs.py is TRL code (no rlstack import): its tools run, get_reward() scores
    through the `env` reward, and its reward function gets `environments=` and the message completions."""
    for worker in _worker(tool_policy, EnvConfig(import_path="trl_envs:CalculatorEnv")):
        row = {"prompt_id": "c", "prompt": CALCULATOR_EPISODE[0], "answer": "408"}
        rollouts: list[Rollout] = worker.generate([rollout_prompt(worker.tokenizer, row, "c")], SAMPLING)
        for r in rollouts:
            assert r.episode is not None and (r.episode.turns, r.episode.tool_calls) == (2, 1)
            assert r.episode.messages[1] == {"role": "tool", "name": "multiply", "content": "408"}
            assert r.episode.environment.products == [408]  # the instance after the episode
        rewards = RewardGroup.in_process(
            [
                RewardSpec(name="env"),
                RewardSpec(import_path="trl_envs:answer_matches_tool"),
                RewardSpec(name="math"),
            ],
            RewardWorkersConfig(),
        )
        try:
            result = score_rollouts(rewards, rollouts)
        finally:
            rewards.shutdown()
        assert result.per_reward["env"] == [1.0, 1.0]
        assert result.per_reward["trl_envs:answer_matches_tool"] == [1.0, 1.0]
        assert result.per_reward["math"] == [1.0, 1.0]


@pytest.mark.ray
@pytest.mark.deepspeed
def test_trainer_trains_multi_turn_episodes_with_tool_tokens_out_of_the_loss(
    tool_policy: Path, tmp_path: Path
) -> None:
    """Two RL steps of the real loop (Ray, DeepSpeed learner, vLLM actor, bubblewrap) on `python_tool`
    episodes: tool tokens reach the learner unmasked in attention but out of the loss, the step logs the
    env metrics, and evaluation reports tool use and the no-tool accuracy."""
    from rlstack.config import RunConfig
    from rlstack.driver import Trainer

    cfg = RunConfig.model_validate(
        {
            "model": {"path": str(tool_policy)},
            "data": {"task": "python_tool"},
            "trainer": {
                "run_dir": str(tmp_path / "run"),
                "steps": 2,
                "prompts_per_step": 4,
            },
            "rollout": {"sampling": {"n": 4, "max_tokens": 64}, "max_model_len": 320},
            "env": {"name": "python_tool", "max_turns": 3},
            "sandbox": {"backend": "bubblewrap"},
            "learner": {"micro_batch_size": 16, "zero_stage": 2, "lr": 1e-4},
            "eval": {"num_problems": 4, "samples": 1},
        }
    )
    batches = []
    with Trainer(cfg) as trainer:
        tool_token = trainer.tokenizer.convert_tokens_to_ids("<|tool|>")
        train = trainer.learner.train

        def recording_train(batch: Any, *args: Any, **kwargs: Any) -> Any:
            batches.append(batch)
            return train(batch, *args, **kwargs)

        trainer.learner.train = recording_train  # type: ignore[method-assign]
        steps = [trainer.step() for _ in range(2)]
        evaluation = trainer.evaluate()
    for metrics, batch in zip(steps, batches, strict=True):
        assert metrics["env/tool_calls_mean"] > 0 and 0 < metrics["env/tool_token_frac"] < 1, metrics
        assert metrics["env/failed_episodes"] == 0
        at_tool = batch.input_ids == tool_token  # (B, L) the first token of every tool result
        assert at_tool.any() and (batch.loss_mask[at_tool] == 0).all()
        assert (batch.attention_mask[at_tool] == 1).all()
        assert metrics["batch/tokens"] == batch.loss_mask.sum().item()  # the model's tokens only trained
    assert {"greedy_tool_call_rate", "sampled_turns_mean", "greedy_notool_accuracy"} <= set(evaluation)
