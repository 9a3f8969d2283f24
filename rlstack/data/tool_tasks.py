"""`python_tool`: arithmetic the tiny policy cannot do in its head but can with a Python tool.

Problems: 3-4 digit times 2-3 digit multiplication (5-7 digit products) and 5-6 digit integer division by
a 2-digit number. A row's demonstration (for the supervised warm start) calls the tool on half of the
problems (`solution_messages`: the call, its output, the boxed answer) and answers directly on the rest
(`solution`: just the boxed answer, which the policy cannot compute): the warm start teaches the tool-call
format, and RL has to teach when to use it. Scored by the `math` reward.

Sums of long lists were tried and left out: copying a list of 5-7 numbers from the prompt into the call
spans more than the tiny model's 32-token sliding attention window, and its 4-layer model did not learn it
in a warm start of demo length (digit accuracy of the copied code ~0.5 after 1000 steps, against ~1.0 for
products and quotients).
"""

from __future__ import annotations

import random

from rlstack.data.tasks import Problem, TaskGenerator, register_task
from rlstack.envs.tool_calls import format_tool_call

TOOL_DEMO_FRACTION = 0.5
"""Share of problems whose demonstration uses the tool."""


def tool_demonstration(code: str, output: str, answer: str) -> list[dict[str, object]]:
    """A worked tool-use episode as chat messages: call `python`, read its output, box the answer."""
    call = {"type": "function", "function": {"name": "python", "arguments": {"code": code}}}
    return [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": "python", "content": output},
        {"role": "assistant", "content": f"\\boxed{{{answer}}}"},
    ]


def _python_tool(rng: random.Random) -> Problem:
    if rng.random() < 0.5:
        a, b = rng.randint(100, 9999), rng.randint(10, 999)
        prompt, expr, value, key = f"What is {a}*{b}?", f"{a}*{b}", a * b, f"{min(a, b)}*{max(a, b)}"
    else:
        a, b = rng.randint(10_000, 999_999), rng.randint(11, 99)
        prompt, expr, value, key = f"What is {a}//{b}?", f"{a}//{b}", a // b, f"{a}//{b}"
    answer = str(value)
    extra: dict[str, object] = {}
    if rng.random() < TOOL_DEMO_FRACTION:
        code = f"print({expr})"
        extra["solution_messages"] = tool_demonstration(code, answer + "\n", answer)
        # the same episode as text, for reading (SFT uses the messages)
        solution = format_tool_call("python", {"code": code}) + f" -> {answer} -> \\boxed{{{answer}}}"
    else:
        solution = f"\\boxed{{{answer}}}"
    return Problem(key, prompt, answer, solution, extra)


PYTHON_TOOL = register_task(
    TaskGenerator(
        "python_tool",
        _python_tool,
        "5-7 digit products and 3-5 digit quotients, to be computed with the python tool",
    )
)
