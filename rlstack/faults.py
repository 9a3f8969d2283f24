"""Remote calls that fail loudly: every Ray call under a deadline, and failures that name the actor.

A call that hangs (an engine stuck in a kernel, a SIGSTOPped process) or whose actor dies (out of memory,
preemption, a hostile sample) becomes an `ActorFailure` naming the actor, the method and the RL step,
within the call's deadline. The rollout group replaces a failed engine; the driver restarts a failed
learner from its last checkpoint (rlstack.driver); both count what they did (`faults/*` metrics).

Deadlines scale with the work (`Deadlines`, from the run's `faults:` section): a base, plus seconds per
token the call handles (generation, learner passes), or per MiB of weights (syncs, checkpoint saves).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from pydantic import Field

from rlstack.config_base import StrictModel


class FaultsConfig(StrictModel):
    """Deadlines of every remote call, and how many times a failed actor is replaced (rlstack.faults)."""

    deadline_base_s: float = Field(300.0, gt=0)
    """Every remote call's deadline starts at this many seconds..."""
    deadline_per_token_s: float = Field(0.05, ge=0)
    """...plus this many per token the call handles (generation: prompts x n x max_tokens of a worker's
    share, x max_turns with an env; learner: rows x padded length). Raise both on slow hardware."""
    deadline_per_mb_s: float = Field(0.5, ge=0)
    """Weight syncs and checkpoint saves: this many seconds per MiB of fp32 policy weights, on top of the
    base."""
    generate_timeout_s: float | None = Field(None, gt=0)
    """Fixed deadline of one generate call (None: scaled as above)."""
    train_timeout_s: float | None = Field(None, gt=0)
    """Fixed deadline of one learner call: log-probs, values, train (None: scaled as above)."""
    sync_timeout_s: float | None = Field(None, gt=0)
    """Fixed deadline of a weight sync or a checkpoint save (None: scaled with the weights' size)."""
    health_check_s: float = Field(30.0, gt=0)
    """An idle rollout worker that does not answer a ping within this many seconds is replaced."""
    max_rollout_restarts: int = Field(8, ge=0)
    """Rollout workers replaced per run (dead, hung past a deadline, failing a health check) before the run
    stops with the last failure; 0 = never replace, stop at the first."""
    max_learner_restarts: int = Field(2, ge=0)
    """Learner restarts from the last checkpoint per run (its actor died or hung past a deadline) before the
    run stops; 0 = stop at the first failure with a message naming the checkpoint to resume from."""


class ActorFailure(RuntimeError):
    """A Ray actor died or missed a call's deadline. `actors` name the failed ones (the indices into the
    call's actor list in `failed`); `hung` is True for a missed deadline, False for a death."""

    def __init__(
        self,
        call: str,
        names: Sequence[str],
        failed: Sequence[int],
        hung: bool,
        detail: str,
        step: int | None,
    ) -> None:
        self.call, self.failed, self.hung, self.step = call, list(failed), hung, step
        self.actors = [names[i] for i in failed]
        at = f" at step {step}" if step is not None else ""
        what = "did not answer" if hung else "died during"
        super().__init__(f"{', '.join(self.actors)} {what} `{call}`{at}: {detail}")


class LearnerFailure(ActorFailure):
    """A learner rank died or hung: the driver restarts the learner from the last checkpoint."""


def wait_all(
    refs: Sequence[Any],
    names: Sequence[str],
    call: str,
    timeout: float | None,
    step: int | None = None,
    error: type[ActorFailure] = ActorFailure,
) -> list[Any]:
    """`ray.get(refs)`, failing fast: an `ActorFailure` as soon as one actor dies, or naming every actor
    not done when `timeout` seconds have passed. An exception the method itself raised is re-raised as is
    (Ray's RayTaskError, a subclass of the original): that is a bug or bad input, not a failed actor.
    `error`: the failure class to raise (`LearnerFailure` for the learner's ranks)."""
    import ray
    from ray.exceptions import RayActorError

    index = {ref: i for i, ref in enumerate(refs)}
    pending = list(refs)
    end = None if timeout is None else time.monotonic() + timeout
    while pending:
        left = None if end is None else max(0.0, end - time.monotonic())
        ready, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not ready:
            waited = f"no result within the {timeout:.0f} s deadline"
            raise error(call, names, [index[r] for r in pending], True, waited, step)
        try:
            ray.get(ready[0])
        except RayActorError as died_error:
            died = _first_line(died_error)
            raise error(call, names, [index[ready[0]]], False, died, step) from died_error
    return ray.get(list(refs))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


@dataclass(frozen=True)
class Deadlines:
    """Seconds each kind of remote call may take (see `FaultsConfig`). `weights_mb`: the policy's fp32
    size, which syncs and saves scale with."""

    cfg: FaultsConfig
    weights_mb: float = 0.0

    def generate(self, tokens: int) -> float:
        """A generate call that may produce `tokens` tokens."""
        return self.cfg.generate_timeout_s or self._scaled(tokens)

    def learner(self, tokens: int) -> float:
        """A learner pass (log-probs, values, a training step) over `tokens` padded tokens."""
        return self.cfg.train_timeout_s or self._scaled(tokens)

    def weights(self) -> float:
        """Moving the weights: a sync into the engines, a checkpoint save or load, an engine start."""
        return (
            self.cfg.sync_timeout_s or self.cfg.deadline_base_s + self.cfg.deadline_per_mb_s * self.weights_mb
        )

    def _scaled(self, tokens: int) -> float:
        return self.cfg.deadline_base_s + self.cfg.deadline_per_token_s * tokens

    @staticmethod
    def checkpoint_mb(path: str | Path) -> float:
        """MiB of fp32 weights in an HF checkpoint directory (its safetensors / bin files; at least 1)."""
        files = [f for f in Path(path).glob("*") if f.suffix in (".safetensors", ".bin")]
        return max(1.0, sum(f.stat().st_size for f in files) / 2**20)


@dataclass
class FaultCounters:
    """What the run survived so far (`faults/*` metrics): learner restarts, steps they redid, seconds lost."""

    learner_restarts: int = 0
    steps_redone: int = 0
    lost_seconds: float = 0.0

    def metrics(self, rollout: Any) -> dict[str, float]:
        return {
            "faults/rollout_restarts": float(rollout.restarts),
            "faults/learner_restarts": float(self.learner_restarts),
            "faults/steps_redone": float(self.steps_redone),
            "faults/lost_seconds": self.lost_seconds + rollout.lost_seconds,
        }


class StopSignals:
    """SIGINT / SIGTERM during training, as a request: the first sets `received` (the loop finishes its
    step, saves a checkpoint and shuts down); a second raises KeyboardInterrupt (abandon the step; the
    trainer still closes its actors). Handlers are installed only in the main thread, and restored after."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            raise KeyboardInterrupt(f"second {name}: abandoning the step")
        self.received = name
        logging.getLogger(__name__).warning(
            "%s received: finishing this step, then saving a checkpoint (send it again to abandon the step)",
            name,
        )

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
