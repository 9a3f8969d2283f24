"""A dense reward for driver tests: a random-init policy scores nonzero, so every step has a gradient."""

from __future__ import annotations


def digit_fraction(prompts: list[str], completions: list[str], **columns: object) -> list[float]:
    """Fraction of the completion's characters that are digits.

    >>> digit_fraction(["p"], ["a1b2"])
    [0.5]
    """
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


# ---- misbehaving plugins: training must go on around them (test_driver, test_reward_group) ----------


def raises_on_odd_length(prompts: list[str], completions: list[str], **columns: object) -> list[float]:
    """Raises whenever the batch holds a completion of odd length."""
    if any(len(text) % 2 for text in completions):
        raise RuntimeError("toy plugin refuses odd-length completions")
    return [1.0 for _ in completions]


def sleeps_past_the_limit(prompts: list[str], completions: list[str], **columns: object) -> list[float]:
    """Sleeps far longer than any test's time limit on completions that contain a digit."""
    import time

    if any(any(c.isdigit() for c in text) for text in completions):
        time.sleep(120)
    return [0.0 for _ in completions]


def wrong_length(prompts: list[str], completions: list[str], **columns: object) -> list[float]:
    """Returns one score too many."""
    return [0.0] * (len(completions) + 1)


def exits_the_process(prompts: list[str], completions: list[str], **columns: object) -> list[float]:
    """Kills the reward worker's process when it sees the word 'crash'."""
    import os

    if "crash" in completions:
        os._exit(3)
    return [1.0 for _ in completions]


def digit_fraction_unless_odd(prompts: list[str], completions: list[str], **columns: object) -> list[float]:
    """`digit_fraction`, but fails on odd-length completions: those samples end up unscored."""
    odd = [len(text) for text in completions if len(text) % 2]
    if odd:
        raise ValueError(f"cannot score odd-length completions (lengths {odd})")
    return digit_fraction(prompts, completions)


def label_is_yes(
    prompts: list[str], completions: list[str], label: list[str], **columns: object
) -> list[float]:
    """1.0 for rows whose `label` column is "yes", whatever the completion: an accuracy that only the data
    rows decide (rlstack eval with a config's own data)."""
    return [1.0 if value == "yes" else 0.0 for value in label]


def slow_digit_fraction(prompts: list[str], completions: list[str], **columns: object) -> list[float]:
    """`digit_fraction`, after 3 s (long enough for a test to kill the worker inside the call)."""
    import time

    time.sleep(3)
    return digit_fraction(prompts, completions, **columns)


def length_where_prompt_odd(prompts: list[str], completions: list[str], **columns: object) -> list[float]:
    """The completion's length for prompts whose UTF-8 bytes add up to an odd number, 0 for the others: about
    half the groups carry learning signal (dynamic sampling's test)."""
    return [
        float(len(c)) if sum(str(p).encode()) % 2 else 0.0 for p, c in zip(prompts, completions, strict=True)
    ]
