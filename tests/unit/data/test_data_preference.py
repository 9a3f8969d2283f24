"""The `preference` task (training a GenRM): right labels, near-miss distractors, question-level splits,
worked solutions the `preference` reward accepts, and texts the policy tokenizer covers."""

from __future__ import annotations

import re

from rlstack.data.tasks import TASKS, generate_rows
from rlstack.rewards.registry import call_reward, get_reward

PROMPT = re.compile(r"Which is right for (\d+)([+-])(\d+)\? A: (\d+) B: (\d+)")


def _parse(prompt: str) -> tuple[int, int, int]:
    a, op, b, first, second = PROMPT.fullmatch(prompt).groups()  # type: ignore[union-attr]
    value = int(a) + int(b) if op == "+" else int(a) - int(b)
    return value, int(first), int(second)


def test_registered_and_deterministic() -> None:
    assert "preference" in TASKS
    rows = generate_rows("preference", "train", 200, seed=3)
    assert rows == generate_rows("preference", "train", 200, seed=3)
    assert rows != generate_rows("preference", "train", 200, seed=4)
    assert generate_rows("preference", "train", 50, seed=3) == rows[:50]
    assert sorted(rows[0]) == ["answer", "candidates", "prompt", "prompt_id", "solution", "task"]


def test_labels_name_the_right_answer_and_the_other_is_a_near_miss() -> None:
    rows = generate_rows("preference", "train", 1000)
    for r in rows:
        value, first, second = _parse(r["prompt"])
        right, wrong = (first, second) if r["answer"] == "A" else (second, first)
        assert right == value and r["candidates"] == [first, second]
        assert wrong >= 0 and abs(wrong - value) in (1, 10, 100)
    share_a = sum(r["answer"] == "A" for r in rows) / len(rows)
    assert 0.45 < share_a < 0.55  # no position to learn instead of the arithmetic


def test_worked_solutions_check_the_columns_and_score_full_reward() -> None:
    rows = generate_rows("preference", "heldout", 200)
    for r in rows:
        value, _, _ = _parse(r["prompt"])
        assert r["solution"].endswith(f", so {value}: [[{r['answer']}]]")
    reward = get_reward("preference")
    prompts, labels = [r["prompt"] for r in rows], [r["answer"] for r in rows]
    assert call_reward(reward, prompts, [r["solution"] for r in rows], answer=labels) == [1.0] * len(rows)
    flipped = [
        r["solution"].replace("[[A]]", "[[X]]").replace("[[B]]", "[[A]]").replace("[[X]]", "[[B]]")
        for r in rows
    ]
    assert call_reward(reward, prompts, flipped, answer=labels) == [0.0] * len(rows)


def test_a_heldout_question_never_reaches_training() -> None:
    def question(prompt: str) -> str:
        return prompt.split("?")[0]

    heldout = generate_rows("preference", "heldout", 256)
    train = [r for seed in range(3) for r in generate_rows("preference", "train", 1000, seed=seed)]
    assert not {question(r["prompt"]) for r in heldout} & {question(r["prompt"]) for r in train}
    assert not {r["prompt_id"] for r in heldout} & {r["prompt_id"] for r in train}


def test_texts_fit_the_policy_tokenizer() -> None:
    from rlstack.model.tokenizer import build_tokenizer

    tok = build_tokenizer()
    rows = generate_rows("preference", "train", 300) + generate_rows("preference", "heldout", 300)
    for field, limit in (("prompt", 40), ("solution", 60)):
        texts = [r[field] for r in rows]
        encoded = tok(texts, add_special_tokens=False)["input_ids"]
        assert all(tok.unk_token_id not in ids for ids in encoded)
        assert max(map(len, encoded)) <= limit
        assert tok.batch_decode(encoded) == texts
