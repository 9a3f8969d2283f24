"""The policy learner: DeepSpeed ZeRO ranks as Ray actors, log-prob recompute, MIS-PO updates, weight export.

Names resolve lazily (like `rlstack.mispo`): `from rlstack.learner import LearnerConfig` imports pydantic
only, and nothing here imports DeepSpeed or Ray until a worker is set up.

Public API
- `LearnerConfig` (pydantic; field docstrings).
- `PolicyBatch`, `collate(rollouts, pad_id) -> PolicyBatch`: right-padded (B, L) tensors; per-token values
  sit at the position of the token they score; `loss_mask` is 1 on policy-generated tokens only.
- `SamplingTransform(temperature, top_p, top_k)`: the distribution the engine samples from; every learner
  log-prob (pi_old, pi_theta, pi_ref) is computed under it.
- `token_logprobs(model, input_ids, attention_mask, return_entropy=False)`, `score_tokens`,
  `logprobs_from_logits`, `entropy_from_logits`, `TokenScores`.
- `accumulate_minibatch(model, shard, algo_cfg, sink, reducer, split)`: one rank's micro-batched
  forward/backward with the global normaliser (plain torch; `TorchSink`, `LocalReducer`); `split` is a row
  count or a `micro.MicroSplit` (rows, or a token budget: `learner.micro_batch_tokens`).
- `LearnerWorker` (one rank, a Ray actor's class; its jobs live in `engine`, `scoring`, `train`, `export`,
  `checkpoint`, `reference`), `LearnerGroup(model_path, learner_cfg, run_env)`: `compute_logprobs`,
  `compute_values` (critic), `train(batch, algo_cfg, old_logp_from_forward=...) -> TrainResult(metrics,
  old_logp)` (`train_step`: its metrics), `export_weights`, `save_checkpoint`, `load_checkpoint`, `shutdown`.
- Critic (`learner.critic`, `CriticConfig`): `ValueModel` (policy trunk + scalar head, values aligned like
  log-probs), `accumulate_critic_minibatch` (its micro-batched MSE step, plain torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlstack.lazy import lazy_exports

_MODULE_OF = {
    "LearnerConfig": "config",
    "CriticConfig": "config",
    "ValueModel": "critic",
    "accumulate_critic_minibatch": "critic",
    "PolicyBatch": "batch",
    "collate": "batch",
    "SamplingTransform": "logprobs",
    "TokenScores": "logprobs",
    "entropy_from_logits": "logprobs",
    "logprobs_from_logits": "logprobs",
    "score_tokens": "logprobs",
    "token_logprobs": "logprobs",
    "LocalReducer": "step",
    "MetricSums": "step",
    "TorchSink": "step",
    "accumulate_minibatch": "step",
    "TrainResult": "train",
    "LearnerWorker": "worker",
    "LearnerGroup": "group",
}
__all__ = [
    "CriticConfig",
    "LearnerConfig",
    "LearnerGroup",
    "LearnerWorker",
    "LocalReducer",
    "MetricSums",
    "PolicyBatch",
    "SamplingTransform",
    "TokenScores",
    "TorchSink",
    "TrainResult",
    "ValueModel",
    "accumulate_critic_minibatch",
    "accumulate_minibatch",
    "collate",
    "entropy_from_logits",
    "logprobs_from_logits",
    "score_tokens",
    "token_logprobs",
]

if TYPE_CHECKING:
    from rlstack.learner.batch import PolicyBatch, collate
    from rlstack.learner.config import CriticConfig, LearnerConfig
    from rlstack.learner.critic import ValueModel, accumulate_critic_minibatch
    from rlstack.learner.group import LearnerGroup
    from rlstack.learner.logprobs import (
        SamplingTransform,
        TokenScores,
        entropy_from_logits,
        logprobs_from_logits,
        score_tokens,
        token_logprobs,
    )
    from rlstack.learner.step import LocalReducer, MetricSums, TorchSink, accumulate_minibatch
    from rlstack.learner.train import TrainResult
    from rlstack.learner.worker import LearnerWorker

__getattr__, __dir__ = lazy_exports(__name__, _MODULE_OF)
