"""vLLM serves our checkpoint and agrees with our PyTorch model on every sampled token's log-prob, also
under temperature / top-p (the recorded log-probs are the sampling distribution's); a bf16 engine is bf16."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from rlstack.learner.batch import collate
from rlstack.learner.logprobs import SamplingTransform, sampling_logits, score_tokens
from rlstack.mispo import apply_filters
from rlstack.model import Step3p5ForCausalLM
from rlstack.rollout.config import RolloutConfig, SamplingConfig
from rlstack.rollout.engine import EngineSettings
from rlstack.rollout.parity import check_logprob_parity, synthetic_prompts
from rlstack.rollout.worker import Prompt, RolloutWorker, sampling_params

pytestmark = pytest.mark.vllm


def _shm_bytes() -> int:
    return sum(e.stat().st_size for e in os.scandir("/dev/shm") if e.is_file(follow_symlinks=False))


def test_vllm_and_pytorch_logprobs_agree(tiny_checkpoint: Path) -> None:
    report = check_logprob_parity(tiny_checkpoint, num_prompts=64, max_tokens=32)
    assert report.num_sequences == 64 and report.num_tokens == 64 * 32
    assert report.sliding_window_exceeded  # the sliding layers' window was actually exercised
    assert report.max_abs_diff < 1e-3, report


def test_sigmoid_router_fix_reaches_spawned_engine_and_shm_is_released(tiny_checkpoint: Path) -> None:
    """With vLLM's default multiprocessing engine the model runs in a spawned process: only the
    entry-point plugin can patch the CPU router there (without it, engine start-up asserts softmax)."""
    shm_before = _shm_bytes()
    report = check_logprob_parity(
        tiny_checkpoint, num_prompts=8, max_tokens=16, settings=EngineSettings(multiprocessing=True)
    )
    assert report.max_abs_diff < 1e-3, report
    assert _shm_bytes() <= shm_before + (1 << 20), "the engine left shared memory behind"


# ---- the sampling distribution: temperature / top-p, and the engine's dtype ------------------------


def _score(path: Path, rollouts: list, transform: SamplingTransform | None) -> tuple:
    """(old_logp, rollout_logp, loss_mask), each (B, L), from the PyTorch model in fp32."""
    batch = collate(rollouts, pad_id=0)
    model = Step3p5ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        scores = score_tokens(
            model, batch.input_ids, batch.attention_mask, with_routing=False, transform=transform
        )
    mask = batch.loss_mask.bool()
    return torch.where(mask, scores.logp, 0.0), batch.rollout_logp, mask


def _generate(path: Path, config: RolloutConfig) -> tuple[list, RolloutWorker]:
    worker = RolloutWorker(path, config)
    prompts = [Prompt(f"p{i}", text=t) for i, t in enumerate(synthetic_prompts(4, seed=7))]
    return worker.generate(prompts), worker


def test_recorded_logprobs_are_the_sampling_distributions(tiny_checkpoint: Path) -> None:
    """T 0.7, top_p 0.9: vLLM records processed log-probs, the learner scores under the same transform, and
    the MIS filters with the paper's bands accept every token and trajectory. Without the transform the
    two disagree by a large margin (so this test sees a mismatch when there is one)."""
    sampling = SamplingConfig(n=2, max_tokens=32, temperature=0.7, top_p=0.9, seed=3)
    config = RolloutConfig(sampling=sampling)
    rollouts, worker = _generate(tiny_checkpoint, config)
    worker.shutdown()
    assert sum(len(r.response_ids) for r in rollouts) >= 100

    old, rollout, mask = _score(tiny_checkpoint, rollouts, SamplingTransform.from_sampling(sampling))
    diff = (old - rollout)[mask].abs()
    assert diff.max() <= 1e-3, diff.max()
    result = apply_filters(old, rollout, mask, (0.5, 2.0), (0.996, 1.001))
    assert bool(result.token_mask[mask].all()) and bool(result.traj_mask.all())

    raw, _, _ = _score(tiny_checkpoint, rollouts, None)  # the policy itself, not what was sampled
    assert (raw - rollout)[mask].abs().max() > 0.1


def test_bf16_engine_runs_in_bf16_and_its_logprobs_differ_from_fp32(tiny_checkpoint: Path) -> None:
    config = RolloutConfig(dtype="bfloat16", sampling=SamplingConfig(n=1, max_tokens=32, seed=3))
    rollouts, worker = _generate(tiny_checkpoint, config)
    try:
        assert worker.llm.llm_engine.model_config.dtype == torch.bfloat16
        params = load(worker.parameters_bytes())
    finally:
        worker.shutdown()
    assert params["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert params["lm_head.weight"].dtype == torch.bfloat16
    old, rollout, mask = _score(tiny_checkpoint, rollouts, SamplingTransform())
    assert (old - rollout)[mask].abs().max() > 1e-3


def test_support_equals_vllm_cpu_samplers(tiny_checkpoint: Path) -> None:
    """The learner's top-k / top-p support is the one vLLM's CPU sampler draws from (vLLM's own functions,
    on the tiny model's real logits and on random ones with ties)."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p
    from vllm.v1.sample.sampler import Sampler

    model = Step3p5ForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    ids = torch.tensor([[1, *range(4, 60)]])
    with torch.no_grad():
        real = model(ids).logits[0]  # (T, V)
    gen = torch.Generator().manual_seed(0)
    ties = torch.randint(-3, 4, (64, 128), generator=gen).float()  # many tied logits
    for logits in (real, torch.randn(256, 128, generator=gen) * 3, ties):
        n = logits.shape[0]
        for T, p, k in [(0.7, 0.9, 0), (1.0, 1.0, 5), (1.3, 0.8, 20), (0.5, 0.95, 3), (1.0, 0.5, 1)]:
            temp = torch.full((n,), T)
            vllm_z = Sampler.apply_temperature(logits.clone(), temp, all_random=True)
            vllm_z = apply_top_k_top_p(
                vllm_z,
                torch.full((n,), k, dtype=torch.int32) if k else None,
                torch.full((n,), p) if p < 1 else None,
            )
            ours = sampling_logits(logits.clone(), SamplingTransform(T, p, k))
            assert torch.equal(torch.isinf(ours), torch.isinf(vllm_z)), (T, p, k)
            diff = (ours.log_softmax(-1) - vllm_z.log_softmax(-1, dtype=torch.float32)).nan_to_num()
            assert diff.abs().max() < 1e-5, (T, p, k)
    # and the rollout config reaches vLLM with the same three numbers
    params = sampling_params(SamplingConfig(temperature=0.7, top_p=0.9, top_k=5), 0)
    assert (params.temperature, params.top_p, params.top_k) == (0.7, 0.9, 5)
