"""The single controller: the only place that sees the whole RL loop.

`Trainer.step()` reads top to bottom: sample prompts → generate → score → old log-probs (and critic
values) → MIS filters → advantages → train → sync weights → log. Where exact (`learner.fuse_old_logp`),
the old log-probs and filters come out of the training forward instead of a pass of their own.
Sync mode runs them in turn; async mode keeps up to `max_staleness` generation batches queued on the
rollout actors, so the next batch is sampled (by the previous policy) while the learner trains, and a batch
made by version v is trained on only while current − v ≤ k.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlstack.config import ConfigError, RunConfig, dump_config
from rlstack.mispo.config import AlgorithmConfig
from rlstack.rewards.scoring import score_rollouts, unscored_reason
from rlstack.run import CHECKPOINTS, check_env, init_ray, initial_policy, latest_checkpoint
from rlstack.types import Rollout

if TYPE_CHECKING:
    from rlstack.learner.batch import PolicyBatch
    from rlstack.mispo.filters import FilterResult

DRIVER_STATE = "driver_state.pt"
logger = logging.getLogger(__name__)


@dataclass
class Submitted:
    """Prompts whose generation was submitted (and not yet trained on): part of the resumable state.

    A checkpoint waits for the generation in flight to finish and saves the finished `rollouts`, token
    versions and log-probs included, so a resumed run trains on exactly what the uninterrupted run would
    have (same tokens, same staleness), instead of regenerating them with the restored policy."""

    rows: list[dict[str, Any]]
    step: int  # the step whose sampling seed generates them
    pending: Any = None  # rollout.group.PendingRollouts while generating
    rollouts: list[Rollout] | None = None  # the finished generation (after a checkpoint or a resume)


def check_routing_replay(policy: Path, mode: str) -> None:
    """Refuse routing replay, before anything starts, for a policy whose routing the learner cannot replay
    (a dense model, or a MoE class without replay support)."""
    if mode == "off":
        return
    from rlstack.model.auto import replay_support

    problem = replay_support(policy)
    if problem is not None:
        raise ValueError(
            f"learner.routing_replay = '{mode}' replays MoE routing, but the policy {policy} {problem}; set "
            "learner.routing_replay: 'off'"
        )


class Trainer:
    def __init__(self, cfg: RunConfig, resume: bool = False, allow_config_change: bool = False) -> None:
        from transformers import AutoTokenizer

        from rlstack.config import check_resume_config
        from rlstack.data.sources import PromptSource, load_split
        from rlstack.mispo import MISFilter
        from rlstack.model.auto import check_architecture
        from rlstack.rewards.registry import validate_specs

        self.cfg = cfg
        self.run_dir = Path(cfg.trainer.run_dir)
        # Bad input fails here, with a name, before Ray, any actor or the run directory's files exist.
        resume_from = latest_checkpoint(self.run_dir) if resume else None
        if resume and resume_from is None:
            raise ConfigError(f"--resume {self.run_dir}: no checkpoint there (no checkpoints/latest)")
        if resume_from is not None:
            check_resume_config(self.run_dir, cfg, allow_config_change)
        validate_specs(cfg.rewards)
        self.tools = check_env(cfg)  # the environment's tool schemas, for the chat template
        self.source = PromptSource.from_config(cfg.data)
        self.heldout = load_split(cfg.data, "heldout")[: cfg.eval.num_problems]

        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, self.run_dir / "config.resolved.yaml")
        initial = initial_policy(cfg, self.run_dir)
        policy = resume_from or initial
        check_architecture(policy)  # transformers (learner) and vLLM (engines) both implement it
        self.tokenizer = AutoTokenizer.from_pretrained(policy)
        driver_state = None
        if resume_from is not None:
            driver_state = torch.load(resume_from / "trainer_state" / DRIVER_STATE, weights_only=False)
        self.mis_filter = MISFilter(cfg.algorithm)
        self.step_index = 0
        self.queue: deque[Submitted] = deque()
        self._owns_ray = init_ray(cfg)
        try:
            self._start(policy, initial, resume_from, driver_state)
        except BaseException:
            self.close()  # the actors already started, and Ray if this call started it
            raise

    def _start(
        self, policy: Path, initial: Path, resume_from: Path | None, driver_state: dict[str, Any] | None
    ) -> None:
        from rlstack.metrics import EXPERT_LOAD, MetricsSink, archive_previous_run, truncate_metrics
        from rlstack.rewards.group import RewardGroup
        from rlstack.rollout.sync.push import attach

        self.rewards = RewardGroup(self.cfg.rewards, self.cfg.reward_workers, self.cfg.sandbox)
        self._start_learner_and_rollout(policy, initial, version=driver_state["step"] if driver_state else 0)
        if resume_from is not None and driver_state is not None:
            self._restore(resume_from, driver_state)
        self.samples_path = self.run_dir / "samples" / "rollouts.jsonl"
        self.samples_path.parent.mkdir(exist_ok=True)
        if resume_from is None:
            archive_previous_run(
                [self.run_dir / "metrics.jsonl", self.run_dir / EXPERT_LOAD, self.samples_path]
            )
        else:
            truncate_metrics(self.run_dir, self.step_index)
        attach(self.learner, self.rollout)  # broadcast: the learner's rank 0 gets the backend
        self.sink = MetricsSink(self.run_dir, tensorboard=self.cfg.trainer.tensorboard)

    # ---- the loop ------------------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        from rlstack.learner import collate
        from rlstack.mispo import compute_advantages
        from rlstack.staleness import enforce_staleness

        timer = StageTimer()
        with timer("generate"):
            rollouts, generated_at = self._next_rollouts()
        # The staleness rule, at training time: nothing older than max_staleness updates ever trains.
        rollouts, stale, staleness_metrics = enforce_staleness(
            rollouts, self.learner.version, self.max_staleness
        )
        if not rollouts:
            raise RuntimeError(
                f"step {self.step_index + 1}: all {len(stale)} rollouts are more than {self.max_staleness} "
                "updates old; nothing may train (the rollout queue should make this impossible)"
            )
        with timer("score"):
            reward_metrics, reward_info = self._score(rollouts)
        # Unscored samples (no reward applied) leave the loss, the filters and their group's statistics.
        batch = collate(rollouts, pad_id=self.tokenizer.pad_token_id).without_unscored()
        fused = self._old_logp_from_train_forward()
        if not fused:
            with timer("old_logprobs"):
                batch = batch.replace(old_logp=self.learner.compute_logprobs(batch))
        values = None
        if self.cfg.algorithm.advantage == "critic":
            with timer("values"):
                values = self.learner.compute_values(batch)  # (B, L + 1) V(s_t), aligned like old_logp
        if not fused:
            assert batch.old_logp is not None  # computed above
            batch = batch.replace(filter=self._filter(batch.old_logp, batch))
        advantages, returns = compute_advantages(
            self.cfg.algorithm,
            batch.rewards,
            batch.loss_mask,
            group_ids=batch.group_ids,
            truncated=batch.truncated,
            values=values,
        )
        with timer("train"):
            batch = batch.replace(advantages=advantages, returns=returns)
            result = self.learner.train(batch, self.cfg.algorithm, old_logp_from_forward=fused)
            train_metrics = result.metrics
            if fused:  # pi_old came out of the training forward; the step's filter over it, afterwards
                if result.old_logp is None:
                    raise RuntimeError("the learner returned no pi_old from the training forward")
                flt = self._filter(result.old_logp, batch)
                batch = batch.replace(old_logp=result.old_logp, filter=flt)
                train_metrics |= flt.metrics  # batch-level quantiles, not micro-batch averages
        with timer("sync"):
            sync_metrics = self._sync_weights()
        self.step_index += 1
        metrics = {**reward_metrics, **staleness_metrics, **train_metrics, **sync_metrics, **timer.metrics()}
        metrics |= rollout_metrics(rollouts, timer.seconds["generate"], generated_at)
        self.sink.log(self.step_index, metrics)
        self._save_samples(rollouts, batch, reward_info, stale)
        return metrics

    def fit(self, progress: bool = True) -> dict[str, Any]:
        """Evaluate, train `trainer.steps` steps (checkpointing and evaluating as configured), evaluate."""
        from rlstack.progress import TrainProgress

        before = self.evaluate() if self.step_index == 0 else None
        if before:
            self.sink.log(0, {f"eval/{k}": v for k, v in before.items()})
        every, eval_every = self.cfg.trainer.checkpoint_every, self.cfg.trainer.eval_every
        after: dict[str, float] | None = None  # the evaluation of the current step, once made
        final: Path | None = None  # the checkpoint of the current step, once saved
        with TrainProgress(self.cfg.trainer.steps, self.step_index, enabled=progress) as bar:
            while self.step_index < self.cfg.trainer.steps:
                metrics = self.step()
                after = final = None
                bar.update(self.step_index, metrics)
                if every and self.step_index % every == 0:
                    final = self.save_checkpoint()
                if eval_every and self.step_index % eval_every == 0:
                    after = self.evaluate()
                    self.sink.log(self.step_index, {f"eval/{k}": v for k, v in after.items()})
        # the last step's periodic evaluation and checkpoint, if any, are the final ones: not made twice
        if after is None:
            after = self.evaluate()
            self.sink.log(self.step_index, {f"eval/{k}": v for k, v in after.items()})
        if final is None:
            final = self.save_checkpoint()
        return {"before": before, "after": after, "checkpoint": str(final)}

    # ---- stages ----------------------------------------------------------------------------------

    def use_algorithm(self, algorithm: AlgorithmConfig) -> None:
        """Train the next steps with another algorithm config (a fresh MIS filter state with it). The
        learner's set-up must fit it: a critic for `advantage: critic`, a reference for `kl_coef > 0`."""
        if (algorithm.advantage == "critic") != self.cfg.learner.critic.enabled:
            raise ConfigError("use_algorithm: the learner's critic does not match algorithm.advantage")
        if algorithm.kl_coef > 0.0 and not self.learner.has_reference:
            raise ConfigError("use_algorithm: kl_coef > 0 needs a learner built with the reference policy")
        from rlstack.mispo import MISFilter

        self.cfg.algorithm = algorithm
        self.mis_filter = MISFilter(algorithm)

    @property
    def max_staleness(self) -> int:
        """The staleness bound k: `trainer.max_staleness` in async mode, 0 in sync mode."""
        return self.cfg.trainer.max_staleness if self.cfg.trainer.mode == "async" else 0

    def _next_rollouts(self) -> tuple[list[Rollout], int]:
        """Sync: submit and wait. Async: keep 1 + k batches submitted; take the oldest."""
        depth = 1 + self.max_staleness
        while len(self.queue) < depth:
            step = self.step_index + len(self.queue)
            rows = self.source.next_batch(self.cfg.trainer.prompts_per_step)
            self.queue.append(Submitted(rows, step, self._submit(rows, step)))
        item = self.queue.popleft()
        return self._finished(item), item.step

    def _finished(self, item: Submitted) -> list[Rollout]:
        """The item's rollouts, waiting for its generation if it is still in flight."""
        if item.rollouts is None:
            if item.pending is None:  # a checkpoint from before queued rollouts were saved: regenerate
                item.pending = self._submit(item.rows, item.step)
            item.rollouts = self.rollout.collect(item.pending)
            item.pending = None
        return item.rollouts

    def _submit(self, rows: list[dict[str, Any]], step: int) -> Any:
        from rlstack.data.prompts import rollout_prompt

        prompts = [
            rollout_prompt(
                self.tokenizer, r, f"{step}:{i}:{r['prompt_id']}", self.tools, self.cfg.data.chat_template
            )
            for i, r in enumerate(rows)
        ]
        # A seed per step: a resumed run samples exactly what the original would have.
        sampling = self.cfg.rollout.sampling.model_copy(
            update={
                "seed": self.cfg.rollout.sampling.seed + 1_000_003 * self.cfg.trainer.seed + 10_007 * step
            }
        )
        return self.rollout.submit(prompts, sampling)

    def _old_logp_from_train_forward(self) -> bool:
        """Whether pi_old can come from the training forward exactly (see `learner.fuse_old_logp`)."""
        from rlstack.learner.step import old_logp_from_forward_is_exact

        learner = self.cfg.learner
        exact = old_logp_from_forward_is_exact(learner.n_minibatches, self.cfg.algorithm)
        return learner.fuse_old_logp and exact

    def _filter(self, old_logp: torch.Tensor, batch: PolicyBatch) -> FilterResult:
        """The step's MIS filter over the whole batch (pi_old vs the rollout engine's log-probs)."""
        return self.mis_filter(old_logp, batch.rollout_logp, batch.loss_mask)

    def _score(self, rollouts: list[Rollout]) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Rewards onto the rollouts; returns metrics and each sample's reward details (for samples/)."""
        result = score_rollouts(self.rewards, rollouts)
        info = [
            {label: details[i] for label, details in (result.info or {}).items() if details[i] is not None}
            for i in range(len(rollouts))
        ]
        for rollout, reward, details in zip(rollouts, result.total, info, strict=True):
            rollout.reward = None if reward is None else float(reward)
            rollout.unscored_reason = unscored_reason(details) if reward is None else None
        metrics = reward_summary([r.reward for r in rollouts])
        for label, values in result.per_reward.items():
            applied = [v for v in values if v is not None]
            metrics[f"reward/{label}"] = sum(applied) / len(applied) if applied else float("nan")
            metrics[f"reward/{label}_none_frac"] = 1 - len(applied) / max(len(values), 1)
            metrics[f"reward/{label}_errors"] = float(result.errors[label])
            metrics[f"reward/{label}_timeouts"] = float(result.timeouts.get(label, 0))
        metrics["reward/cache_hits"] = float(result.cache_hits)
        metrics["reward/workers_restarted"] = float(result.workers_restarted)
        return metrics, info

    def _sync_weights(self) -> dict[str, float]:
        """New weights into the engines, by `rollout.weight_sync` (rollout.sync.push)."""
        from rlstack.rollout.sync.push import push_policy

        return push_policy(self.learner, self.rollout)

    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy with the current rollout weights: greedy, and sampled (eval.samples each)."""
        from rlstack.evaluate import accuracy

        return accuracy(self.rollout, self.tokenizer, self.rewards, self.heldout, self.cfg)

    # ---- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        path = self.run_dir / CHECKPOINTS / f"step_{self.step_index}"
        self.learner.save_checkpoint(path)
        # Generation in flight is finished first, and the finished rollouts are saved with their token
        # versions: the resumed run trains on exactly these, as the uninterrupted run does.
        queue = [(item.rows, item.step, self._finished(item)) for item in self.queue]
        state = {
            "step": self.step_index,
            "source": self.source.state_dict(),
            "mis_filter": self.mis_filter.state_dict(),
            "queue": queue,
        }
        torch.save(state, path / "trainer_state" / DRIVER_STATE)
        (self.run_dir / CHECKPOINTS / "latest").write_text(path.name)
        return path

    def _start_learner_and_rollout(self, policy: Path, initial: Path, version: int) -> None:
        """The learner ranks and the rollout engines, started at once: each takes seconds to import its
        stack and set up, and neither needs the other until the first weight push."""
        from rlstack.learner import LearnerGroup
        from rlstack.learner.logprobs import SamplingTransform
        from rlstack.rollout.group import RolloutGroup

        cfg = self.cfg
        check_routing_replay(policy, cfg.learner.routing_replay)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-start") as pool:
            rollout_start = pool.submit(
                RolloutGroup,
                policy,
                cfg.rollout,
                version=version,
                env=cfg.env,
                sandbox=cfg.sandbox,
                # routing replay and the learner's routing probes compare against the engines' routing
                record_routing=cfg.learner.routing_replay == "rollout" or cfg.learner.moe.probe_every > 0,
            )
            try:
                self.learner = LearnerGroup(
                    policy,
                    cfg.learner,
                    # the KL reference is the run's initial policy, also when resuming from a later checkpoint
                    reference_path=initial if cfg.algorithm.kl_coef > 0.0 else None,
                    transform=SamplingTransform.from_sampling(cfg.rollout.sampling),
                )
            except BaseException:
                try:  # wait for the engines, so that close() stops them; the learner error is raised
                    self.rollout = rollout_start.result()
                except BaseException as rollout_error:
                    logger.error("the rollout engines failed to start too: %s", rollout_error)
                raise
            self.rollout = rollout_start.result()

    def _restore(self, path: Path, state: dict[str, Any]) -> None:
        """Resume: the learner's checkpoint and the driver's state (step, data order, filter, queue)."""
        version = self.learner.load_checkpoint(path)
        self.step_index = state["step"]
        self.source.load_state_dict(state["source"])
        self.mis_filter.load_state_dict(state["mis_filter"])
        # (rows, step, rollouts); a checkpoint from before the rollouts were saved holds (rows, step)
        self.queue = deque(
            Submitted(item[0], item[1], rollouts=item[2] if len(item) > 2 else None)
            for item in state["queue"]
        )
        assert version == self.step_index, f"learner version {version} != driver step {self.step_index}"

    def _save_samples(
        self, rollouts: list[Rollout], batch: Any, reward_info: list[dict[str, Any]], stale: list[Rollout]
    ) -> None:
        """One record per rollout of the step; those dropped by the staleness rule are kept too (never
        trained, not scored), so no generated data disappears without a trace."""
        traj_ok = batch.filter.traj_mask.tolist()
        trained = zip(rollouts, traj_ok, reward_info, strict=True)
        dropped: Iterator[tuple[Rollout, bool, dict[str, Any]]] = ((r, False, {}) for r in stale)
        with self.samples_path.open("a") as f:
            for rollout, accepted, info in (*trained, *dropped):
                record = {
                    "step": self.step_index,
                    "prompt_id": rollout.prompt_id,
                    "version": rollout.version,
                    "oldest_version": rollout.oldest_version,
                    "staleness": rollout.staleness(self.step_index - 1),
                    "prompt": rollout.prompt_text,
                    "response": rollout.response_text,
                    "reward": rollout.reward,
                    "finish_reason": rollout.finish_reason,
                    "traj_accepted": bool(accepted),
                }
                if rollout.reward is None:
                    record["unscored_reason"] = rollout.unscored_reason
                if any(rollout is r for r in stale):
                    record["dropped"] = f"stale: more than {self.max_staleness} updates old"
                if info:
                    record["reward_info"] = info
                f.write(json.dumps(record, default=str) + "\n")

    def close(self) -> None:
        import ray

        if ray.is_initialized():
            from rlstack.rewards.judges import shutdown_judges

            shutdown_judges()  # close judge engines inside their actors before their owners go
        for part in ("rollout", "learner", "rewards"):
            if hasattr(self, part):
                getattr(self, part).shutdown()
        if hasattr(self, "sink"):
            self.sink.close()
        if getattr(self, "_owns_ray", False):
            ray.shutdown()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- helpers ----------------------------------------------------------------------------------------


class StageTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, stage: str) -> StageTimer:
        self._stage = stage
        return self

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.seconds[self._stage] = time.perf_counter() - self._start

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()} | {"time/step": sum(self.seconds.values())}


def reward_summary(rewards: list[float | None]) -> dict[str, float]:
    """Reward metrics over the SCORED samples (`reward/mean`, `reward/std`, `reward/accuracy`: > 0.5), and
    the unscored ones counted on their own (`reward/unscored`, `reward/unscored_frac`), never as wrong."""
    scored = torch.tensor([r for r in rewards if r is not None], dtype=torch.float64)  # (S,)
    n = len(rewards)
    return {
        "reward/mean": scored.mean().item() if len(scored) else float("nan"),
        "reward/std": scored.std().item() if len(scored) > 1 else float("nan"),
        "reward/accuracy": (scored > 0.5).double().mean().item() if len(scored) else float("nan"),
        "reward/unscored": float(n - len(scored)),
        "reward/unscored_frac": (n - len(scored)) / max(n, 1),
    }


def rollout_metrics(rollouts: list[Rollout], generate_s: float, generated_at_step: int) -> dict[str, float]:
    from rlstack.rollout.multiturn import episode_metrics

    lengths = torch.tensor([len(r.response_ids) for r in rollouts], dtype=torch.float)
    return episode_metrics(rollouts) | {
        "response/length_mean": lengths.mean().item(),
        "response/length_max": lengths.max().item(),
        "response/truncated_frac": sum(r.truncated for r in rollouts) / len(rollouts),
        "throughput/generate_wait_tokens_per_s": lengths.sum().item() / max(generate_s, 1e-9),
        "batch/generated_for_step": float(generated_at_step),
    }
