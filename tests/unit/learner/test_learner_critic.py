"""The critic (value model): config, value alignment, exact micro-batch/rank arithmetic in plain torch, and a
real DeepSpeed ZeRO-3 learner rank in-process (gloo, world 1, no Ray) holding policy and critic engines."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

# the policy step tests' rank threads (a sibling module): the critic must pass the same equivalence
from test_learner_step import _assert_close
from thread_ranks import RankReducer, run_on_ranks

from rlstack.learner.batch import PolicyBatch
from rlstack.learner.config import CriticConfig, LearnerConfig
from rlstack.learner.critic import ValueModel, accumulate_critic_minibatch, finish_critic_metrics
from rlstack.learner.step import LocalReducer, TorchSink
from rlstack.mispo import AlgorithmConfig, apply_filters, compute_advantages
from rlstack.model import Step3p5ForCausalLM

ALGO = AlgorithmConfig(name="mispo", advantage="critic", traj_filter="off", token_band=(0.3, 3.0))


# ---- config ------------------------------------------------------------------------------------------


def test_critic_config_defaults_and_errors() -> None:
    from rlstack.config import ConfigError, RunConfig, load_config

    cfg = LearnerConfig()
    assert cfg.critic == CriticConfig() and not cfg.critic.enabled
    assert cfg.critic_lr == cfg.lr  # unset: the policy's learning rate
    assert LearnerConfig(critic={"enabled": True, "lr": 1e-3}).critic_lr == 1e-3
    assert all(field.description for field in CriticConfig.model_fields.values())
    with pytest.raises(ConfigError, match=r"'learner.critic.lr': Input should be greater than 0"):
        load_config(None, ["learner.critic.enabled=true", "learner.critic.lr=0"])
    with pytest.raises(
        ConfigError, match=r"unknown key 'learner.critic.value_lr'; allowed keys here: enabled"
    ):
        load_config(None, ["learner.critic.value_lr=1e-5"])
    with pytest.raises(ConfigError, match=r"learner.critic.lr set but learner.critic.enabled is false"):
        load_config(None, ["learner.critic.lr=1e-5"])
    # a resolved config (every field written out, nulls included) loads again
    critic_run = {"learner": LearnerConfig(critic={"enabled": True}), "algorithm": {"advantage": "critic"}}
    resolved = RunConfig(**critic_run).model_dump(mode="json")
    assert RunConfig.model_validate(resolved).learner.critic.enabled
    assert RunConfig.model_validate(RunConfig().model_dump(mode="json")).learner.critic.lr is None


# ---- the value model ---------------------------------------------------------------------------------


def test_values_are_aligned_like_logprobs(
    tiny_checkpoint: Path, policy: Step3p5ForCausalLM, ragged_batch
) -> None:
    b = ragged_batch
    vm = ValueModel.from_policy(tiny_checkpoint, head_seed=0)
    trunk = policy.model.state_dict()
    assert vm.model.state_dict().keys() == trunk.keys()
    assert all(torch.equal(v, trunk[k]) for k, v in vm.model.state_dict().items())  # the policy's trunk
    assert not any("lm_head" in k for k in vm.state_dict())
    assert torch.equal(ValueModel.from_policy(tiny_checkpoint, 0).value_head.weight, vm.value_head.weight)
    assert not torch.equal(ValueModel.from_policy(tiny_checkpoint, 1).value_head.weight, vm.value_head.weight)
    assert float(vm.value_head.bias.detach().abs().max()) == 0.0

    with torch.no_grad():
        values = vm(b.input_ids, b.attention_mask)
    assert values.shape == b.input_ids.shape and values.dtype == torch.float32
    assert float(values[:, 0].abs().max()) == 0.0  # no state before the first token
    for row in range(len(b)):
        n = int(b.attention_mask[row].sum())
        with torch.no_grad():  # unpadded: padding must not matter
            hidden, _ = policy.model(b.input_ids[row, :n][None])  # (1, n, H)
            expected = vm.value_head(hidden[0]).squeeze(-1)  # (n,) V of the state after token t
        torch.testing.assert_close(values[row, 1:n], expected[: n - 1], rtol=0, atol=1e-5)

    # V(s_t) sees tokens < t only: changing token 5 leaves positions <= 5 alone and moves position 6
    row = int(b.attention_mask.sum(-1).argmax())
    ids = b.input_ids.clone()
    ids[row, 5] = (ids[row, 5] + 1) % 128
    with torch.no_grad():
        moved = vm(ids, b.attention_mask)
    assert torch.equal(moved[row, :6], values[row, :6])
    assert float((moved[row, 6] - values[row, 6]).abs()) > 1e-6


# ---- accumulation arithmetic (plain torch) -----------------------------------------------------------


def _with_returns(batch: PolicyBatch, vm: ValueModel) -> PolicyBatch:
    """Critic advantages and returns as the driver makes them (some rows truncated: bootstrapped)."""
    truncated = torch.arange(len(batch)) % 4 == 1
    batch = batch.replace(truncated=truncated)
    with torch.no_grad():  # one padding column more: its value is the state after the last token
        pad = torch.nn.functional.pad
        values = vm(pad(batch.input_ids, (0, 1)), pad(batch.attention_mask, (0, 1)))  # (B, L + 1)
    adv, returns = compute_advantages(
        ALGO, batch.rewards, batch.loss_mask, values=values, truncated=truncated, group_ids=batch.group_ids
    )
    return batch.replace(advantages=adv, returns=returns, old_logp=batch.rollout_logp)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_norm", ["token_mean", "seq_mean"])
def test_critic_micro_batches_and_two_ranks_equal_one(tiny_checkpoint: Path, ragged_batch, loss_norm) -> None:
    vm = ValueModel.from_policy(tiny_checkpoint)
    batch = _with_returns(ragged_batch, vm).select(slice(0, 7))  # 7 rows: rank shards of 4 and 3

    def one_rank(micro_batch_size: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        model = copy.deepcopy(vm)
        stats = accumulate_critic_minibatch(
            model, batch, loss_norm, TorchSink(), LocalReducer(), micro_batch_size
        )
        return _grads(model), finish_critic_metrics(stats.all_reduce(LocalReducer()).result())

    g_one, m_one = one_rank(7)
    g_micro, m_micro = one_rank(1)
    assert g_one["value_head.weight"].abs().max() > 1e-4 and g_one.keys() == g_micro.keys()
    assert any(k.startswith("model.layers.") for k in g_one)  # the trunk trains too
    for name in g_one:
        _assert_close(g_micro[name], g_one[name], name)

    shards, models = batch.split(2), [copy.deepcopy(vm) for _ in range(2)]

    def rank_main(r: int, reducer: RankReducer) -> dict[str, float]:
        # micro-batch 3: rank 0 runs 2 micro-batches, rank 1 one + one inert
        stats = accumulate_critic_minibatch(models[r], shards[r], loss_norm, TorchSink(), reducer, 3)
        return finish_critic_metrics(stats.all_reduce(reducer).result())

    results = run_on_ranks(2, rank_main)
    grads = [_grads(m) for m in models]
    for name, g in g_one.items():
        _assert_close((grads[0][name] + grads[1][name]) / 2, g, name)  # data parallelism averages
    assert results[0] == results[1]
    # mse by hand: every generated token's (V - R)^2, averaged over the batch
    with torch.no_grad():
        err = (vm(batch.input_ids, batch.attention_mask) - batch.returns)[batch.loss_mask.bool()]
    assert m_one["critic/mse"] == pytest.approx(float((err**2).mean()), rel=1e-5)
    for key in (
        "critic/loss",
        "critic/mse",
        "critic/value_mean",
        "critic/explained_var",
        "critic/return_mean",
    ):
        assert results[0][key] == pytest.approx(m_one[key], rel=1e-5, abs=1e-7), key
        assert m_micro[key] == pytest.approx(m_one[key], rel=1e-5, abs=1e-7), key


def test_critic_inputs_are_checked(tiny_checkpoint: Path, ragged_batch, tmp_path: Path) -> None:
    from rlstack.learner.worker import LearnerWorker

    plain = LearnerWorker(str(tiny_checkpoint), LearnerConfig(), rank=0, world_size=1)  # never set up
    with pytest.raises(ValueError, match=r"compute_values needs the critic: set learner\.critic\.enabled"):
        plain.compute_values(ragged_batch)
    returns = torch.zeros_like(ragged_batch.loss_mask)
    with pytest.raises(ValueError, match=r"returns is set but learner\.critic\.enabled is false"):
        plain.train_step(ragged_batch.replace(returns=returns), ALGO)
    critic_cfg = LearnerConfig(critic={"enabled": True})
    critic = LearnerWorker(str(tiny_checkpoint), critic_cfg, rank=0, world_size=1)
    with pytest.raises(ValueError, match=r"learner.critic.enabled but PolicyBatch.returns is None"):
        critic.train_step(ragged_batch, ALGO)
    with pytest.raises(ValueError, match=r"returns has shape \(8, 3\), expected \(B, L\)"):
        critic.train_step(ragged_batch.replace(returns=returns[:, :3]), ALGO)

    state = tmp_path / "trainer_state"  # a checkpoint saved without a critic
    state.mkdir()
    meta = {"version": 1, "tag": "version_1", "world_size": 1, "zero_stage": 2}
    (state / "learner.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="saved with no critic, but this learner has a critic"):
        critic.load_checkpoint(str(tmp_path))
    (state / "learner.json").write_text(json.dumps(meta | {"critic": True}))
    with pytest.raises(ValueError, match="saved with a critic, but this learner has no critic"):
        plain.load_checkpoint(str(tmp_path))


# ---- one real DeepSpeed rank, in-process -------------------------------------------------------------

CRITIC_LR = 2e-3


@pytest.fixture(scope="module")
def worker(tiny_checkpoint: Path):
    """ZeRO-3 rank 0 of 1 with the critic (DeepSpeed caches its process groups: one rank per process)."""
    from rlstack.learner.worker import LearnerWorker, free_port

    cfg = LearnerConfig(
        zero_stage=3,
        backend="gloo",
        micro_batch_size=3,
        adam_eps=1e-6,
        critic={"enabled": True, "lr": CRITIC_LR},
    )
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            mp.setenv(key, "restored-after-the-module")  # setup() writes these
        w = LearnerWorker(str(tiny_checkpoint), cfg, rank=0, world_size=1)
        try:
            w.setup("127.0.0.1", free_port())
            yield w
        finally:
            w.shutdown()
            torch.set_num_threads(threads)


def _train_batch(batch: PolicyBatch, returns: torch.Tensor) -> PolicyBatch:
    """Fixed returns, group advantages, old log-probs = rollout ones, and a batch-level MIS filter."""
    cfg = AlgorithmConfig(traj_filter="off")
    adv, _ = compute_advantages(cfg, batch.rewards, batch.loss_mask, group_ids=batch.group_ids)
    flt = apply_filters(batch.rollout_logp, batch.rollout_logp, batch.loss_mask, (0.5, 2.0), None)
    return batch.replace(advantages=adv, old_logp=batch.rollout_logp, filter=flt, returns=returns)


def _fixed_returns(batch: PolicyBatch) -> torch.Tensor:
    return torch.where(batch.loss_mask.bool(), 2.0 * batch.rewards[:, None] - 0.5, 0.0)  # (B, L), +-1.5/0.5


def _masked_mse(values: torch.Tensor, batch: PolicyBatch) -> float:
    """values (B, L + 1) from compute_values; its last column is the state after the last token."""
    mask = batch.loss_mask.bool()
    return float(((values[:, :-1] - batch.returns)[mask] ** 2).mean())


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.deepspeed
def test_engine_values_match_the_value_model(worker, tiny_checkpoint: Path, ragged_batch) -> None:
    b = ragged_batch
    values = worker.compute_values(b)
    B, L = b.input_ids.shape
    assert values.shape == (B, L + 1)  # V(s_t) per position, plus the state after the last token
    ids = torch.nn.functional.pad(b.input_ids, (0, 1))  # (B, L + 1)
    attn = torch.nn.functional.pad(b.attention_mask, (0, 1))  # (B, L + 1)
    # kept: position t whose preceding token t - 1 is real, i.e. 1..n_b (n_b = the state after the last)
    keep = torch.nn.functional.pad(attn[:, :-1], (1, 0))  # (B, L + 1)
    assert float(values[:, 0].abs().max()) == 0.0 and float(values[keep == 0].abs().max()) == 0.0
    lengths = b.attention_mask.sum(-1)  # (B,)
    assert bool((values.gather(-1, lengths[:, None]) != 0).all())  # the state after the last token is kept
    vm = ValueModel.from_policy(tiny_checkpoint)
    vm.load_state_dict(worker.critic_weights())  # gathered from ZeRO-3 partitions
    with torch.no_grad():
        expected = vm(ids, attn) * keep
    torch.testing.assert_close(values, expected, rtol=0, atol=1e-5)


@pytest.mark.deepspeed
def test_critic_and_policy_steps_touch_only_their_own_engine(
    worker, tiny_checkpoint: Path, ragged_batch
) -> None:
    batch = _train_batch(ragged_batch, _fixed_returns(ragged_batch))
    policy0, critic0 = worker.export_weights(), worker.critic_weights()
    with safe_open(tiny_checkpoint / "model.safetensors", "pt") as f:
        assert set(policy0) == set(f.keys())  # the export is the policy alone, under checkpoint names
    assert {"value_head.weight", "value_head.bias"} <= set(critic0)

    metrics = worker.train_critic(batch, ALGO)
    policy1, critic1 = worker.export_weights(), worker.critic_weights()
    assert _equal(policy1, policy0)
    assert not torch.equal(critic1["value_head.weight"], critic0["value_head.weight"])
    assert not torch.equal(critic1["model.embed_tokens.weight"], critic0["model.embed_tokens.weight"])
    assert metrics["critic/lr"] == CRITIC_LR and metrics["critic/grad_norm"] > 0
    assert not any(k.startswith("actor/") for k in metrics)

    metrics = worker.train_policy(batch, ALGO)
    assert _equal(worker.critic_weights(), critic1)
    assert not torch.equal(worker.export_weights()["lm_head.weight"], policy1["lm_head.weight"])
    assert metrics["actor/lr"] == pytest.approx(3e-4) and not any(k.startswith("critic/") for k in metrics)


@pytest.mark.deepspeed
def test_critic_steps_reduce_the_mse_on_fixed_returns(worker, ragged_batch) -> None:
    batch = _train_batch(ragged_batch, _fixed_returns(ragged_batch))
    version, mses = worker.version, []
    for _ in range(4):
        before = _masked_mse(worker.compute_values(batch), batch)
        metrics = worker.train_step(batch, ALGO)
        # the step's metric is the MSE of the values it started from, over all generated tokens
        assert metrics["critic/mse"] == pytest.approx(before, rel=1e-4)
        assert metrics["critic/loss"] == pytest.approx(before, rel=1e-4)  # token_mean, one mini-batch
        mses.append(before)
    after = _masked_mse(worker.compute_values(batch), batch)
    assert after < 0.5 * mses[0] and mses == sorted(mses, reverse=True), (mses, after)
    assert worker.version == version + 4
    assert metrics["critic/return_mean"] == pytest.approx(float(batch.returns[batch.loss_mask.bool()].mean()))
    assert -1.0 < metrics["critic/explained_var"] <= 1.0
    assert {"actor/loss", "actor/grad_norm", "batch/tokens", "learner/step_time_s"} <= metrics.keys()


@pytest.mark.deepspeed
def test_save_load_round_trip_restores_the_critic(worker, ragged_batch, tmp_path: Path) -> None:
    batch = _train_batch(ragged_batch, _fixed_returns(ragged_batch))
    worker.train_step(batch, ALGO)
    worker.save_checkpoint(str(tmp_path / "ckpt"))
    saved, saved_opt = worker.critic_weights(), worker.optimizer_state(critic=True)
    version = worker.version
    worker.train_step(batch, ALGO)
    expected_policy, expected_critic = worker.export_weights(), worker.critic_weights()
    assert not _equal(expected_critic, saved)

    state = tmp_path / "ckpt" / "trainer_state"
    assert json.loads((state / "learner.json").read_text())["critic"] is True
    assert (state / "critic" / "latest").is_file()
    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as f:  # the HF policy alone
        assert not any("value_head" in k for k in f.keys())  # noqa: SIM118 (not a dict)

    assert worker.load_checkpoint(str(tmp_path / "ckpt")) == version
    assert _equal(worker.critic_weights(), saved)
    restored_opt = worker.optimizer_state(critic=True)
    assert len(saved_opt) > 0 and _equal(restored_opt, saved_opt)
    worker.train_step(batch, ALGO)  # the same next step, bit for bit
    assert _equal(worker.critic_weights(), expected_critic)
    assert _equal(worker.export_weights(), expected_policy)


# ---- through Ray: 2 ZeRO-3 ranks equal 1 ZeRO-0 rank -------------------------------------------------


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.deepspeed
def test_group_critic_on_two_zero3_ranks_matches_one_rank(tiny_checkpoint: Path, ragged_batch) -> None:
    """The driver's critic path through `LearnerGroup`: values, critic advantages, one step with returns."""
    import ray

    from rlstack.learner import LearnerGroup

    batch = PolicyBatch.cat([ragged_batch, ragged_batch.select(slice(1, 8))])  # 15 rows
    batch = batch.replace(truncated=torch.arange(15) % 5 == 0)
    critic = {"enabled": True, "lr": CRITIC_LR}

    def run(num_ranks: int, zero_stage: int, micro_batch_size: int) -> dict:
        cfg = LearnerConfig(
            num_ranks=num_ranks, zero_stage=zero_stage, micro_batch_size=micro_batch_size, n_minibatches=2,
            adam_eps=1e-6, backend="gloo", cpus_per_rank=1, critic=critic,
        )  # fmt: skip
        with LearnerGroup(tiny_checkpoint, cfg) as group:
            values = group.compute_values(batch)
            adv, returns = compute_advantages(
                ALGO, batch.rewards, batch.loss_mask, values=values, truncated=batch.truncated
            )
            step = batch.replace(advantages=adv, returns=returns, old_logp=group.compute_logprobs(batch))
            metrics = group.train(step, ALGO).metrics
            return {"values": values, "metrics": metrics, "critic": group.critic_weights(),
                    "policy": group.export_weights()}  # fmt: skip

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        one = run(1, 0, 16)
        two = run(2, 3, 3)  # mini-batches of 8 and 7 -> shards 4/4 and 4/3 -> uneven micro-batch counts
    finally:
        ray.shutdown()
    assert float((two["values"] - one["values"]).abs().max()) < 1e-5
    fresh = ValueModel.from_policy(tiny_checkpoint).state_dict()
    assert float((one["critic"]["value_head.weight"] - fresh["value_head.weight"]).abs().max()) > 1e-4
    for part in ("critic", "policy"):
        assert one[part].keys() == two[part].keys()
        assert max(float((one[part][k] - two[part][k]).abs().max()) for k in one[part]) < 1e-5, part
    for key in ("critic/loss", "critic/mse", "critic/value_mean", "critic/grad_norm", "actor/loss"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-4, abs=1e-6), key


@pytest.mark.deepspeed
def test_a_batch_without_signal_leaves_the_policy_unchanged(worker, ragged_batch) -> None:
    """All advantages 0 (every group scored alike): the gradient is 0, and Adam must not move the weights
    by its momentum from earlier steps either."""
    batch = _train_batch(ragged_batch, _fixed_returns(ragged_batch))
    assert worker.train_policy(batch, ALGO)["actor/frozen_steps"] == 0  # builds up Adam momentum
    before = worker.export_weights()
    metrics = worker.train_policy(batch.replace(advantages=torch.zeros_like(batch.advantages)), ALGO)
    assert metrics["actor/frozen_steps"] == 1 and metrics["actor/grad_norm"] == 0.0
    assert _equal(worker.export_weights(), before)
    assert metrics["actor/lr"] == pytest.approx(3e-4)  # restored after the frozen step
    worker.train_policy(batch, ALGO)
    assert not _equal(worker.export_weights(), before)


@pytest.mark.deepspeed
def test_no_signal_is_decided_after_the_forward_where_the_mis_mask_exists(worker, ragged_batch) -> None:
    """Nonzero advantages, but the MIS token filter rejects every token (pi_old / pi_rollout = e^5): no
    token can move the weights, so the step runs at lr 0. Deciding from the advantages alone (before the
    forward) would have let Adam's momentum move the policy."""
    batch = _train_batch(ragged_batch, _fixed_returns(ragged_batch))
    assert bool((batch.advantages != 0).any())
    worker.train_policy(batch, ALGO)  # builds up Adam momentum
    before = worker.export_weights()
    old = batch.rollout_logp + 5.0 * batch.loss_mask  # (B, L)
    rejected = batch.replace(
        old_logp=old, filter=apply_filters(old, batch.rollout_logp, batch.loss_mask, (0.5, 2.0), None)
    )
    metrics = worker.train_policy(rejected, ALGO)
    assert metrics["filter/token_accept"] == 0.0 and metrics["actor/signal_tokens"] == 0.0
    assert metrics["actor/frozen_steps"] == 1 and _equal(worker.export_weights(), before)
