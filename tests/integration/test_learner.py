"""The learner on real Ray + DeepSpeed (CPU, gloo, tiny Step3p5): ZeRO stages 1-3 on 2 ranks reproduce
stage 0 on 1 rank, weights export under vLLM's names, checkpoints resume exactly, nothing leaks."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import psutil
import pytest
import ray
import torch
from learner_batches import ALGO, make_batch
from safetensors import safe_open

from rlstack.learner import LearnerConfig, LearnerGroup, PolicyBatch
from rlstack.mispo import AlgorithmConfig
from rlstack.model import Step3p5ForCausalLM

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed]

TOL = 1e-5
# Adam moves a weight by ~lr * g / (|g| + eps): with eps 1e-8 the few weights whose gradient is ~1e-8 move by
# summation-order noise (measured up to 1.6e-5 between 1 and 2 ranks, 5.6e-6 between micro-batch sizes on
# one rank). eps 1e-6 damps those to ~1e-6 while leaving the step itself unchanged.
EPS = 1e-6


def _shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm"))


def _alive(p: psutil.Process) -> bool:
    """Running, not a zombie: this machine's PID 1 is slow to reap orphans, which hold no resources."""
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _learner_processes(pids: set[int] | None = None) -> list[psutil.Process]:
    """Live learner actor processes started by this test process (Ray titles them `ray::LearnerWorker`;
    other sessions on this machine may run their own), or those of `pids` that are still alive."""
    if pids is not None:
        procs = []
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                procs.append(psutil.Process(pid))
    else:
        procs = psutil.Process().children(recursive=True)
    out = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if "LearnerWorker" in " ".join(p.cmdline()) and _alive(p):
                out.append(p)
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    state = {"shm": _shm_entries(), "children": children, "learners": set()}
    # address="local": a private cluster even if another one runs on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield state
    ray.shutdown()


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = TOL) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _checkpoint_names(path: Path) -> set[str]:
    with safe_open(path / "model.safetensors", "pt") as f:
        return set(f.keys())


@pytest.fixture(scope="module")
def reference(ray_cluster, tiny_checkpoint: Path) -> dict:
    """Stage 0 on one rank, whole mini-batches in one micro-batch, every row through forward and backward:
    the numbers every set-up must hit."""
    # rows 8-14 (two groups with equal rewards) have no learning signal: interleaved, every shard has some
    batch = make_batch(15, seed=1).select(torch.tensor([0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7]))
    cfg = LearnerConfig(
        num_ranks=1, zero_stage=0, micro_batch_size=16, n_minibatches=2, adam_eps=EPS, skip_zero_signal=False
    )
    with LearnerGroup(tiny_checkpoint, cfg) as group:
        initial = group.export_weights()
        old_logp = group.compute_logprobs(batch)
        start = time.perf_counter()
        metrics = group.train(batch.replace(old_logp=old_logp), ALGO).metrics
        step_s = time.perf_counter() - start
        after = group.export_weights()
    return {"batch": batch, "initial": initial, "old_logp": old_logp, "metrics": metrics, "after": after,
            "step_s": step_s}  # fmt: skip


def test_reference_step_trains_and_exports_checkpoint_names(reference: dict, tiny_checkpoint: Path) -> None:
    initial, after, metrics = reference["initial"], reference["after"], reference["metrics"]
    assert set(after) == _checkpoint_names(tiny_checkpoint)  # includes the router_bias buffers
    assert all(t.dtype == torch.float32 for t in after.values())
    changed = {k for k in after if not torch.equal(after[k], initial[k])}
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.layers.1.moe.gate_proj.weight"} <= changed
    assert not any("router_bias" in k for k in changed)  # a buffer: never trained
    assert metrics["learner/version"] == 1.0
    assert 0.0 < metrics["actor/train_frac"] < 1.0  # the token band rejected some tokens
    assert metrics["batch/tokens"] == float(reference["batch"].loss_mask.sum())
    assert metrics["actor/grad_norm"] > 0 and metrics["actor/lr"] == pytest.approx(3e-4)
    assert 0.0 < metrics["actor/routing_confidence"] < 1.0 and metrics["actor/entropy"] > 0


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_on_two_ranks_matches_stage0_on_one(
    stage: int, reference: dict, ray_cluster: dict, tiny_checkpoint: Path
) -> None:
    # micro-batch 3: 15 rows -> mini-batches of 8 and 7 -> shards 4/4 and 4/3 -> uneven micro-batch counts.
    # The rows without signal skip forward and backward on both ranks (skip_zero_signal, the default; the
    # reference ran every row), and the update is unchanged. ZeRO-3 cuts micro-batches by a token budget
    # instead (learner.micro_batch_tokens): other counts per rank, rows regrouped, the same update.
    tokens = 40 if stage == 3 else None
    cfg = LearnerConfig(
        num_ranks=2,
        zero_stage=stage,
        micro_batch_size=3,
        micro_batch_tokens=tokens,
        n_minibatches=2,
        adam_eps=EPS,
    )
    batch = reference["batch"]
    with LearnerGroup(tiny_checkpoint, cfg) as group:
        old_logp = group.compute_logprobs(batch)
        assert float((old_logp - reference["old_logp"]).abs().max()) < TOL
        metrics = group.train(batch.replace(old_logp=old_logp), ALGO).metrics
        after = group.export_weights()
        actors = {p.pid for p in _learner_processes()}
        assert len(actors) == 2
        ray_cluster["learners"] |= actors
    assert set(after) == _checkpoint_names(tiny_checkpoint)
    assert _close(after, reference["after"]) < TOL
    assert _close(after, reference["initial"]) > 1e-4  # and the step did move the weights
    for key in ("actor/loss", "actor/train_frac", "actor/grad_norm", "batch/tokens"):
        assert metrics[key] == pytest.approx(reference["metrics"][key], rel=1e-4, abs=1e-6), key
    assert metrics["actor/skipped_rows"] == 7.0 and reference["metrics"]["actor/skipped_rows"] == 0.0
    assert not _wait_gone(lambda: _learner_processes(actors), 20), "learner actors outlived shutdown()"


def _step(group: LearnerGroup, batch: PolicyBatch, algo: AlgorithmConfig) -> dict[str, float]:
    """One train step with pi_old from a separate pass first (the driver's unfused path); its metrics."""
    return group.train(batch.replace(old_logp=group.compute_logprobs(batch)), algo).metrics


def _wait_gone(probe, timeout_s: float) -> list:
    deadline = time.monotonic() + timeout_s
    while (left := probe()) and time.monotonic() < deadline:
        time.sleep(0.25)
    return left


@pytest.mark.parametrize("stage", [2, 3])
def test_save_load_resumes_exactly(stage: int, ray_cluster, tiny_checkpoint: Path, tmp_path: Path) -> None:
    # a warm-up: step 2 runs at 2/3 of the rate, so a resume that lost the schedule's position would differ
    cfg = LearnerConfig(num_ranks=2, zero_stage=stage, micro_batch_size=4, adam_eps=EPS, warmup_steps=3)
    batch1, batch2 = make_batch(8, seed=2), make_batch(8, seed=3)
    ckpt = tmp_path / "step_1"
    with LearnerGroup(tiny_checkpoint, cfg) as first:
        _step(first, batch1, ALGO)
        saved = first.export_weights()
        first.save_checkpoint(ckpt)
        saved_opt = ray.get([a.optimizer_state.remote() for a in first.actors])
        _step(first, batch2, ALGO)
        expected = first.export_weights()

    # the directory is an HF checkpoint vLLM can load: config, weights under checkpoint names, tokenizer
    expected_files = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert expected_files | {"trainer_state"} <= set(os.listdir(ckpt))
    assert _checkpoint_names(ckpt) == _checkpoint_names(tiny_checkpoint)
    hf = Step3p5ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).state_dict()
    assert all(torch.equal(hf[k], saved[k]) for k in saved)

    with LearnerGroup(ckpt, cfg) as resumed:
        assert resumed.load_checkpoint(ckpt) == 1 and resumed.version == 1
        assert all(torch.equal(v, saved[k]) for k, v in resumed.export_weights().items())
        restored_opt = ray.get([a.optimizer_state.remote() for a in resumed.actors])
        for before, after in zip(saved_opt, restored_opt, strict=True):
            assert before.keys() == after.keys() and len(before) > 0
            assert all(torch.equal(before[k], after[k]) for k in before)
        metrics = _step(resumed, batch2, ALGO)  # the same next step, bit for bit
        assert metrics["actor/lr"] == pytest.approx(2e-4)  # 3e-4 * 2 / 3: the schedule went on
        assert all(torch.equal(v, expected[k]) for k, v in resumed.export_weights().items())


def test_weight_broadcast_after_a_step_completes(ray_cluster, tiny_checkpoint: Path) -> None:
    """DeepSpeed >= 0.17.3 passes device_id to init_process_group; with it, open-instruct saw the weight
    sync after the first training step hang once a further process group was in play. We create the
    default group ourselves without device_id; here a fresh group broadcasts rank 0's weights after a
    step (ZeRO-3, so the export itself is collective) and must finish within the timeout."""
    cfg = LearnerConfig(num_ranks=2, zero_stage=3, micro_batch_size=8, adam_eps=EPS)
    batch = make_batch(8, seed=4)
    with LearnerGroup(tiny_checkpoint, cfg) as group:
        infos = ray.get([a.dist_info.remote() for a in group.actors])
        assert [i["rank"] for i in infos] == [0, 1] and all(i["world_size"] == 2 for i in infos)
        assert all(i["bound_device_id"] is None and i["backend"] == "gloo" for i in infos)
        _step(group, batch, ALGO)
        sums = group.check_weight_broadcast(timeout_s=30)
        weights = group.export_weights()
        expected = sum(float(w.double().sum()) for w in weights.values())
        assert sums == pytest.approx([expected, expected], rel=1e-12)
        _step(group, batch, ALGO)  # the default group still works after the extra one came and went
        assert group.version == 2


KL_ALGO = ALGO.model_copy(update={"kl_coef": 0.5})


def test_kl_reference_is_frozen_partitioned_and_is_learning_signal(
    ray_cluster, tiny_checkpoint: Path
) -> None:
    """algorithm.kl_coef > 0: a frozen copy of the initial policy on every rank, sharded like the policy under
    ZeRO-3. Step 1 starts at pi_theta = pi_ref (KL exactly 0); later steps see KL > 0, and a step whose
    advantages are all 0 still trains (the KL term is learning signal), while without KL it would not.
    2 ranks under ZeRO-3 give stage 0 on 1 rank's numbers; the LR warm-up runs."""
    batch = make_batch(8, seed=4)
    no_adv = batch.replace(advantages=torch.zeros_like(batch.advantages))
    sched = {"lr_schedule": "cosine", "warmup_steps": 2, "lr_decay_steps": 4, "adam_eps": EPS}

    def run(num_ranks: int, zero_stage: int) -> dict:
        cfg = LearnerConfig(num_ranks=num_ranks, zero_stage=zero_stage, micro_batch_size=4, **sched)
        with LearnerGroup(tiny_checkpoint, cfg, reference_path=tiny_checkpoint) as group:
            numel = ray.get([a.reference_numel.remote() for a in group.actors])
            initial = group.export_weights()
            m1 = _step(group, batch, KL_ALGO)
            moved = group.export_weights()
            m2 = _step(group, no_adv, KL_ALGO)
            back = group.export_weights()
            m3 = _step(group, no_adv, ALGO)  # the same batch without KL: no signal, lr 0
            still = group.export_weights()
        return {"numel": numel, "initial": initial, "m1": m1, "moved": moved, "m2": m2, "back": back,
                "m3": m3, "still": still}  # fmt: skip

    one, two = run(1, 0), run(2, 3)
    # ZeRO-3: each rank holds a shard of the reference, together all of it; stage 0: a whole copy
    assert one["numel"][0]["local"] == one["numel"][0]["full"]
    full = two["numel"][0]["full"]
    assert all(n["full"] == full and n["local"] < 0.75 * full for n in two["numel"])
    assert sum(n["local"] for n in two["numel"]) >= full
    for r in (one, two):
        assert r["m1"]["actor/kl"] == pytest.approx(0.0, abs=1e-7)  # pi_theta == pi_ref at the start
        assert r["m2"]["actor/kl"] > 1e-6 and r["m2"]["actor/frozen_steps"] == 0
        # 2 warm-up steps: lr(0) = base / 2, lr(1) = base
        assert r["m1"]["actor/lr"] == pytest.approx(1.5e-4) and r["m2"]["actor/lr"] == pytest.approx(3e-4)
        # the zero-advantage step trained (KL is signal); without KL the same batch freezes the weights
        assert _close(r["back"], r["moved"]) > 1e-6
        assert r["m3"]["actor/frozen_steps"] == 1 and _close(r["still"], r["back"]) == 0.0
    assert _close(two["back"], one["back"]) < TOL
    assert two["m2"]["actor/kl"] == pytest.approx(one["m2"]["actor/kl"], rel=1e-4)


def test_ray_shutdown_leaves_no_processes_or_shm(ray_cluster) -> None:
    ray.shutdown()

    def started() -> list[psutil.Process]:
        children = psutil.Process().children(recursive=True)
        return [p for p in children if p.pid not in ray_cluster["children"] and _alive(p)]

    assert not _wait_gone(started, 30), "processes outlived ray.shutdown()"
    assert ray_cluster["learners"] and not _learner_processes(ray_cluster["learners"])
    ours = ("deepspeed", "plasma", "ray", "torch_")  # only our stack's names: other tests may run beside us
    leaked = {e for e in _shm_entries() - ray_cluster["shm"] if e.startswith(ours)}
    assert not leaked, f"/dev/shm entries left behind: {sorted(leaked)}"
