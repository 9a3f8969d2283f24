"""Reward plugins (TRL-compatible functions): the registry, the math and puzzle verifiers, the combiner."""

from rlstack.rewards.config import RewardSpec

# Importing the verifier modules registers the in-tree rewards (math, puzzle).
from rlstack.rewards.math_verify import MathVerifier, default_verifier, math_reward
from rlstack.rewards.puzzle import check_expression, puzzle_reward
from rlstack.rewards.registry import (
    ENTRY_POINT_GROUP,
    CombinedRewards,
    RewardCombiner,
    RewardError,
    RewardResult,
    call_reward,
    combine,
    get_reward,
    list_rewards,
    load_import_path,
    register,
    resolve,
    reward_names,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "CombinedRewards",
    "MathVerifier",
    "RewardCombiner",
    "RewardError",
    "RewardResult",
    "RewardSpec",
    "call_reward",
    "check_expression",
    "combine",
    "default_verifier",
    "get_reward",
    "list_rewards",
    "load_import_path",
    "math_reward",
    "puzzle_reward",
    "register",
    "resolve",
    "reward_names",
]
