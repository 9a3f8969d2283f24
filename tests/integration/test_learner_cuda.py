"""The DeepSpeed learner on a real CUDA GPU: one `LearnerWorker` rank in this process (no Ray) on cuda:0 over
NCCL, ZeRO-2 and ZeRO-3, on the tiny Step3p5 policy. Every other learner test runs on the CPU over gloo.

Marked `gpu`: CI deselects these (scripts/test.sh: -m 'not slow and not gpu'); on a machine without a
usable GPU each test fails at once saying so. Run them with `-m gpu` on a GPU machine (scripts/gpu_check.sh
does, with the packages such a machine may lack carried as wheels). Nothing here imports Ray or vLLM.

DeepSpeed keeps its process groups per process (a worker's `shutdown` destroys the default group under
DeepSpeed's cached clones of it), so the workers of this module share the default group, which the first
one creates, and the shutdown test runs its worker in a fresh Python process, as a Ray actor would.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from learner_batches import ALGO, make_batch

from rlstack.learner import LearnerConfig, LearnerWorker, PolicyBatch, token_logprobs
from rlstack.model import Step3p5ForCausalLM

pytestmark = [pytest.mark.gpu, pytest.mark.deepspeed]

BACKEND, DEVICE = "nccl", torch.device("cuda", 0)
DEVICE_TYPE = DEVICE.type
STAGES = [2, 3]
# eps 1e-6 as in test_learner.py: Adam turns summation-order noise in gradients near 0 into ~1e-5 weight moves
# with eps 1e-8; 1e-6 damps that, so two engines continuing from one checkpoint agree to TOL.
CFG = {"micro_batch_size": 4, "lr": 1e-3, "adam_eps": 1e-6}
TOL = 1e-5
# GPU vs CPU log-probs, both fp32 with TF32 off: the two differ only in summation order inside the kernels
# (cuBLAS vs CPU GEMM blocking, the SDPA kernel, logsumexp over the vocabulary), ~1e-7 relative per op.
# Through 4 layers and log-probs of magnitude ~1-10 that stays well below 1e-4 (measured on an H200 with
# torch 2.11+cu130: 1.1e-5 at most over 99 tokens, ZeRO-2 and ZeRO-3), while the bugs this guards against
# (wrong positions, masks, routing, a lost weight) move log-probs of this peaked model by whole nats.
LOGP_TOL = 1e-4
REPO = Path(__file__).resolve().parents[2]


def require_cuda() -> None:
    assert torch.cuda.is_available(), (
        "this test needs a CUDA GPU (the learner runs on cuda:0 over NCCL) and torch with CUDA; this machine "
        f"has torch {torch.__version__} and no usable GPU. It is marked `gpu` and deselected in CI "
        "(scripts/test.sh: -m 'not slow and not gpu'); run it on a GPU machine with `-m gpu` "
        "(scripts/gpu_check.sh)."
    )


def train(worker: LearnerWorker, batch: PolicyBatch) -> dict[str, float]:
    """One `train_step` with pi_old recomputed first (a separate pass, as the driver's unfused path)."""
    return worker.train_step(batch.replace(old_logp=worker.compute_logprobs(batch)), ALGO)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].cpu() - b[k].cpu()).abs().max()) for k in a)


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def new_worker(checkpoint: Path, stage: int) -> LearnerWorker:
    from rlstack.learner.worker import free_port

    worker = LearnerWorker(str(checkpoint), LearnerConfig(zero_stage=stage, backend=BACKEND, **CFG))
    worker.setup("127.0.0.1", free_port())
    return worker


@pytest.fixture(scope="module", autouse=True)
def _no_tf32() -> Iterator[None]:
    """Plain fp32 matrix products on the GPU (TF32 would cost ~1e-3 relative), restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def workers(tiny_checkpoint: Path) -> Iterator[Callable[[int], LearnerWorker]]:
    """`workers(stage)`: this module's worker of that ZeRO stage, set up on first use (inside the test, after
    `require_cuda`, so a machine without a GPU gets that message). All share the default process group;
    the last `shutdown` leaves it."""
    made: dict[int, LearnerWorker] = {}
    threads = torch.get_num_threads()
    env_keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    with pytest.MonkeyPatch.context() as mp:
        for key in env_keys:
            mp.setenv(key, "restored-after-the-module")  # setup() writes these

        def get(stage: int) -> LearnerWorker:
            if stage not in made:
                made[stage] = new_worker(tiny_checkpoint, stage)
            return made[stage]

        try:
            yield get
        finally:
            for worker in made.values():
                worker.shutdown()
            torch.set_num_threads(threads)


@pytest.mark.parametrize("stage", STAGES)
def test_setup_puts_the_engine_on_the_gpu_and_steps_train(stage: int, workers) -> None:
    require_cuda()
    worker = workers(stage)
    assert worker.device == DEVICE
    info = worker.dist_info()
    assert info["backend"] == BACKEND and info["world_size"] == 1 and info["bound_device_id"] is None
    module = worker.engine.module
    for name, p in module.named_parameters():
        held = p.ds_tensor if stage == 3 else p  # ZeRO-3 keeps the rank's partition in ds_tensor
        assert held.device.type == DEVICE_TYPE and held.dtype == torch.float32, name
    assert all(b.device.type == DEVICE_TYPE for b in module.buffers())  # router_bias

    batch, before, version = make_batch(8, seed=1), worker.export_weights(), worker.version
    steps = [train(worker, batch) for _ in range(2)]
    # the third step as the driver runs it by default: pi_old taken from the training forward
    expected_old = worker.compute_logprobs(batch)
    metrics, old = worker.train_step_old_from_forward(batch, ALGO)
    steps.append(metrics)
    assert old is not None and old.device.type == "cpu" and old.shape == batch.input_ids.shape
    real = batch.attention_mask.bool()
    assert float((old - expected_old)[real].abs().max()) < TOL
    for m in steps:
        assert math.isfinite(m["actor/loss"]) and math.isfinite(m["actor/grad_norm"]), m
        assert m["actor/grad_norm"] > 0 and 0.0 < m["actor/train_frac"] <= 1.0, m
    assert worker.version == version + 3

    after = worker.export_weights()
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in after.values())
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.layers.1.moe.gate_proj.weight"} <= changed
    assert not any("router_bias" in k for k in changed)  # a buffer: never trained
    assert max_diff(after, before) > 1e-3


@pytest.mark.parametrize("stage", STAGES)
def test_gpu_logprobs_match_a_cpu_fp32_reference(stage: int, workers, tiny_checkpoint: Path) -> None:
    require_cuda()
    worker = workers(stage)
    batch = make_batch(8, seed=5)
    logp = worker.compute_logprobs(batch)  # (B, L), back on the CPU
    assert logp.device.type == "cpu" and logp.shape == batch.input_ids.shape

    reference = Step3p5ForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    reference.load_state_dict(worker.export_weights())  # whatever this worker's weights are by now
    with torch.no_grad():
        expected = token_logprobs(reference, batch.input_ids, batch.attention_mask) * batch.attention_mask

    scored = batch.attention_mask.bool()
    scored[:, 0] = False  # position 0 has no context
    diff = float((logp - expected)[scored].abs().max())
    print(f"ZeRO-{stage}: max |GPU - CPU| log-prob = {diff:.3g} over {int(scored.sum())} tokens")
    assert diff < LOGP_TOL
    assert float(logp[~scored].abs().max()) == 0.0  # position 0 and padding
    assert float(expected[scored].std()) > 0.5  # peaked weights: a difference of 1e-4 is not vacuous


@pytest.mark.parametrize("stage", STAGES)
def test_full_state_on_device_equals_the_cpu_export(stage: int, workers) -> None:
    require_cuda()
    worker = workers(stage)
    on_device = worker._full_state(worker.engine, on_device=True)
    exported = worker.export_weights()
    assert on_device is not None and on_device.keys() == exported.keys()
    for name, t in on_device.items():
        assert t.device == DEVICE and t.dtype == torch.float32, name
        assert t.is_contiguous() and torch.equal(t.cpu(), exported[name]), name
    # copies, not views of the engine's parameters (a weight sync may hold them while training goes on)
    params = {p.data_ptr() for p in worker.engine.module.parameters()}
    assert not any(t.data_ptr() in params for t in on_device.values())


@pytest.mark.parametrize("stage", STAGES)
def test_checkpoint_round_trip_into_a_fresh_worker(
    stage: int, workers, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_cuda()
    worker = workers(stage)
    train(worker, make_batch(8, seed=2))  # so that the optimizer has state, whatever ran before
    ckpt = tmp_path / "ckpt"
    worker.save_checkpoint(str(ckpt))
    saved, saved_opt = worker.export_weights(), worker.optimizer_state()
    assert len(saved_opt) > 0 and all(t.device.type == "cpu" for t in saved_opt.values())

    # the directory is an HF checkpoint: transformers' Auto classes load our model class with these weights
    assert {"config.json", "model.safetensors", "tokenizer.json", "trainer_state"} <= set(os.listdir(ckpt))
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    assert isinstance(hf, Step3p5ForCausalLM)
    state = hf.state_dict()
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    assert len(AutoTokenizer.from_pretrained(ckpt)) > 0

    fresh = new_worker(tiny_checkpoint, stage)  # starts from the initial weights, in the same group
    try:
        assert not equal(fresh.export_weights(), saved)
        assert fresh.load_checkpoint(str(ckpt)) == worker.version == fresh.version
        assert equal(fresh.export_weights(), saved)
        restored_opt = fresh.optimizer_state()
        assert restored_opt.keys() == saved_opt.keys()
        assert all(torch.equal(restored_opt[k], saved_opt[k]) for k in saved_opt)
        assert all(p.device.type == DEVICE_TYPE for p in _optimizer_tensors(fresh))
        # both go on with the same step and stay together
        nxt = make_batch(8, seed=3)
        train(worker, nxt)
        train(fresh, nxt)
        moved = max_diff(worker.export_weights(), saved)
        apart = max_diff(worker.export_weights(), fresh.export_weights())
        print(
            f"ZeRO-{stage}: the next step moved weights by up to {moved:.3g}; "
            f"the two engines differ by {apart:.3g}"
        )
        assert moved > 0.5 * CFG["lr"] and apart < TOL  # Adam moves a weight by up to about lr a step
    finally:
        fresh.engine = None  # not shutdown(): that would take the module's shared process group with it


def _optimizer_tensors(worker: LearnerWorker) -> list[torch.Tensor]:
    """The live optimizer state tensors (not `optimizer_state`'s CPU copies), minus AdamW's step counts."""
    opt = worker.engine.optimizer
    base = getattr(opt, "optimizer", opt)
    return [
        v for s in base.state.values() for k, v in s.items() if isinstance(v, torch.Tensor) and k != "step"
    ]


_SHUTDOWN_CHILD = """
import json, sys
import torch, torch.distributed as dist
from rlstack.learner import LearnerConfig
from rlstack.learner.worker import LearnerWorker, free_port

checkpoint, stage, backend, data = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
data = torch.load(data, weights_only=False)
worker = LearnerWorker(checkpoint, LearnerConfig(zero_stage=stage, backend=backend, **data["cfg"]))
worker.setup("127.0.0.1", free_port())
batch = data["batch"]
metrics = worker.train_step(batch.replace(old_logp=worker.compute_logprobs(batch)), data["algo"])
state = worker._full_state(worker.engine, on_device=True)  # what a weight sync sends
during = {"initialized": dist.is_initialized(), "backend": str(dist.get_backend()),
          "loss": metrics["actor/loss"], "device": str(next(iter(state.values())).device)}
worker.shutdown()
after = {"initialized": dist.is_initialized(), "groups": len(dist.distributed_c10d._world.pg_map),
         "engine": worker.engine is not None}
print("RESULT " + json.dumps({"during": during, "after": after}), flush=True)
"""


@pytest.mark.parametrize("stage", STAGES)
def test_shutdown_leaves_no_process_group(stage: int, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A fresh process (one worker per process, as a Ray actor): set up, one step, shutdown; then no process
    group is left, not even DeepSpeed's clones, and the process exits without torch's warning about a
    process group that was never destroyed."""
    require_cuda()
    data = tmp_path / "batch.pt"
    torch.save({"batch": make_batch(8, seed=4), "algo": ALGO, "cfg": CFG}, data)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    args = [sys.executable, "-c", _SHUTDOWN_CHILD, str(tiny_checkpoint), str(stage), BACKEND, str(data)]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    during, after = result["during"], result["after"]
    assert during["initialized"] and during["backend"] == BACKEND and math.isfinite(during["loss"])
    assert during["device"] == str(DEVICE)
    assert after == {"initialized": False, "groups": 0, "engine": False}
    assert "destroy_process_group" not in proc.stderr, proc.stderr[-4000:]
