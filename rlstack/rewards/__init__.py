"""Reward plugins (TRL-compatible functions): the registry, the verifiers and judges, the scoring group."""

from rlstack.rewards.code_verify import CodeVerifier, code_reward
from rlstack.rewards.config import RewardSpec, RewardWorkersConfig
from rlstack.rewards.group import GroupRewards, RewardGroup
from rlstack.rewards.judges.genrm import genrm_reward
from rlstack.rewards.judges.metarm import metarm_reward
from rlstack.rewards.judges.preference import preference_reward
from rlstack.rewards.judges.worker import shutdown_judges

# Importing the verifier modules registers the in-tree rewards (code, math, puzzle).
from rlstack.rewards.math_verify import MathVerifier, default_verifier, math_reward
from rlstack.rewards.puzzle import check_expression, puzzle_reward
from rlstack.rewards.registry import (
    ENTRY_POINT_GROUP,
    CombinedRewards,
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
    validate_specs,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "CodeVerifier",
    "CombinedRewards",
    "GroupRewards",
    "MathVerifier",
    "RewardError",
    "RewardGroup",
    "RewardResult",
    "RewardSpec",
    "RewardWorkersConfig",
    "call_reward",
    "check_expression",
    "code_reward",
    "combine",
    "default_verifier",
    "genrm_reward",
    "get_reward",
    "list_rewards",
    "load_import_path",
    "math_reward",
    "metarm_reward",
    "preference_reward",
    "puzzle_reward",
    "register",
    "resolve",
    "reward_names",
    "shutdown_judges",
    "validate_specs",
]
