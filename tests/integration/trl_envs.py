"""An environment and a reward function written for TRL's GRPOTrainer(environment_factory=...), exactly as
TRL documents them, with no rlstack import: rlstack must run them unchanged (test_multiturn.py)."""

from __future__ import annotations


class CalculatorEnv:
    def reset(self, **kwargs) -> str | None:
        self.products: list[int] = []
        return None

    def multiply(self, a: int, b: int) -> int:
        """
        Multiply two integers.

        Args:
            a: The first factor.
            b: The second factor.

        Returns:
            The product of a and b.
        """
        self.products.append(a * b)
        return a * b

    def get_reward(self) -> float:
        return 1.0 if self.products else 0.0


def answer_matches_tool(environments, completions, **kwargs) -> list[float]:
    """1 when the final answer contains the last product the tool computed."""
    rewards = []
    for env, completion in zip(environments, completions, strict=True):
        final = completion[-1]["content"]
        rewards.append(1.0 if env.products and str(env.products[-1]) in final else 0.0)
    return rewards
