"""Partial rollouts (`rollout.partial_rollouts`, the async engine on real Ray + vLLM): a weight update
interrupts the requests in flight instead of waiting for them; the unfinished completions continue under the
new weights, prefilled again, and each token's recorded log-prob is the one a learner computes with the
weights of the version the token carries (per segment)."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch

from rlstack.learner.logprobs import score_tokens
from rlstack.model import Step3p5ForCausalLM, init_checkpoint, tiny
from rlstack.rollout.config import RolloutConfig, SamplingConfig
from rlstack.rollout.group import RolloutGroup
from rlstack.rollout.worker import Prompt
from rlstack.types import Rollout

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

PROMPTS = [Prompt(f"p{i}", text=f"<|user|>Compute {i}*{i + 3}.<|assistant|>") for i in range(16)]
# no min_tokens: vLLM masks EOS before it and records those log-probs, which no learner reproduces (README)
SAMPLING = SamplingConfig(n=4, max_tokens=48, seed=1)
GAP = 1e-3  # engine vs learner log-probs of one weights version (as in test_rollout_learner.py)


@pytest.fixture(scope="module")
def group(tiny_checkpoint: Path) -> Iterator[RolloutGroup]:
    scratch = Path(tempfile.mkdtemp(prefix="rls-"))  # short: Ray's socket paths must stay < 108 chars
    (scratch / "tmp").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(scratch / "tmp"))  # inherited by Ray's workers and vLLM's processes
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(scratch / "ray"))
        config = RolloutConfig(engine="async", partial_rollouts=True, cpus_per_worker=1, bucket_mb=1)
        started = None
        try:
            started = RolloutGroup(tiny_checkpoint, config)
            yield started
        finally:
            if started is not None:
                started.shutdown()
            ray.shutdown()
            shutil.rmtree(scratch, ignore_errors=True)


def _scores(model: Step3p5ForCausalLM, rollout: Rollout) -> torch.Tensor:
    """The learner's log-probs of the rollout's response tokens (R,)."""
    ids = torch.tensor([rollout.prompt_ids + rollout.response_ids])  # (1, L)
    with torch.no_grad():
        logp = score_tokens(model, ids, torch.ones_like(ids), with_entropy=False, with_routing=False).logp
    return logp[0, len(rollout.prompt_ids) :]


def test_an_update_mid_generation_continues_under_the_new_weights(
    group: RolloutGroup, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    group.generate(PROMPTS[:1], SamplingConfig(n=1, max_tokens=4))  # warm
    start = time.perf_counter()
    group.generate(PROMPTS, SAMPLING)  # the batch's length on the old weights, uninterrupted
    full_s = time.perf_counter() - start
    config = tiny()
    config.initializer_range = 0.2
    new_weights = Step3p5ForCausalLM.from_pretrained(init_checkpoint(config, tmp_path / "b", seed=3)).float()

    pending = group.submit(PROMPTS, SAMPLING)
    time.sleep(full_s / 2)
    start = time.perf_counter()
    group.update_weights(new_weights.state_dict(), version=1)  # aborts, loads, resumes: does not wait
    update_s = time.perf_counter() - start
    rollouts = group.collect(pending)

    assert len(rollouts) == 64 and all(0 < len(r.response_ids) <= 48 for r in rollouts)
    assert all(r.finish_reason in ("stop", "length") and r.version == 0 for r in rollouts)
    assert all(len(r.response_ids) == 48 for r in rollouts if r.finish_reason == "length")
    spanning = [r for r in rollouts if r.response_versions is not None and len(set(r.response_versions)) > 1]
    assert spanning, f"no completion spans the update (update took {update_s:.1f}s, batch {full_s:.1f}s)"
    for r in spanning:
        assert r.response_versions == sorted(r.response_versions) and set(r.response_versions) == {0, 1}
        assert r.staleness(1) == 1  # the oldest token decides (the staleness rule)

    old_weights = Step3p5ForCausalLM.from_pretrained(tiny_checkpoint).float()
    for r in spanning[:8]:
        recorded = torch.tensor(r.response_logprobs)  # (R,)
        versions = torch.tensor(r.response_versions)  # (R,)
        by_old, by_new = _scores(old_weights, r), _scores(new_weights, r)
        assert float((by_old - recorded)[versions == 0].abs().max()) < GAP
        # the continuation was prefilled again: the new weights reproduce it, the old ones do not
        assert float((by_new - recorded)[versions == 1].abs().max()) < GAP
        assert float((by_old - recorded)[versions == 1].abs().max()) > 0.1

    # a batch after the update runs on the new weights throughout
    after = group.generate(PROMPTS[:2], SamplingConfig(n=2, max_tokens=8, seed=2))
    assert all(set(r.response_versions or []) == {1} for r in after)
