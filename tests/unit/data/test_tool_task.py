"""The `python_tool` task: products and quotients the tool computes, half of the demonstrations a real
tool-using episode (the call's code evaluates to the tool output, the answer boxes it), half direct."""

from __future__ import annotations

from rlstack.data.tasks import generate_rows, get_task
from rlstack.model.tokenizer import build_tokenizer
from rlstack.sft import demonstration


def test_rows_demonstrate_the_tool_on_half_and_are_right() -> None:
    assert get_task("python_tool").reward == "math"
    rows = generate_rows("python_tool", "train", 400, seed=0)
    assert rows == generate_rows("python_tool", "train", 400, seed=0)
    with_tool = [r for r in rows if r.get("solution_messages")]
    assert 0.4 < len(with_tool) / len(rows) < 0.6
    for row in with_tool:
        call, tool, final = row["solution_messages"]
        code = call["tool_calls"][0]["function"]["arguments"]["code"]
        expression = row["prompt"].removeprefix("What is ").removesuffix("?")
        assert code == f"print({expression})" and str(eval(expression)) == row["answer"]
        assert tool["content"] == row["answer"] + "\n" and final["content"] == f"\\boxed{{{row['answer']}}}"
    assert all(r["solution"] == f"\\boxed{{{r['answer']}}}" for r in rows if not r.get("solution_messages"))


def test_demonstrations_train_the_model_turns_only() -> None:
    tokenizer = build_tokenizer()
    row = next(r for r in generate_rows("python_tool", "train", 20) if r.get("solution_messages"))
    rollout = demonstration(tokenizer, row, version=0)
    mask = rollout.response_mask
    assert mask is not None
    tool = tokenizer.decode([t for t, m in zip(rollout.response_ids, mask, strict=True) if not m])
    assert tool == f"<|tool|>{row['answer']}\n<|assistant|>"
    assert len(rollout.response_ids) < 60  # the tool-call words keep an episode short for the tiny model
