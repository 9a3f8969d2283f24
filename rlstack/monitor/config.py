"""The `logging:` section: metric sinks, progress output and the per-token samples kept for browsing."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlstack.config_base import StrictModel

SinkName = Literal["tensorboard", "wandb", "mlflow"]


class WandbConfig(StrictModel):
    project: str = "rlstack"
    """W&B project."""
    entity: str | None = None
    """W&B entity (user or team); None = the account's default."""
    name: str | None = None
    """Run name; None = the run directory's name."""
    mode: Literal["offline", "online"] = "offline"
    """`offline` writes the run under `<run_dir>/wandb/` with no network (`wandb sync` uploads it later);
    `online` streams to the W&B server (needs `WANDB_API_KEY`)."""


class MlflowConfig(StrictModel):
    tracking_uri: str | None = None
    """An MLflow tracking server or store URI; None = a local file store at `<run_dir>/mlruns`."""
    experiment: str = "rlstack"
    """MLflow experiment the run is logged under."""
    run_name: str | None = None
    """Run name; None = the run directory's name."""


class LoggingConfig(StrictModel):
    sinks: list[SinkName] = Field(default_factory=lambda: list[SinkName](["tensorboard"]))
    """Where metrics go besides `metrics.jsonl` (always written): `tensorboard` (`<run_dir>/tb/`), `wandb`,
    `mlflow`. Every metric is described in docs/metrics.md."""
    wandb: WandbConfig = WandbConfig()
    """Weights & Biases settings (used when `wandb` is in `sinks`)."""
    mlflow: MlflowConfig = MlflowConfig()
    """MLflow settings (used when `mlflow` is in `sinks`)."""
    progress_every_s: float = Field(30.0, gt=0)
    """When stdout is not a terminal (a log file, `ray job logs`), print one progress line this often
    instead of the progress bar."""
    token_samples_per_step: int = Field(16, ge=0)
    """Trajectories per step whose per-token data (ids, log-probs, masks, versions) go to
    `samples/tokens/` for the report's rollout browser (0 = none)."""
    token_samples_keep: int = Field(200, ge=1)
    """At most this many step files in `samples/tokens/`: beyond it, every other file of the older half is
    deleted, so a long run keeps a bounded directory that still spans the whole run."""
