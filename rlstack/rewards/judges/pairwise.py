"""Pairwise GenRM math: judge verdicts -> P(win against the reference) -> Bradley–Terry win rates.

1. Verdicts. Each completion y_i of a prompt is compared with the prompt's reference answer r in k judge
   samples, half of them with y_i shown as answer A and half as B (so a judge that prefers a position
   gains nothing). A verdict for y_i scores 1, against it 0, a tie 1/2; an unreadable verdict is dropped.

2. P(win). With w wins out of m readable verdicts and a symmetric Beta(α, α) prior,
       p_i = (w + α) / (m + 2α)          (α = 0: the raw win fraction; α = 1/2 keeps p in (0, 1))
   and p_i = None when m = 0.

3. Bradley–Terry. BT models P(i beats j) = σ(s_i − s_j) with strengths s. Taking the reference as the
   origin (s_r = 0), P(i beats r) = p_i gives s_i = logit(p_i), so for two completions
       P(i beats j) = σ(logit p_i − logit p_j) = p_i (1 − p_j) / (p_i (1 − p_j) + p_j (1 − p_i)),
   without ever asking the judge to compare y_i with y_j (k judge calls per completion, not k per pair).
   The reward of y_i is its expected BT win rate against the other completions of its group and the
   reference:  R_i = mean over o in {r} ∪ {j ≠ i} of σ(s_i − s_o).  A group of one gets R_i = p_i.

   Worked example (used in the tests): p = (0.8, 0.5) → s = (ln 4, 0);
       R_1 = (σ(ln 4 − 0) + σ(ln 4)) / 2 = 0.8,
       R_2 = (σ(0 − ln 4) + σ(0)) / 2 = (0.2 + 0.5) / 2 = 0.35.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from rlstack.rewards.judges.parsing import Preference, parse_preference


def verdict_win(verdict: Preference | None, candidate_position: str) -> float | None:
    """1 if the judge preferred the candidate (shown at `candidate_position`, "A" or "B"), 0 if it preferred
    the other answer, 1/2 for a tie, None for no verdict."""
    if verdict is None:
        return None
    if verdict == "tie":
        return 0.5
    return 1.0 if verdict == candidate_position else 0.0


def swapped_wins(candidate_first: Sequence[str], candidate_second: Sequence[str]) -> list[float | None]:
    """Wins of the candidate from judge replies where it was shown as answer A, then as answer B.

    >>> swapped_wins(["[[A]]", "[[B]]"], ["[[A]]", "garbled"])
    [1.0, 0.0, 0.0, None]
    """
    return [verdict_win(parse_preference(t), "A") for t in candidate_first] + [
        verdict_win(parse_preference(t), "B") for t in candidate_second
    ]


def win_probability(wins: Sequence[float | None], prior: float = 0.5) -> float | None:
    """(w + α) / (m + 2α) over the readable verdicts (see the module docstring); None if there are none.

    >>> win_probability([1.0, 0.0, 1.0, None], prior=0.0), win_probability([1.0, 1.0], prior=0.5)
    (0.6666666666666666, 0.8333333333333334)
    """
    if prior < 0:
        raise ValueError(f"prior must be >= 0, got {prior}")
    readable = [w for w in wins if w is not None]
    if not readable:
        return None
    return (sum(readable) + prior) / (len(readable) + 2 * prior)


def beats(p_i: float, p_j: float, eps: float = 1e-6) -> float:
    """BT P(i beats j) = σ(logit p_i − logit p_j), from each one's probability of beating the reference."""
    p_i, p_j = min(max(p_i, eps), 1 - eps), min(max(p_j, eps), 1 - eps)
    a, b = p_i * (1 - p_j), p_j * (1 - p_i)
    return a / (a + b)


def bt_win_rates(p: Sequence[float]) -> list[float]:
    """Each member's mean BT win probability against the reference (p = 1/2) and the other members.

    >>> [round(x, 4) for x in bt_win_rates([0.8, 0.5])]
    [0.8, 0.35]
    """
    out = []
    for i, p_i in enumerate(p):
        opponents = [0.5] + [p_j for j, p_j in enumerate(p) if j != i]  # the reference has p = 1/2
        out.append(sum(beats(p_i, p_o) for p_o in opponents) / len(opponents))
    return out


def grouped_bt_win_rates(p: Sequence[float | None], groups: Sequence[Hashable]) -> list[float | None]:
    """`bt_win_rates` within each group (the completions of one prompt); None stays None and is left out."""
    if len(p) != len(groups):
        raise ValueError(f"{len(p)} probabilities but {len(groups)} group keys")
    members: dict[Hashable, list[int]] = {}
    for i, (p_i, g) in enumerate(zip(p, groups, strict=True)):
        if p_i is not None:
            members.setdefault(g, []).append(i)
    out: list[float | None] = [None] * len(p)
    for idx in members.values():
        for i, rate in zip(idx, bt_win_rates([p[i] for i in idx]), strict=True):  # type: ignore[misc]
            out[i] = rate
    return out
