"""LearnerConfig validates before torch loads; the DeepSpeed config and AdamW groups derived from it."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from rlstack.learner.config import LearnerConfig


def test_defaults_and_field_docs() -> None:
    cfg = LearnerConfig()
    assert (cfg.num_ranks, cfg.zero_stage, cfg.lr, cfg.betas) == (1, 2, 3e-4, (0.9, 0.95))
    assert (cfg.micro_batch_size, cfg.n_minibatches, cfg.backend) == (8, 1, "auto")
    assert (cfg.grad_clip, cfg.cpus_per_rank, cfg.adam_eps) == (1.0, 1.0, 1e-8)
    assert all(field.description for field in LearnerConfig.model_fields.values())  # a docstring per field


@pytest.mark.parametrize(
    "bad",
    [{"zero_stage": 4}, {"num_ranks": 0}, {"betas": (0.9, 1.0)}, {"backend": "mpi"}, {"micro_batch_size": 0},
     {"cpus_per_rank": 0}, {"learning_rate": 1e-3}],
)  # fmt: skip
def test_bad_values_are_refused(bad: dict) -> None:
    with pytest.raises(ValidationError):
        LearnerConfig(**bad)


def test_deepspeed_config_and_param_groups() -> None:
    import torch

    from rlstack.learner.engine import deepspeed_config, param_groups, resolve_backend

    cfg = LearnerConfig(zero_stage=3, lr=1e-4, weight_decay=0.1, grad_clip=0.5, micro_batch_size=4)
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == 3 and ds["gradient_clipping"] == 0.5
    assert ds["gradient_accumulation_steps"] == 1  # the step drives accumulation itself
    opt = ds["optimizer"]["params"]
    assert ds["optimizer"]["type"] == "AdamW" and opt["torch_adam"] and opt["lr"] == 1e-4

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    groups = param_groups(model, 0.1)
    assert [len(g["params"]) for g in groups] == [1, 3]  # the matrix decays; bias and norm do not
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert len(param_groups(model, 0.0)) == 1

    assert resolve_backend("auto", cuda_available=False) == "gloo"
    assert resolve_backend("auto", cuda_available=True) == "nccl"
    with pytest.raises(ValueError, match="nccl' needs a CUDA GPU"):
        resolve_backend("nccl", cuda_available=False)


def test_package_import_is_light() -> None:
    """Importing the package and its config/batch code must not pull in DeepSpeed or Ray."""
    code = (
        "import sys; import rlstack.learner as L; L.LearnerConfig, L.PolicyBatch, L.collate, "
        "L.LearnerWorker, L.LearnerGroup; bad = [m for m in ('deepspeed', 'ray') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
