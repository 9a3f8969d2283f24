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
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlstack.config import ConfigError, RunConfig, dump_config
from rlstack.faults import Deadlines, FaultCounters, LearnerFailure, StopSignals
from rlstack.mispo.config import AlgorithmConfig
from rlstack.monitor.samples import DroppedRollout
from rlstack.rewards.scoring import score_rollouts, unscored_reason
from rlstack.run import check_env, init_ray, initial_policy
from rlstack.run_dir import CHECKPOINTS, claim_run_dir, latest_checkpoint
from rlstack.step_metrics import StageTimer, reward_summary, rollout_metrics
from rlstack.types import Rollout

if TYPE_CHECKING:
    from rlstack.dynamic_sampling import Selection
    from rlstack.learner.batch import PolicyBatch
    from rlstack.mispo.filters import FilterResult
    from rlstack.perf import FlopsPerToken

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
        else:
            check_outside_outputs(cfg, self.run_dir)
        validate_specs(cfg.rewards)
        self.tools = check_env(cfg)  # the environment's tool schemas, for the chat template
        self.source = PromptSource.from_config(cfg.data)
        self.heldout = load_split(cfg.data, "heldout")[: cfg.eval.num_problems]

        self._lock = claim_run_dir(self.run_dir)  # one run per directory; released by close()
        try:
            self._prepare_run_dir(resume_from is not None)
            if resume_from is not None:  # a save that crashed between its renames was put back just now
                resume_from = latest_checkpoint(self.run_dir)
            dump_config(cfg, self.run_dir / "config.resolved.yaml")
            self.initial = initial_policy(cfg, self.run_dir)
            policy = resume_from or self.initial
            check_architecture(policy)  # transformers (learner) and vLLM (engines) both implement it
        except BaseException:
            self._lock.release()
            raise
        self.tokenizer = AutoTokenizer.from_pretrained(policy)
        self.flops_per_token = flops_per_token_of(policy)
        driver_state = None
        if resume_from is not None:
            driver_state = torch.load(resume_from / "trainer_state" / DRIVER_STATE, weights_only=False)
        self.mis_filter = MISFilter(cfg.algorithm)
        self.step_index = 0
        self.queue: deque[Submitted] = deque()
        # where a learner that fails before the first checkpoint restarts from: this run's start
        self._initial_state = self._driver_state(queue=[])
        self.deadlines = Deadlines(cfg.faults, Deadlines.checkpoint_mb(policy))
        self.faults = FaultCounters()
        self._owns_ray = init_ray(cfg)
        try:
            self._start(policy, resume_from, driver_state)
        except BaseException:
            self.close()  # the actors already started, and Ray if this call started it
            raise

    def _prepare_run_dir(self, resuming: bool) -> None:
        """A fresh run moves a previous run's outputs aside (never reusing its checkpoints, `init`
        included); any run removes what a save that crashed left half-written."""
        from rlstack.run_dir import archive_previous_run, clean_staging

        if not resuming:
            moved = archive_previous_run(self.run_dir)
            if moved is not None:
                logger.warning("%s held a previous run; its outputs moved to %s", self.run_dir, moved)
        for path in clean_staging(self.run_dir):
            logger.warning("cleaned up %s: left by a checkpoint save that never finished", path)

    def _start(self, policy: Path, resume_from: Path | None, driver_state: dict[str, Any] | None) -> None:
        from rlstack.metrics import MetricsSink, truncate_metrics
        from rlstack.monitor.samples import SampleWriter
        from rlstack.rewards.group import RewardGroup
        from rlstack.rollout.sync.push import attach

        self.rewards = RewardGroup(self.cfg.rewards, self.cfg.reward_workers, self.cfg.sandbox)
        self._start_learner_and_rollout(policy, version=driver_state["step"] if driver_state else 0)
        if resume_from is not None and driver_state is not None:
            self._restore(resume_from, driver_state)
        truncate_metrics(self.run_dir, self.step_index)  # a resumed run rewrites the steps it redoes
        tokenizer = self.tokenizer
        self.samples = SampleWriter(self.run_dir, self.cfg.logging, lambda t: str(tokenizer.decode([t])))
        attach(self.learner, self.rollout)  # broadcast: the learner's rank 0 gets the backend
        self.rollout.on_replace = self._refresh_engines
        self.sink = MetricsSink(self.run_dir, self.cfg.logging, run_config=self.cfg.model_dump(mode="json"))
        self._record_placement()

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
        dropped = [DroppedRollout(r, f"stale: more than {self.max_staleness} updates old") for r in stale]
        if self.cfg.trainer.dynamic_sampling.enabled:
            selection, dynamic_metrics = self._fill_signal_groups(rollouts, reward_info, timer)
            rollouts, reward_info = selection.rollouts, selection.reward_info
            dropped += selection.dropped
            staleness_metrics |= enforce_staleness(rollouts, self.learner.version, self.max_staleness)[2]
            staleness_metrics["staleness/dropped"] = float(len(stale))
            reward_metrics |= dynamic_metrics
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
        metrics |= rollout_metrics(rollouts, timer.seconds, generated_at)
        metrics |= self._perf(rollouts, batch, timer.seconds, fused)
        metrics |= self.faults.metrics(self.rollout) | {"data/prompts_drawn": float(self.source.drawn)}
        self.sink.log(self.step_index, metrics)
        self.samples.write(self.step_index, rollouts, batch, reward_info, dropped, self.step_index - 1)
        return metrics

    def fit(self, progress: bool = True) -> dict[str, Any]:
        """Evaluate, train `trainer.steps` steps (checkpointing and evaluating as configured), evaluate.

        A learner that dies or hangs restarts from the last checkpoint and the steps after it are redone
        (`faults.max_learner_restarts`). SIGINT / SIGTERM finish the current step, save a checkpoint and
        return (`stopped`: the signal's name; no final evaluation); a second one abandons the step."""
        from rlstack.progress import TrainProgress

        before = self.evaluate() if self.step_index == 0 else None
        if before:
            self.sink.log(0, {f"eval/{k}": v for k, v in before.items()})
        every, eval_every = self.cfg.trainer.checkpoint_every, self.cfg.trainer.eval_every
        after: dict[str, float] | None = None  # the evaluation of the current step, once made
        final: Path | None = None  # the checkpoint of the current step, once saved
        with (
            TrainProgress(
                self.cfg.trainer.steps,
                self.step_index,
                enabled=progress,
                every_s=self.cfg.logging.progress_every_s,
            ) as bar,
            StopSignals() as stop,
        ):
            while self.step_index < self.cfg.trainer.steps and stop.received is None:
                try:
                    metrics = self.step()
                    after = final = None
                    bar.update(self.step_index, metrics)
                    if every and self.step_index % every == 0:
                        final = self.save_checkpoint()
                    if eval_every and self.step_index % eval_every == 0:
                        after = self.evaluate()
                        self.sink.log(self.step_index, {f"eval/{k}": v for k, v in after.items()})
                except LearnerFailure as failure:
                    self._restart_learner(failure)
                    after = final = None
            if stop.received is not None:
                logger.warning(
                    "%s: stopping after step %d; resume with `rlstack train CONFIG --resume %s`",
                    stop.received,
                    self.step_index,
                    self.run_dir,
                )
                return {
                    "before": before,
                    "after": None,
                    "checkpoint": str(final or self.save_checkpoint()),
                    "stopped": stop.received,
                }
        # the last step's periodic evaluation and checkpoint, if any, are the final ones: not made twice
        if after is None:
            after = self.evaluate()
            self.sink.log(self.step_index, {f"eval/{k}": v for k, v in after.items()})
        if final is None:
            final = self.save_checkpoint()
        return {"before": before, "after": after, "checkpoint": str(final), "stopped": None}

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

    def _submit(self, rows: list[dict[str, Any]], step: int, extra_round: int = 0) -> Any:
        """Generate `rows` for `step` (`extra_round` > 0: dynamic sampling's extra rounds of that step)."""
        from rlstack.data.prompts import rollout_prompt

        tag = f"{step}+{extra_round}" if extra_round else f"{step}"  # prompt ids: one group per submission
        prompts = [
            rollout_prompt(
                self.tokenizer, r, f"{tag}:{i}:{r['prompt_id']}", self.tools, self.cfg.data.chat_template
            )
            for i, r in enumerate(rows)
        ]
        # A seed per step and round: a resumed run samples exactly what the original would have.
        seed = self.cfg.rollout.sampling.seed + 1_000_003 * self.cfg.trainer.seed + 10_007 * step
        sampling = self.cfg.rollout.sampling.model_copy(update={"seed": seed + 104_729 * extra_round})
        return self.rollout.submit(prompts, sampling, step=step + 1)

    def _fill_signal_groups(
        self, rollouts: list[Rollout], reward_info: list[dict[str, Any]], timer: StageTimer
    ) -> tuple[Selection, dict[str, float]]:
        """Dynamic sampling (`trainer.dynamic_sampling`): generate and score further rounds of
        `prompts_per_step` prompts with the current weights until the step has that many groups with
        signal (or `max_rounds` are spent); select them. Metrics count the rounds and what they cost."""
        from rlstack.dynamic_sampling import groups_with_signal, select_groups
        from rlstack.staleness import enforce_staleness

        want, cfg = self.cfg.trainer.prompts_per_step, self.cfg.trainer.dynamic_sampling
        first_groups = len(groups_with_signal(rollouts))
        pool, info = list(rollouts), list(reward_info)
        rounds = 0
        while len(groups_with_signal(pool)) < want and rounds < cfg.max_rounds:
            rounds += 1
            rows = self.source.next_batch(want)
            with timer("generate"):
                extra = self.rollout.collect(self._submit(rows, self.step_index, extra_round=rounds))
            # generated with the current weights: nothing is stale; the rule still holds them to it
            extra, stale, _ = enforce_staleness(extra, self.learner.version, self.max_staleness)
            if stale:
                raise RuntimeError(f"dynamic sampling: {len(stale)} rollouts of a fresh round are stale")
            with timer("score"):
                extra_info = self._score(extra)[1]
            pool += extra
            info += extra_info
        selection = select_groups(pool, info, want)
        return selection, {
            "dynamic/rounds": float(rounds),
            "dynamic/extra_rollouts": float(len(pool) - len(rollouts)),
            "dynamic/first_signal_groups": float(first_groups),
            "dynamic/signal_groups": float(selection.groups),
            "dynamic/short_groups": float(want - selection.groups),
        }

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
        """New weights into the engines, by `rollout.weight_sync` (rollout.sync.push). An engine that dies
        or hangs during the push is replaced and the push made again, in full."""
        from rlstack.rollout.sync.push import push_policy

        try:
            return push_policy(self.learner, self.rollout)
        except LearnerFailure:
            raise
        except Exception as error:  # a failed engine: whatever the transport raised
            replaced = self.rollout.check_health()  # replacements get the weights (`_refresh_engines`)
            if not replaced:
                raise
            logger.error(
                "weight sync failed (%s); replaced rollout workers %s, pushing again", error, replaced
            )
            return push_policy(self.learner, self.rollout)  # the failed push forgot its digests: in full

    def _refresh_engines(self, slots: list[int]) -> None:
        """Replaced rollout workers onto the learner's current weights (`RolloutGroup.on_replace`)."""
        if self.rollout.weight_sync.pushes_from_learner:
            from rlstack.rollout.sync.push import push_policy

            self._rebuild_weight_sync()  # the broadcast group had the old worker in it
            push_policy(self.learner, self.rollout)
        else:
            self.rollout.load_weights_into(slots, self.learner.export_weights(), self.learner.version)

    def _rebuild_weight_sync(self) -> None:
        from rlstack.rollout.sync.push import attach

        self.rollout.rebuild_weight_sync()
        attach(self.learner, self.rollout)

    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy with the current rollout weights: greedy, and sampled (eval.samples each)."""
        from rlstack.evaluate import accuracy

        return accuracy(self.rollout, self.tokenizer, self.rewards, self.heldout, self.cfg)

    # ---- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """`checkpoints/step_N/`: the learner's checkpoint and the driver's state, written into a staging
        directory and renamed into place whole; then `latest` names it (atomically) and checkpoints older
        than the newest `trainer.keep_last` go. A crash at any point leaves the previous one usable."""
        from rlstack.run_dir import pause_point, prune_checkpoints, publish, staging_dir, write_latest

        name = f"step_{self.step_index}"
        staging = staging_dir(self.run_dir, name)
        self.learner.save_checkpoint(staging)
        # Generation in flight is finished first, and the finished rollouts are saved with their token
        # versions: the resumed run trains on exactly these, as the uninterrupted run does.
        queue = [(item.rows, item.step, self._finished(item)) for item in self.queue]
        torch.save(self._driver_state(queue), staging / "trainer_state" / DRIVER_STATE)
        pause_point(f"checkpoint_save:{name}")  # test-only: lets a test kill the run inside a save
        path = self.run_dir / CHECKPOINTS / name
        publish(staging, path)
        write_latest(self.run_dir, name)
        for old in prune_checkpoints(self.run_dir, self.cfg.trainer.keep_last):
            logger.info("removed %s (trainer.keep_last = %d)", old, self.cfg.trainer.keep_last)
        return path

    def _driver_state(self, queue: list[Any]) -> dict[str, Any]:
        return {
            "step": self.step_index,
            "source": self.source.state_dict(),
            "mis_filter": self.mis_filter.state_dict(),
            "queue": queue,
        }

    def _start_learner_and_rollout(self, policy: Path, version: int) -> None:
        """The learner ranks and the rollout engines, started at once: each takes seconds to import its
        stack and set up, and neither needs the other until the first weight push."""
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
                faults=cfg.faults,
                replacement_path=self.initial,
            )
            try:
                self.learner = self._make_learner(policy)
            except BaseException:
                try:  # wait for the engines, so that close() stops them; the learner error is raised
                    self.rollout = rollout_start.result()
                except BaseException as rollout_error:
                    logger.error("the rollout engines failed to start too: %s", rollout_error)
                raise
            self.rollout = rollout_start.result()

    def _make_learner(self, policy: Path) -> Any:
        from rlstack.learner import LearnerGroup
        from rlstack.learner.logprobs import SamplingTransform

        cfg = self.cfg
        return LearnerGroup(
            policy,
            cfg.learner,
            # the KL reference is the run's initial policy, also when resuming from a later checkpoint
            reference_path=self.initial if cfg.algorithm.kl_coef > 0.0 else None,
            transform=SamplingTransform.from_sampling(cfg.rollout.sampling),
            deadlines=self.deadlines,
        )

    def _restore(self, path: Path | None, state: dict[str, Any]) -> None:
        """Resume: the learner's checkpoint (None: the run's start) and the driver's state (step, data
        order, filter, queue)."""
        version = self.learner.load_checkpoint(path) if path is not None else self.learner.version
        self.step_index = state["step"]
        self.source.load_state_dict(state["source"])
        self.mis_filter.load_state_dict(state["mis_filter"])
        # (rows, step, rollouts); a checkpoint from before the rollouts were saved holds (rows, step)
        self.queue = deque(
            Submitted(item[0], item[1], rollouts=item[2] if len(item) > 2 else None)
            for item in state["queue"]
        )
        assert version == self.step_index, f"learner version {version} != driver step {self.step_index}"

    def _restart_learner(self, failure: LearnerFailure) -> None:
        """A failed learner: a new one from the last checkpoint (or the run's start), the engines rolled back
        to its weights, the driver's state (step, data cursor, filter, queued rollouts) restored, and the
        records of the steps after it dropped: they are redone, nothing counted twice or skipped."""
        from rlstack.metrics import truncate_metrics
        from rlstack.rollout.sync.push import attach, push_policy

        started = time.monotonic()
        checkpoint = latest_checkpoint(self.run_dir)
        limit = self.cfg.faults.max_learner_restarts
        if self.faults.learner_restarts >= limit:
            where = f"--resume {self.run_dir} (from {checkpoint})" if checkpoint else "a fresh run"
            raise RuntimeError(
                f"{failure}; the learner was restarted {self.faults.learner_restarts} times already, the "
                f"most faults.max_learner_restarts = {limit} allows. Fix the cause, then `rlstack train "
                f"CONFIG {where}`"
            ) from failure
        logger.error("%s; restarting the learner from %s", failure, checkpoint or "the run's start")
        self.learner.shutdown(graceful=False)
        for item in self.queue:
            if item.pending is not None:
                self.rollout.abandon(item.pending)
        state = self._initial_state
        if checkpoint is not None:
            state = torch.load(checkpoint / "trainer_state" / DRIVER_STATE, weights_only=False)
        redone = self.step_index - state["step"]
        self.learner = self._make_learner(checkpoint or self.initial)
        self._restore(checkpoint, state)
        if self.rollout.weight_sync.pushes_from_learner:
            self.rollout.rebuild_weight_sync()  # the broadcast group's rank 0 was the old learner
            attach(self.learner, self.rollout)
        push_policy(self.learner, self.rollout)  # the engines roll back to the checkpoint's weights
        truncate_metrics(self.run_dir, self.step_index)
        self.sink.redo(self.step_index + 1)
        self.faults.learner_restarts += 1
        self.faults.steps_redone += redone
        self.faults.lost_seconds += time.monotonic() - started
        self._record_placement()

    def _perf(
        self, rollouts: list[Rollout], batch: PolicyBatch, seconds: dict[str, float], fused: bool
    ) -> dict[str, float]:
        """perf/mfu, perf/learner_tflops, perf/rollout_tokens_per_s (rlstack.perf); none for a policy
        whose architecture rlstack.perf cannot count (said once, at start)."""
        from rlstack.perf import generation_seconds, step_perf

        if self.flops_per_token is None:
            return {}
        return step_perf(
            self.flops_per_token,
            batch.attention_mask.sum(1).tolist(),
            seconds["train"],
            self.learner.peak_flops,
            sum(sum(r.response_mask or []) for r in rollouts),
            generation_seconds(rollouts),
            old_logprobs_seconds=None if fused else seconds.get("old_logprobs"),
            reference=self.cfg.algorithm.kl_coef > 0.0,
        )

    def _record_placement(self) -> None:
        """Which node runs what: `placement.json`, and a `placement` record in metrics.jsonl."""
        import ray

        placement = {
            "driver": {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()},
            "rollout": [dict(i, slot=s) for s, i in enumerate(self.rollout.info)],
            "learner": [dict(i, rank=r) for r, i in enumerate(self.learner.info)],
        }
        (self.run_dir / "placement.json").write_text(json.dumps(placement, indent=2, default=str) + "\n")
        self.sink.log(self.step_index, {"placement": placement})

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
        if hasattr(self, "_lock"):
            self._lock.release()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- helpers ----------------------------------------------------------------------------------------


def flops_per_token_of(policy: Path) -> FlopsPerToken | None:
    """The policy's model FLOPs per token (rlstack.perf), or None with a warning for an architecture it
    cannot count (then no perf/* metrics)."""
    from transformers import AutoConfig

    import rlstack.model  # noqa: F401  (registers the Step3p5 config with transformers)
    from rlstack.perf import model_flops_per_token

    try:
        return model_flops_per_token(AutoConfig.from_pretrained(policy))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        logger.warning("no perf/mfu for this policy: rlstack.perf cannot count its FLOPs (%s)", e)
        return None


def check_outside_outputs(cfg: RunConfig, run_dir: Path) -> None:
    """A fresh run moves the previous run's outputs aside: the policy it starts from must not be one."""
    if cfg.model.path is None or not Path(cfg.model.path).exists():
        return
    from rlstack.run_dir import RUN_OUTPUTS

    policy = Path(cfg.model.path).resolve()
    for name in RUN_OUTPUTS:
        if policy.is_relative_to((run_dir / name).resolve()):
            raise ConfigError(
                f"model.path {cfg.model.path} lies in {run_dir / name}, which a fresh run in {run_dir} moves "
                "aside; copy that checkpoint elsewhere, pick another trainer.run_dir, or continue the run "
                f"with --resume {run_dir}"
            )
