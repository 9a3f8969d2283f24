"""A dense reward for driver tests: a random-init policy scores nonzero, so every step has a gradient."""

from __future__ import annotations


def digit_fraction(prompts: list[str], completions: list[str], **columns: object) -> list[float]:
    """Fraction of the completion's characters that are digits.

    >>> digit_fraction(["p"], ["a1b2"])
    [0.5]
    """
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]
