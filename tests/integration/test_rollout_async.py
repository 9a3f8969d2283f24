"""`engine: async` (vLLM's AsyncLLM in a Ray async actor) against the sync engine, on real Ray + vLLM:
same tokens for the same seeds, concurrent batches, bucketed weight updates that keep every rollout on
one weights version, and a shutdown that leaves nothing behind (the module's last test)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import ray
import torch
from safetensors.torch import load

from rlstack.model import Step3p5ForCausalLM, init_checkpoint, tiny
from rlstack.perf import generation_seconds
from rlstack.rollout.config import RolloutConfig, SamplingConfig
from rlstack.rollout.group import RolloutGroup
from rlstack.rollout.worker import Prompt

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

PROMPTS = [Prompt(f"p{i}", text=f"<|user|>Compute {i}+{2 * i}.<|assistant|>") for i in range(6)]
SAMPLING = SamplingConfig(n=3, max_tokens=12, seed=5)
LONG = [Prompt(f"l{i}", text=f"<|user|>Compute {i}*{i + 3}.<|assistant|>") for i in range(32)]
LONG_SAMPLING = SamplingConfig(n=8, max_tokens=32, seed=1)


@dataclass
class Engines:
    async_group: RolloutGroup
    sync_group: RolloutGroup
    scratch: Path
    shm_before: int
    children_before: set[int]
    closed: bool = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.async_group.shutdown()
                self.sync_group.shutdown()
            finally:
                ray.shutdown()


def _shm_bytes() -> int:
    return sum(e.stat().st_size for e in os.scandir("/dev/shm") if e.is_file(follow_symlinks=False))


@pytest.fixture(scope="module")
def engines(tiny_checkpoint: Path) -> Iterator[Engines]:
    scratch = Path(tempfile.mkdtemp(prefix="rls-"))  # short: Ray's socket paths must stay < 108 chars
    (scratch / "tmp").mkdir()
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    shm = _shm_bytes()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(scratch / "tmp"))  # inherited by Ray's workers and vLLM's processes
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(scratch / "ray"))
        common = {"cpus_per_worker": 1, "sampling": SAMPLING, "bucket_mb": 1}
        configs = [RolloutConfig(engine="async", **common), RolloutConfig(**common)]
        with ThreadPoolExecutor(2) as pool:  # both engines start at once
            starting = [pool.submit(RolloutGroup, tiny_checkpoint, c) for c in configs]
        started = [f.result() for f in starting if f.exception() is None]
        try:
            for f in starting:
                if f.exception() is not None:
                    raise f.exception()
            yield Engines(*started, scratch, shm, children)
        finally:
            for group in started:
                group.shutdown()  # no-op once the last test closed it
            ray.shutdown()
            shutil.rmtree(scratch, ignore_errors=True)


def _ids(rollouts: list) -> list[list[int]]:
    return [r.response_ids for r in rollouts]


def test_async_engine_samples_the_same_tokens_as_the_sync_engine(engines: Engines) -> None:
    a = engines.async_group.generate(PROMPTS)
    s = engines.sync_group.generate(PROMPTS)
    assert [r.prompt_id for r in a] == [p.prompt_id for p in PROMPTS for _ in range(3)]
    assert _ids(a) == _ids(s) and len({tuple(ids) for ids in _ids(a)}) > 3  # seeded, not all alike
    for ra, rs in zip(a, s, strict=True):
        assert ra.finish_reason == rs.finish_reason and ra.version == rs.version == 0
        gap = torch.tensor(ra.response_logprobs) - torch.tensor(rs.response_logprobs)
        assert gap.abs().max() < 1e-5


def test_a_later_batch_does_not_wait_for_an_earlier_one(engines: Engines) -> None:
    short = [Prompt("s", text="<|user|>1+1<|assistant|>")]
    one_token = SamplingConfig(n=1, max_tokens=2)
    for group, overtakes in ((engines.async_group, True), (engines.sync_group, False)):
        long = group.submit(LONG, LONG_SAMPLING)  # 256 sequences of up to 32 tokens: seconds
        quick = group.submit(short, one_token)
        ray.wait(quick.refs, num_returns=len(quick.refs))
        assert long.ready() is not overtakes  # sync: the short batch queued behind the long one
        long_rollouts, quick_rollouts = group.collect(long), group.collect(quick)
        assert len(long_rollouts) == 256 and len(quick_rollouts) == 1
        # Each call stamps its rollouts with its span on the worker's clock (perf/rollout_tokens_per_s):
        # the async engine ran the quick call inside the long one's, the sync engine after it.
        (long_start, long_end), (quick_start, quick_end) = (
            {r.generated_between for r in rollouts}.pop() for rollouts in (long_rollouts, quick_rollouts)
        )
        assert long_start < long_end and quick_start < quick_end
        if overtakes:
            assert long_start <= quick_start and quick_end < long_end
            assert generation_seconds(long_rollouts + quick_rollouts) == pytest.approx(long_end - long_start)
        else:
            assert quick_start >= long_end


def test_update_waits_for_running_batches_and_matches_the_sync_engine(
    engines: Engines, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    a, s = engines.async_group, engines.sync_group
    expected_old = _ids(s.generate(LONG, LONG_SAMPLING))
    running = a.submit(LONG, LONG_SAMPLING)
    config = tiny()
    config.initializer_range = 0.2
    b = init_checkpoint(config, tmp_path / "b", seed=3)
    state_b = Step3p5ForCausalLM.from_pretrained(b).state_dict()
    stats = a.update_weights(state_b, version=1)  # waits for `running` to finish on the old weights
    assert stats["sync/buckets"] >= 5 and stats["sync/bytes_skipped"] == 0
    old = a.collect(running)
    assert {r.version for r in old} == {0} and _ids(old) == expected_old

    s.update_weights(state_b, version=1)
    live = [load(x) for x in ray.get([g.workers[0].parameters_bytes.remote() for g in (a, s)])]
    assert live[0].keys() == live[1].keys()
    assert [k for k in live[0] if not torch.equal(live[0][k], live[1][k])] == []
    new_a, new_s = a.generate(PROMPTS), s.generate(PROMPTS)
    assert _ids(new_a) == _ids(new_s) and {r.version for r in new_a} == {1}
    assert a.update_weights(state_b, version=2)["sync/bytes"] == 0  # unchanged: nothing sent
    assert _ids(a.generate(PROMPTS)) == _ids(new_s)

    original = Step3p5ForCausalLM.from_pretrained(tiny_checkpoint).state_dict()
    a.update_weights(original, version=3)
    s.update_weights(original, version=3)
    assert _ids(a.generate(PROMPTS)) == _ids(s.generate(PROMPTS))


def test_async_engine_shuts_down_without_leaks(engines: Engines) -> None:
    """Last in the module: shut everything down, then nothing of it may remain."""
    assert engines.async_group.generate(PROMPTS[:1])
    engines.close()
    assert _shm_bytes() <= engines.shm_before + (1 << 20), "/dev/shm grew"
    left = sorted(p.name for p in (engines.scratch / "tmp").iterdir())
    assert left == [], f"temp files left behind: {left}"
    _, alive = psutil.wait_procs(
        [p for p in psutil.Process().children(recursive=True) if p.pid not in engines.children_before],
        timeout=15,
    )
    assert alive == [], f"processes left running: {[p.name() for p in alive]}"
