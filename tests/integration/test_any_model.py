"""Any transformers causal LM as the policy, on the real stack: tiny random Llama, Qwen3 and Qwen3-MoE
checkpoints built in code. vLLM and the DeepSpeed learner agree on log-probs; after training steps an
in-place weight sync leaves the engine bit-identical to a fresh engine on the learner's saved checkpoint;
the trainer runs; LoRA trains adapters only and the engines serve the merged policy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import ray
import torch
import yaml
from safetensors.torch import load, load_file

from rlstack.config import load_config
from rlstack.driver import Trainer
from rlstack.learner import LearnerConfig, LearnerGroup, collate
from rlstack.mispo import AlgorithmConfig, MISFilter, compute_advantages
from rlstack.model import BUILDERS, init_checkpoint
from rlstack.rollout.config import RolloutConfig, SamplingConfig
from rlstack.rollout.engine import EngineSettings, close_llm, make_llm
from rlstack.rollout.group import RolloutGroup
from rlstack.rollout.worker import Prompt
from rlstack.types import Rollout

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.deepspeed]

PROMPTS = [Prompt(f"p{i}", text=f"<|user|>What is {i}{i}+{7 * i}?<|assistant|>") for i in range(6)]
ALGO = AlgorithmConfig(traj_filter="off")


def fresh_checkpoint(name: str, path: Path) -> Path:
    config = BUILDERS[name]()
    config.initializer_range = 0.2  # peaked distributions make disagreements visible
    return init_checkpoint(config, path, seed=0)


def logprob_gap(learner: LearnerGroup, rollouts: list[Rollout]) -> float:
    """Largest |learner log-prob - vLLM's sampled log-prob| over the response tokens."""
    batch = collate(rollouts, pad_id=0)
    mask = batch.loss_mask.bool()
    return (learner.compute_logprobs(batch)[mask] - batch.rollout_logp[mask]).abs().max().item()


def train_step(learner: LearnerGroup, rollouts: list[Rollout]) -> dict[str, float]:
    """One MIS-PO step that prefers longer responses (so the update is not empty)."""
    for r in rollouts:
        r.reward = float(len(r.response_ids))
    batch = collate(rollouts, pad_id=0)
    batch = batch.replace(old_logp=learner.compute_logprobs(batch))
    batch = batch.replace(filter=MISFilter(ALGO)(batch.old_logp, batch.rollout_logp, batch.loss_mask))
    advantages, _ = compute_advantages(ALGO, batch.rewards, batch.loss_mask, group_ids=batch.group_ids)
    return learner.train_step(batch.replace(advantages=advantages), ALGO)


def engine_parameters(path: Path) -> dict[str, torch.Tensor]:
    """A fresh engine's parameters on the checkpoint at `path` (linear weights read back through vLLM-CPU's
    packed kernels)."""
    llm = make_llm(path, EngineSettings())
    try:
        return load(llm.collective_rpc("rlstack_parameters")[0])
    finally:
        close_llm(llm)


def live_parameters(rollout: RolloutGroup) -> dict[str, torch.Tensor]:
    return load(ray.get(rollout.workers[0].parameters_bytes.remote()))


@pytest.mark.usefixtures("trainer_ray")
@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen3", "tiny_qwen3_moe"])
def test_engine_and_learner_agree_and_in_place_sync_equals_a_fresh_load(name: str, tmp_path: Path) -> None:
    path = fresh_checkpoint(name, tmp_path / "init")
    sampling = SamplingConfig(n=4, max_tokens=16)
    with (
        RolloutGroup(path, RolloutConfig(sampling=sampling, bucket_mb=0.25)) as rollout,
        LearnerGroup(path, LearnerConfig(lr=1e-3, micro_batch_size=16)) as learner,
    ):
        rollouts = rollout.generate(PROMPTS)
        assert logprob_gap(learner, rollouts) < 1e-3
        metrics = [train_step(learner, rollout.generate(PROMPTS)) for _ in range(2)]
        assert all(m["actor/grad_norm"] > 0 for m in metrics) and learner.version == 2
        assert logprob_gap(learner, rollouts) > 1e-3  # the policy moved: the checks below are not vacuous

        stats = rollout.update_weights(learner.export_weights(), learner.version)
        assert stats["sync/buckets"] > 1  # several buckets: fused modules must arrive whole
        saved = learner.save_checkpoint(tmp_path / "step_2")
        live = live_parameters(rollout)
        fresh = engine_parameters(saved)
        assert live.keys() == fresh.keys()
        assert [k for k in fresh if not torch.equal(live[k], fresh[k])] == []
        after = rollout.generate(PROMPTS)
        assert {r.version for r in after} == {2} and logprob_gap(learner, after) < 1e-3


def trainer_run(run_dir: Path, builder: str, **learner: object) -> dict:
    """A 2-step run as small as tests/integration/test_driver.py's, on a fresh `builder` policy."""
    return {
        "model": {"builder": builder},
        "trainer": {"run_dir": str(run_dir), "steps": 2, "prompts_per_step": 4},
        "rollout": {"sampling": {"n": 4, "max_tokens": 24}},
        "learner": {"micro_batch_size": 16, "zero_stage": 2, "lr": 1e-3, **learner},
        "algorithm": {"traj_filter": "off"},
        "eval": {"num_problems": 8, "samples": 1},
        "rewards": [{"import_path": "toy_rewards:digit_fraction"}],
    }


def run_trainer(config: dict, tmp_path: Path) -> list[dict]:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg = load_config(path)
    with Trainer(cfg) as trainer:
        return [trainer.step() for _ in range(cfg.trainer.steps)]


@pytest.mark.usefixtures("trainer_ray")
def test_qwen3_moe_trains_through_the_trainer_with_routing_replay_and_expert_health(tmp_path: Path) -> None:
    steps = run_trainer(
        trainer_run(tmp_path / "run", "tiny_qwen3_moe", routing_replay="rollout", moe={"probe_every": 1}),
        tmp_path,
    )
    assert [m["learner/version"] for m in steps] == [1.0, 2.0]
    assert any(m["actor/grad_norm"] > 0 for m in steps)
    for m in steps:
        # the engines' routing was recorded and replayed: the router's own choice differs only by drift
        assert 0.0 <= m["moe/replay_overrides"] < 0.5
        assert m["moe/logp_gap_replay"] < 1e-3  # replaying the engine's experts reproduces its log-probs
        for layer in (0, 1):  # Qwen3-MoE: every layer is a MoE layer
            assert 0 <= m[f"moe/layer{layer}/dead_experts"] <= 8
            assert 0.0 < m[f"moe/layer{layer}/router_entropy"] <= math.log(8) + 1e-6
            assert 0.0 < m[f"moe/layer{layer}/routing_confidence"] < 1.0


@pytest.mark.slow
@pytest.mark.usefixtures("trainer_ray")
@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen3"])
def test_dense_architectures_train_through_the_trainer(name: str, tmp_path: Path) -> None:
    steps = run_trainer(trainer_run(tmp_path / "run", name), tmp_path)
    assert [m["learner/version"] for m in steps] == [1.0, 2.0]
    assert any(m["actor/grad_norm"] > 0 for m in steps)
    assert not any(k.startswith("moe/") for k in steps[0])


@pytest.mark.usefixtures("trainer_ray")
def test_lora_trains_adapters_only_and_the_engine_serves_the_merged_policy(tmp_path: Path) -> None:
    path = fresh_checkpoint("tiny_qwen3", tmp_path / "init")
    base = load_file(str(path / "model.safetensors"))
    lora = {"r": 4, "alpha": 8.0, "target_modules": "all-linear"}
    cfg = LearnerConfig.model_validate({"lr": 2e-2, "micro_batch_size": 16, "lora": lora})
    with (
        RolloutGroup(path, RolloutConfig(sampling=SamplingConfig(n=4, max_tokens=16))) as rollout,
        LearnerGroup(path, cfg) as learner,
    ):
        rollouts = rollout.generate(PROMPTS)
        assert logprob_gap(learner, rollouts) < 1e-3  # fresh adapters (B = 0) change nothing
        for _ in range(2):
            train_step(learner, rollout.generate(PROMPTS))
        assert logprob_gap(learner, rollouts) > 1e-3  # the adapters moved the policy

        frozen, adapters = ray.get(learner.actors[0].lora_tensors.remote())
        assert frozen.keys() == base.keys()
        assert [k for k in base if not torch.equal(frozen[k], base[k])] == []  # the base never changes
        optimizer = ray.get(learner.actors[0].optimizer_state.remote())
        moments = sum(t.numel() for k, t in optimizer.items() if k.endswith("exp_avg"))
        assert moments == sum(t.numel() for t in adapters.values())  # the optimizer holds the adapters only

        rollout.update_weights(learner.export_weights(), learner.version)
        after = rollout.generate(PROMPTS)
        assert logprob_gap(learner, after) < 1e-3  # vLLM serves base + adapters merged

        saved = learner.save_checkpoint(tmp_path / "step_2")
        exported = learner.export_weights()
    adapter_config = json.loads((saved / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["peft_type"] == "LORA"
    merged = load_file(str(saved / "model.safetensors"))
    assert merged.keys() == base.keys()
    changed = [k for k in base if not torch.equal(merged[k], base[k])]
    assert changed and all("proj" in k for k in changed)  # the merged export moved only adapted layers

    # resume as the driver does: a learner on the checkpoint's (merged) weights restores base and adapters
    with LearnerGroup(saved, cfg) as resumed:
        assert resumed.load_checkpoint(saved) == 2
        frozen, _ = ray.get(resumed.actors[0].lora_tensors.remote())
        assert [k for k in base if not torch.equal(frozen[k], base[k])] == []  # the original base, not merged
        again = resumed.export_weights()
    assert [k for k in exported if not torch.equal(again[k], exported[k])] == []


@pytest.mark.usefixtures("trainer_ray")
def test_real_size_settings_bf16_master_weights_checkpointing_and_zero3_on_two_ranks(tmp_path: Path) -> None:
    """bf16 weights with fp32 master weights, activation checkpointing and ZeRO-3 over 2 ranks (on a
    transformers MoE class) train like one ZeRO-2 rank without checkpointing, up to bf16 rounding."""
    from learner_batches import ALGO as BATCH_ALGO
    from learner_batches import make_batch

    path = fresh_checkpoint("tiny_qwen3_moe", tmp_path / "init")
    batch = make_batch(8, seed=0)
    # One step (after it, the runs' different bf16 roundings can route some tokens to other experts); lr
    # 1e-2: updates well above bf16's rounding step at these weights (~1e-3).
    common = {"lr": 1e-2, "micro_batch_size": 2, "dtype": "bfloat16", "adam_eps": 1e-6}
    runs = {}
    for name, extra in {
        "one_rank": {"zero_stage": 2},
        "zero3": {"zero_stage": 3, "num_ranks": 2, "gradient_checkpointing": True},
    }.items():
        with LearnerGroup(path, LearnerConfig.model_validate(common | extra)) as learner:
            old_logp = learner.compute_logprobs(batch)
            metrics = learner.train(batch.replace(old_logp=old_logp), BATCH_ALGO).metrics
            facts = ray.get([a.policy_facts.remote() for a in learner.actors])
            runs[name] = (facts, metrics, learner.export_weights())
    (one, one_metrics, one_after), (z3, z3_metrics, z3_after) = runs["one_rank"], runs["zero3"]
    for rank in z3:
        assert rank["dtypes"] == ["torch.bfloat16"]
        assert rank["master_dtypes"] == rank["optimizer_dtypes"] == ["torch.float32"]
        assert rank["checkpointing"] and rank["local"] <= 0.55 * rank["full"]  # each rank holds ~half
    assert not one[0]["checkpointing"] and one[0]["local"] == one[0]["full"]
    for key in ("actor/loss", "actor/grad_norm", "actor/train_frac", "batch/tokens"):
        assert one_metrics[key] == pytest.approx(z3_metrics[key], rel=2e-2, abs=1e-4), key
    initial = {k: t.bfloat16().float() for k, t in load_file(str(path / "model.safetensors")).items()}
    update_one = torch.cat([(one_after[k] - initial[k]).flatten() for k in initial])
    update_z3 = torch.cat([(z3_after[k] - initial[k]).flatten() for k in initial])
    assert (update_one != 0).float().mean() > 0.5  # the step moved most weights
    # the same update, up to bf16 rounding (the weights are rounded to 8 significant bits after each step)
    assert (update_one - update_z3).norm() < 0.1 * update_one.norm()
