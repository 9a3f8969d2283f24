"""Dynamic sampling's selection (rlstack.dynamic_sampling): groups whose scored rewards differ train, the
first `want` of them; the others are dropped with their reason; a step without any signal keeps its batch."""

from __future__ import annotations

from rlstack.dynamic_sampling import NO_SIGNAL, SURPLUS, groups_with_signal, select_groups
from rlstack.types import Rollout


def _group(pid: str, rewards: list[float | None]) -> list[Rollout]:
    return [
        Rollout(prompt_id=pid, prompt_ids=[1], response_ids=[5, 6], response_logprobs=[-1.0, -1.0],
                finish_reason="stop", version=0, reward=r)
        for r in rewards
    ]  # fmt: skip


def test_groups_with_signal_need_two_different_scored_rewards() -> None:
    rollouts = [
        *_group("a", [1.0, 1.0, 1.0]),  # all alike
        *_group("b", [0.0, 1.0, 1.0]),
        *_group("c", [0.5, None, None]),  # one scored reward: no contrast
        *_group("d", [None, 0.2, 0.3]),
    ]
    assert groups_with_signal(rollouts) == ["b", "d"]


def test_select_keeps_the_first_groups_with_signal_and_names_the_rest() -> None:
    rollouts = [*_group("a", [1, 1]), *_group("b", [0, 1]), *_group("c", [0, 0]), *_group("d", [1, 0]),
                *_group("e", [0.2, 0.1])]  # fmt: skip
    info = [{"i": i} for i in range(len(rollouts))]
    sel = select_groups(rollouts, info, want=2)
    assert sel.groups == 2 and [r.prompt_id for r in sel.rollouts] == ["b", "b", "d", "d"]
    assert sel.reward_info == [{"i": 2}, {"i": 3}, {"i": 6}, {"i": 7}]
    reasons = {(d.rollout.prompt_id, d.reason) for d in sel.dropped}
    assert reasons == {("a", NO_SIGNAL), ("c", NO_SIGNAL), ("e", SURPLUS)}
    assert [d.reward_info for d in sel.dropped if d.rollout.prompt_id == "a"] == [{"i": 0}, {"i": 1}]


def test_a_step_without_signal_keeps_its_batch() -> None:
    rollouts = [*_group("a", [1, 1]), *_group("b", [0, 0])]
    sel = select_groups(rollouts, [{}] * 4, want=2)
    assert sel.rollouts == rollouts and sel.dropped == [] and sel.groups == 0
