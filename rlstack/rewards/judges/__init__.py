"""Model judges as rewards: GenRM (pointwise or pairwise verdicts of a judge LM served by a vLLM Ray actor)
and MetaRM (a second pass auditing the reasoning behind a verdict), plus the `preference` verifier for
training a GenRM. Importing this package is cheap: vLLM, Ray and torch load only when a judge starts."""

from rlstack.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "DEFAULT_JUDGE": "worker",
        "JudgeError": "worker",
        "JudgeSettings": "worker",
        "JudgeWorker": "worker",
        "STATS": "parsing",
        "bt_win_rates": "pairwise",
        "genrm_reward": "genrm",
        "get_judge": "worker",
        "list_judges": "worker",
        "metarm_reward": "metarm",
        "parse_preference": "parsing",
        "parse_score": "parsing",
        "parse_soundness": "parsing",
        "preference_reward": "preference",
        "shutdown_judges": "worker",
        "win_probability": "pairwise",
    },
)
