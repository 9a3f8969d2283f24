"""Every metric rlstack logs, with its unit and meaning: the one list docs/metrics.md is generated from.

A name is a literal key (`reward/mean`) or a pattern whose `{placeholder}`s stand for one path segment each
(`reward/{label}_errors`, `moe/load/{layer}/{expert}`). `MetricsSink.log` calls `check(keys)`: an
unregistered key is logged once per process with a warning (a plugin may log metrics of its own; they are
never dropped), or raises ValueError when `RLSTACK_STRICT_METRICS=1` (the test suite sets it).

    python -m rlstack.monitor.registry                          # print docs/metrics.md
    python -m rlstack.monitor.registry --write docs/metrics.md  # regenerate it

Imports only the standard library: the sink calls it every step, and the CLI runs without torch.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

logger = logging.getLogger(__name__)

STRICT_ENV = "RLSTACK_STRICT_METRICS"
"""`1`: `check` raises on an unregistered key instead of warning."""
DOC_PATH = "docs/metrics.md"
REGENERATE = f"python -m rlstack.monitor.registry --write {DOC_PATH}"

_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


@dataclass(frozen=True)
class Metric:
    """One metric key, or a family of keys (`{placeholder}`: one path segment), and what it means."""

    name: str
    unit: str
    """`s`, `tokens`, `count`, `fraction` (0..1), `nats`, `1` (dimensionless), `reward`, `bytes`, ..."""
    meaning: str
    group: str
    """The section of docs/metrics.md (a key of `GROUPS`)."""
    kind: Literal["scalar", "record"] = "scalar"
    """`record`: a nested JSON object in metrics.jsonl, not a number."""
    regex: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if _PLACEHOLDER.search(self.name):
            parts = _PLACEHOLDER.split(self.name)  # literal, name, literal, name, ..., literal
            body = "".join(re.escape(p) if i % 2 == 0 else "[^/]+" for i, p in enumerate(parts))
            object.__setattr__(self, "regex", re.compile(body))

    @property
    def is_pattern(self) -> bool:
        return self.regex is not None

    def matches(self, key: str) -> bool:
        return key == self.name if self.regex is None else self.regex.fullmatch(key) is not None


GROUPS: dict[str, tuple[str, str]] = {
    "record": ("Record fields", "Added by the sink to every record of metrics.jsonl."),
    "reward": (
        "Rewards",
        "Every step, over the step's rollouts that passed the staleness rule. `{label}` is a configured "
        "reward's label: its registered `name`, or its `import_path`.",
    ),
    "response": ("Responses", "Every step, over the step's rollouts that passed the staleness rule."),
    "env": (
        "Episodes and tools",
        "Multi-turn runs (an `env:` section) only, over the step's episodes (rollout/multiturn.py).",
    ),
    "staleness": (
        "Staleness",
        "Every step (rlstack/staleness.py). A trajectory's staleness is the learner's version minus the "
        "oldest weights version among its generated tokens; always 0 in sync mode.",
    ),
    "dynamic": (
        "Dynamic sampling",
        "Steps with `trainer.dynamic_sampling.enabled` only (rlstack/dynamic_sampling.py). The step's "
        "`reward/*` metrics stay those of its first batch (an unbiased sample); staleness covers what "
        "trains.",
    ),
    "filter": (
        "MIS-PO filters",
        "Every step, from the step's MIS filter over the whole batch (rlstack/mispo/filters.py): "
        "x_t = pi_old / pi_rollout per generated token, rho = exp(mean log x_t) per trajectory. Measured for "
        "every algorithm; they mask training only for `mispo` or with `algorithm.baseline_mis_masks`.",
    ),
    "actor": (
        "Actor",
        "Every step, from the learner's policy update, global over data-parallel ranks. Means are "
        "token-weighted over the step's micro-batches unless said otherwise.",
    ),
    "critic": ("Critic", "With `learner.critic.enabled` (`algorithm.advantage: critic`) only."),
    "batch": ("Batch", "Every step: the size of the step's training batch."),
    "learner": ("Learner", "Every step."),
    "moe": (
        "MoE routing and expert health",
        "MoE policies only, from the training forwards (docs/moe.md). `{layer}` is the decoder layer "
        "index of a MoE layer. Counts are over real tokens (prompt and response, no padding), all ranks.",
    ),
    "moe_load": (
        "MoE expert load",
        "Neither in metrics.jsonl nor in the sinks: the sink writes these to `expert_load.jsonl` "
        '(`{"step": s, "load": {"<layer>": [tokens per expert]}}`); a 45-layer, 288-expert model would log '
        "13k scalars a step.",
    ),
    "sync": (
        "Weight sync",
        "Every step, from pushing the new weights into the rollout engines (`rollout.weight_sync`, "
        "rlstack/rollout/sync/). A unit is a whole vLLM module (e.g. one layer's attention).",
    ),
    "time": (
        "Time",
        "Every step: seconds of each stage of `Trainer.step` as the driver waits for it. A stage that does "
        "not run in a configuration is absent.",
    ),
    "throughput": ("Throughput", "Every step."),
    "perf": (
        "Utilisation",
        "Every step (rlstack/perf.py): model FLOPs (2 x active matmul parameters per token plus causal "
        "attention, training = 3 x forward; padding and activation-checkpointing recompute not counted) "
        "against the learner's measured matmul peak.",
    ),
    "faults": ("Faults", "Every step: what the run survived so far (cumulative; docs/faults.md)."),
    "data": ("Data", "Every step."),
    "eval": (
        "Evaluation",
        "Held-out evaluation with the engines' current weights: before training (step 0), every "
        "`trainer.eval_every` steps and after the last step. `{mode}`: `greedy` (temperature 0, one "
        "response per problem), `sampled` (`eval.samples` per problem at `eval.temperature`); with an "
        "`env:` also `greedy_notool` and `sampled_notool` (single turns, a tool call is not run).",
    ),
    "sft": (
        "SFT",
        "`rlstack sft` writes `<run_dir>/logs/sft/metrics.jsonl`: `sft/nll` and the actor, filter, batch "
        "and learner metrics of its steps.",
    ),
    "run": ("Run", "Records about the run rather than a step."),
}


def _group(group: str, rows: Iterable[tuple[str, str, str]]) -> list[Metric]:
    return [Metric(name, unit, meaning, group) for name, unit, meaning in rows]


METRICS: tuple[Metric, ...] = (
    *_group(
        "record",
        [
            (
                "step",
                "step",
                "The step the record belongs to (0: before the first step, e.g. the first evaluation).",
            ),
            ("time", "s", "Unix time at which the sink wrote the record."),
        ],
    ),
    *_group(
        "reward",
        [
            (
                "reward/mean",
                "reward",
                "Mean total reward (weighted sum of the rewards that apply) over the scored samples; NaN "
                "when none is scored.",
            ),
            (
                "reward/std",
                "reward",
                "Standard deviation of the total reward over the scored samples (NaN below 2).",
            ),
            ("reward/accuracy", "fraction", "Share of the scored samples whose total reward is > 0.5."),
            (
                "reward/unscored",
                "count",
                "Samples with no total reward (no reward applied, every applicable plugin failed, or the "
                "episode failed): they train nothing and are never counted as wrong.",
            ),
            ("reward/unscored_frac", "fraction", "`reward/unscored` over all samples of the step."),
            (
                "reward/cache_hits",
                "count",
                "(sample, reward) scores served from the reward workers' caches this step.",
            ),
            (
                "reward/workers_restarted",
                "count",
                "Reward workers replaced so far (died, hung, or too many timed-out plugin calls).",
            ),
            (
                "reward/{label}_none_frac",
                "fraction",
                "Share of the samples this reward gave no score (it does not apply, or it failed).",
            ),
            (
                "reward/{label}_errors",
                "count",
                "Samples this reward failed on this step (raised, bad output, missed its time limit, or "
                "its worker was lost); they got no score from it.",
            ),
            (
                "reward/{label}_timeouts",
                "count",
                "Samples whose call of this reward missed `reward_workers.time_limit_s`, or that the "
                "plugin itself marked as timed out.",
            ),
            (
                "reward/{label}",
                "reward",
                "Mean of this reward's own score (unweighted) over the samples it scored; NaN if none.",
            ),
        ],
    ),
    *_group(
        "response",
        [
            (
                "response/length_mean",
                "tokens",
                "Mean response length (every response token; with tools, tool output included).",
            ),
            ("response/length_max", "tokens", "Longest response of the step."),
            (
                "response/truncated_frac",
                "fraction",
                "Share of rollouts that stopped at the length limit (finish reason `length`).",
            ),
        ],
    ),
    *_group(
        "env",
        [
            ("env/turns_mean", "count", "Assistant turns per episode, mean."),
            ("env/tool_calls_mean", "count", "Tool calls per episode, mean."),
            ("env/tool_call_rate", "fraction", "Share of episodes with at least one tool call."),
            (
                "env/tool_errors",
                "count",
                "Tool calls answered with an error (unknown tool, bad arguments, the tool raised, time-out).",
            ),
            ("env/tool_timeouts", "count", "Tool calls that timed out."),
            ("env/tool_seconds", "s", "Wall-clock time of the step's tool calls, summed over episodes."),
            (
                "env/failed_episodes",
                "count",
                "Episodes that could not run fairly (the sandbox failed); they are never scored.",
            ),
            (
                "env/tool_token_frac",
                "fraction",
                "Share of the episodes' response tokens that are tool output (not trained on).",
            ),
        ],
    ),
    *_group(
        "staleness",
        [
            (
                "staleness/dropped",
                "count",
                "Rollouts more than `trainer.max_staleness` updates old, dropped before training (kept in "
                "the samples, never trained on).",
            ),
            ("staleness/mean", "updates", "Mean staleness of the kept trajectories."),
            ("staleness/max", "updates", "Largest staleness among the kept trajectories."),
            (
                "staleness/hist_{s}",
                "count",
                "Kept trajectories whose staleness is exactly `{s}`, for s = 0 .. max staleness.",
            ),
        ],
    ),
    *_group(
        "dynamic",
        [
            (
                "dynamic/rounds",
                "count",
                "Extra generation rounds of the step (`trainer.dynamic_sampling`), each of prompts_per_step "
                "prompts with the current weights.",
            ),
            ("dynamic/extra_rollouts", "count", "Rollouts the extra rounds generated (and scored)."),
            (
                "dynamic/first_signal_groups",
                "count",
                "Groups with learning signal (rewards that differ) in the step's first batch.",
            ),
            (
                "dynamic/signal_groups",
                "count",
                "Groups with signal the step trained on (at most prompts_per_step).",
            ),
            (
                "dynamic/short_groups",
                "count",
                "How many groups with signal the step lacked after `max_rounds` rounds (0: it was filled).",
            ),
        ],
    ),
    *_group(
        "filter",
        [
            (
                "filter/token_accept",
                "fraction",
                "Share of generated tokens whose x_t lies in `algorithm.token_band`.",
            ),
            (
                "filter/traj_accept",
                "fraction",
                "Share of trajectories (with a generated token) the trajectory filter accepts.",
            ),
            (
                "filter/combined_accept",
                "fraction",
                "Share of generated tokens that pass both filters: the tokens that may train.",
            ),
            (
                "filter/log_ratio_p05",
                "nats",
                "5% quantile of log x_t over the generated tokens (finite ones).",
            ),
            ("filter/log_ratio_p50", "nats", "Median of log x_t over the generated tokens."),
            ("filter/log_ratio_p95", "nats", "95% quantile of log x_t over the generated tokens."),
            ("filter/abs_log_rho_mean", "nats", "Mean |log rho| over the trajectories."),
            (
                "filter/nonfinite_tokens",
                "tokens",
                "Generated tokens with a NaN or infinite log x_t (rejected by every band).",
            ),
            (
                "filter/traj_band_lo",
                "1",
                "Lower end of the trajectory band on rho this step (`traj_filter` fixed or adaptive).",
            ),
            (
                "filter/traj_band_hi",
                "1",
                "Upper end of the trajectory band on rho this step (`traj_filter` fixed or adaptive).",
            ),
        ],
    ),
    *_group(
        "actor",
        [
            (
                "actor/loss",
                "1",
                "The policy's loss (policy-gradient term plus `kl_coef` x KL; the MoE balancing loss is "
                "not in it), mean over the step's mini-batches.",
            ),
            ("actor/pg_loss", "1", "The policy-gradient term of `actor/loss` alone, mean over mini-batches."),
            (
                "actor/kl",
                "nats",
                "With `algorithm.kl_coef > 0`: mean per-token estimate of KL(pi_theta || pi_ref) over the "
                "trained tokens (the unbiased estimator on samples from pi_old).",
            ),
            (
                "actor/entropy",
                "nats",
                "Mean entropy of the sampling distribution (temperature, top-k / top-p applied) over the "
                "generated tokens.",
            ),
            (
                "actor/train_frac",
                "fraction",
                "Share of generated tokens that train: in the MIS masks where they apply, with finite "
                "log-probs.",
            ),
            (
                "actor/signal_tokens",
                "tokens",
                "Trained tokens with a nonzero advantage (with KL: every trained token), summed over the "
                "step; a mini-batch with none steps at learning rate 0.",
            ),
            (
                "actor/skipped_rows",
                "count",
                "Rows without learning signal (no trainable token with a nonzero advantage; with KL, no "
                "trainable token) whose backward (and, with pi_old computed beforehand, forward) was "
                "skipped, summed over the step; 0 where skipping would change the update "
                "(docs/algorithm.md).",
            ),
            (
                "actor/nonfinite_logp_tokens",
                "tokens",
                "Generated tokens whose learner, pi_old or (with KL) reference log-prob is -inf or NaN "
                "(e.g. outside the learner's top-k / top-p support); they never train. Summed over the step.",
            ),
            (
                "actor/clip_frac",
                "fraction",
                "`ppo`, `grpo`, `gspo`: share of the trained tokens where the clipped term is active.",
            ),
            (
                "actor/tis_weight_mean",
                "1",
                "`ppo` / `grpo` with `algorithm.tis_cap`: mean truncated importance weight "
                "min(pi_old / pi_rollout, cap) over the trained tokens.",
            ),
            (
                "actor/seq_ratio_mean",
                "1",
                "`gspo`: mean sequence ratio exp(mean log pi_theta / pi_old) over rows with a trained token.",
            ),
            (
                "actor/routing_confidence",
                "fraction",
                "MoE: score mass of the chosen experts (mean over MoE layers), mean over generated tokens.",
            ),
            (
                "actor/grad_norm",
                "1",
                "Global gradient 2-norm before clipping, mean over the step's optimizer steps.",
            ),
            (
                "actor/lr",
                "1",
                "Scheduled learning rate, mean over the step's optimizer steps (a frozen step reports its "
                "scheduled value).",
            ),
            (
                "actor/frozen_steps",
                "count",
                "Optimizer steps of this step without learning signal (no `actor/signal_tokens` on any "
                "rank), run at learning rate 0.",
            ),
        ],
    ),
    *_group(
        "critic",
        [
            (
                "critic/loss",
                "reward^2",
                "Masked MSE of V(s_t) against the returns, normalised like the policy loss "
                "(`algorithm.loss_norm`), mean over the critic's mini-batches.",
            ),
            ("critic/mse", "reward^2", "Mean (V(s_t) - R_t)^2 over the generated tokens."),
            ("critic/value_mean", "reward", "Mean critic value V(s_t) over the generated tokens."),
            ("critic/return_mean", "reward", "Mean return R_t over the generated tokens."),
            (
                "critic/explained_var",
                "1",
                "1 - Var(R - V) / Var(R) over the generated tokens (1: perfect; 0 when the returns are "
                "constant).",
            ),
            (
                "critic/grad_norm",
                "1",
                "The critic's gradient 2-norm before clipping, mean over its optimizer steps.",
            ),
            (
                "critic/lr",
                "1",
                "The critic's scheduled learning rate (`learner.critic_lr`), mean over its steps.",
            ),
        ],
    ),
    *_group(
        "batch",
        [
            (
                "batch/rows",
                "count",
                "Trajectories in the step's batch (the rollouts that passed the staleness rule).",
            ),
            (
                "batch/sequences",
                "count",
                "Rows with at least one token in the loss mask (unscored rows have none).",
            ),
            (
                "batch/tokens",
                "tokens",
                "Tokens in the loss mask: model-generated response tokens of scored rows (no prompt, tool "
                "output or padding).",
            ),
            (
                "batch/generated_for_step",
                "step",
                "The 0-based step the batch's prompts were drawn and seeded for; async mode submits it up "
                "to `trainer.max_staleness` steps before it trains.",
            ),
        ],
    ),
    *_group(
        "learner",
        [
            ("learner/version", "version", "The policy's weights version after this step's update."),
            (
                "learner/step_time_s",
                "s",
                "Seconds of the train call on learner rank 0 (critic and policy optimizer steps).",
            ),
        ],
    ),
    *_group(
        "moe",
        [
            (
                "moe/max_violation",
                "1",
                "Worst MoE layer's max expert load / mean load - 1 (0: balanced).",
            ),
            ("moe/dead_experts", "count", "Experts that got no token this step, summed over MoE layers."),
            (
                "moe/router_entropy",
                "nats",
                "Entropy of the normalised router scores per real token, mean over tokens and MoE layers "
                "(at most log E).",
            ),
            (
                "moe/layer{layer}/max_violation",
                "1",
                "This layer's max expert load / mean load - 1 (0: balanced; E/k - 1: k experts take all).",
            ),
            ("moe/layer{layer}/dead_experts", "count", "This layer's experts that got no token this step."),
            (
                "moe/layer{layer}/router_entropy",
                "nats",
                "This layer's router-score entropy, mean over real tokens.",
            ),
            (
                "moe/layer{layer}/routing_confidence",
                "fraction",
                "This layer's score mass of the chosen experts, mean over real tokens.",
            ),
            (
                "moe/balance_loss",
                "1",
                "With `learner.moe.balance_coef > 0`: the EP-group balanced routing loss G sum_g f_g P_g "
                "(1: balanced; G: one group takes all), without its coefficient, mean over mini-batches.",
            ),
            (
                "moe/replay_overrides",
                "fraction",
                "With routing replay: share of the replayed token-layer decisions where the router's own "
                "top-k differs from the replayed experts.",
            ),
            (
                "moe/routing_mismatch",
                "fraction",
                "Probe steps (`learner.moe.probe_every`): share of token-layer decisions where the learner's "
                "own routing differs from the engine's.",
            ),
            (
                "moe/logp_gap_free",
                "nats",
                "Probe steps: mean |log pi_learner - log pi_rollout| over the trained tokens, learner "
                "routing on its own.",
            ),
            (
                "moe/logp_gap_replay",
                "nats",
                "Probe steps: the same with the engine's recorded routing replayed.",
            ),
        ],
    ),
    *_group(
        "moe_load",
        [
            (
                "moe/load/{layer}/{expert}",
                "tokens",
                "Tokens routed to expert `{expert}` of MoE layer `{layer}` in the step's training forwards.",
            ),
        ],
    ),
    *_group(
        "sync",
        [
            ("sync/bytes", "bytes", "Payload pushed to the engines (each engine gets all of it)."),
            (
                "sync/bytes_skipped",
                "bytes",
                "Bytes of units unchanged since the last push, not sent (`rollout.changed_only`).",
            ),
            ("sync/buckets", "count", "Buckets the push was packed into (one in flight at a time)."),
            ("sync/max_bucket_mb", "MiB", "Payload of the largest bucket."),
            ("sync/units_sent", "count", "Units sent (any of their tensors changed)."),
            ("sync/units_skipped", "count", "Units unchanged since the last push, not sent."),
            ("sync/plan_seconds", "s", "Hashing the weights and planning the buckets."),
            (
                "sync/seconds",
                "s",
                "The backend's push: planning, every bucket, and the engines' reload.",
            ),
            ("sync/mb_per_s", "MiB/s", "`sync/bytes` per second of `sync/seconds`."),
            (
                "sync/total_seconds",
                "s",
                "The whole push as its caller times it (object store: after the learner exported the "
                "weights; nccl / gloo: the learner's collective push, ZeRO-3 gather included).",
            ),
        ],
    ),
    *_group(
        "time",
        [
            (
                "time/generate",
                "s",
                "Getting the step's rollouts: submitting the next batches and waiting for the oldest (async: "
                "generation during the previous steps is not counted).",
            ),
            ("time/score", "s", "Scoring the rollouts with the rewards."),
            (
                "time/old_logprobs",
                "s",
                "The separate pi_old log-prob pass (absent when pi_old comes from the training forward, "
                "`learner.fuse_old_logp`).",
            ),
            ("time/values", "s", "The critic's values pass (`algorithm.advantage: critic`)."),
            ("time/train", "s", "The learner's update (critic and policy; the fused MIS filter included)."),
            ("time/sync", "s", "Pushing the new weights into the engines."),
            ("time/step", "s", "Sum of the stage times above (logging, samples and checkpoints excluded)."),
        ],
    ),
    *_group(
        "throughput",
        [
            (
                "throughput/generate_wait_tokens_per_s",
                "tokens/s",
                "Response tokens of the step per second of `time/generate` (async: overlapped generation "
                "makes this exceed the engines' rate).",
            ),
            ("throughput/tokens_per_s", "tokens/s", "Response tokens of the step per second of `time/step`."),
        ],
    ),
    *_group(
        "perf",
        [
            (
                "perf/mfu",
                "fraction",
                "Model-FLOPs utilisation of the learner: `perf/learner_tflops` over the learner's peak "
                "(measured fp32/bf16 matmul FLOP/s with its threads, times its ranks).",
            ),
            (
                "perf/learner_tflops",
                "TFLOP/s",
                "The learner's model FLOPs (training forward + backward of every real token, plus the "
                "separate pi_old and reference forwards) per second of `time/train` + `time/old_logprobs`.",
            ),
            (
                "perf/rollout_tokens_per_s",
                "tokens/s",
                "Policy-generated tokens of the step per second the rollout workers spent generating them "
                "(the union of their calls' wall-clock spans; in async mode not the driver's wait).",
            ),
        ],
    ),
    *_group(
        "faults",
        [
            (
                "faults/rollout_restarts",
                "count",
                "Rollout workers replaced so far (died, hung past a deadline, or failed a health check).",
            ),
            ("faults/learner_restarts", "count", "Learner restarts from the last checkpoint so far."),
            ("faults/steps_redone", "count", "Steps redone after learner restarts, summed."),
            (
                "faults/lost_seconds",
                "s",
                "Time lost to failures: learner restarts (failure to resumed) plus rollout failures "
                "(detection to re-dispatch).",
            ),
        ],
    ),
    *_group(
        "data",
        [
            (
                "data/prompts_drawn",
                "count",
                "Prompt rows drawn from the data source so far, over all epochs (async: batches queued for "
                "later steps included).",
            ),
        ],
    ),
    *_group(
        "eval",
        [
            ("eval/num_problems", "count", "Held-out problems evaluated (at most `eval.num_problems`)."),
            (
                "eval/{mode}_accuracy",
                "fraction",
                "Share of the scored responses that the first configured reward scores > 0.5 (NaN if none).",
            ),
            (
                "eval/{mode}_unscored",
                "count",
                "Responses the first reward could not score (plugin error or time-out); not counted wrong.",
            ),
            (
                "eval/{mode}_tool_call_rate",
                "fraction",
                "With an `env:` (`greedy`, `sampled`): share of episodes with at least one tool call.",
            ),
            (
                "eval/{mode}_turns_mean",
                "count",
                "With an `env:` (`greedy`, `sampled`): assistant turns per episode, mean.",
            ),
        ],
    ),
    *_group(
        "sft",
        [
            (
                "sft/nll",
                "nats",
                "Mean negative log-likelihood per demonstration token (the step's `actor/loss`).",
            ),
        ],
    ),
    Metric(
        "placement",
        "record",
        "Which node runs what: `{driver: {node, pid}, rollout: [worker info, slot], learner: [rank info, "
        "rank]}`; at the start and after each learner restart (also `placement.json`). Not a scalar: "
        "sinks of numbers skip it.",
        "run",
        kind="record",
    ),
)

_EXACT: dict[str, Metric] = {m.name: m for m in METRICS if not m.is_pattern}
# The most specific pattern first: `reward/{label}_errors` before `reward/{label}`.
_PATTERNS: list[Metric] = sorted(
    (m for m in METRICS if m.is_pattern), key=lambda m: -len(_PLACEHOLDER.sub("", m.name))
)
_found: dict[str, Metric | None] = {}
_warned: set[str] = set()


def lookup(key: str) -> Metric | None:
    """The registered metric (or family) `key` belongs to; None if unregistered."""
    if key in _EXACT:
        return _EXACT[key]
    if key not in _found:  # keys repeat every step: match the patterns once per key
        _found[key] = next((m for m in _PATTERNS if m.matches(key)), None)
    return _found[key]


def unknown(keys: Iterable[str]) -> list[str]:
    """The keys among `keys` that no registered metric covers, in order."""
    return [key for key in keys if lookup(key) is None]


def strict() -> bool:
    return os.environ.get(STRICT_ENV, "") == "1"


def check(keys: Iterable[str]) -> None:
    """Unregistered keys: ValueError naming them under `RLSTACK_STRICT_METRICS=1`, else one warning per key
    per process (the metric is still logged)."""
    missing = unknown(keys)
    if not missing:
        return
    if strict():
        raise ValueError(
            f"unregistered metric key(s) {', '.join(missing)}: add them to rlstack/monitor/registry.py "
            f"(METRICS) and run `{REGENERATE}` ({STRICT_ENV}=1)"
        )
    for key in missing:
        if key not in _warned:
            _warned.add(key)
            logger.warning(
                "metric %r is not in rlstack.monitor.registry (docs/metrics.md); logged anyway", key
            )


def render_markdown() -> str:
    """docs/metrics.md: where metrics go, then one table per group (name, unit, meaning)."""
    lines = [
        "# Metrics",
        "",
        f"<!-- Generated by `{REGENERATE}` from rlstack/monitor/registry.py; do not edit. -->",
        "",
        "Every step's metrics go to `<run_dir>/metrics.jsonl` (always; one JSON object per step) and to "
        "the sinks listed in `logging.sinks`: TensorBoard (`<run_dir>/tb/`), W&B and MLflow. Keys are "
        "`group/name`; `{placeholder}` stands for one path segment (a reward's label, a layer index, ...). "
        "Non-finite values are written as `null`.",
        "",
        "The list below is the registry the sink checks every key against: a key missing from it is logged "
        f"with a warning (an error under `{STRICT_ENV}=1`, as in the tests). Units: `s` seconds, `tokens`, "
        "`count`, `fraction` (0 to 1), `nats`, `1` dimensionless, `reward` the reward's scale, `MiB` = 2^20 "
        "bytes.",
    ]
    for group, (title, note) in GROUPS.items():
        metrics = [m for m in METRICS if m.group == group]
        if not metrics:
            continue
        lines += ["", f"## {title}", "", note, "", "| name | unit | meaning |", "|---|---|---|"]
        for m in metrics:
            meaning = m.meaning.replace("|", "\\|")
            lines.append(f"| `{m.name}` | {m.unit} | {meaning} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m rlstack.monitor.registry", description="Print or write docs/metrics.md."
    )
    parser.add_argument("--write", metavar="PATH", help=f"write the markdown to PATH (e.g. {DOC_PATH})")
    args = parser.parse_args(argv)
    text = render_markdown()
    if args.write is None:
        print(text, end="")
    else:
        with open(args.write, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
