"""Supervised warm start: teach the policy the task's answer format from generated worked solutions.

It runs on the same DeepSpeed learner as RL and through the same loss: with every token accepted
(pi_old = pi_rollout, so x_t = 1) and advantage 1 on each solution token, the MIS-PO token-mean loss
is exactly the mean negative log-likelihood of the demonstrations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rlstack.config import RunConfig, dump_config
from rlstack.data.prompts import render_prompt
from rlstack.run import init_ray, initial_policy
from rlstack.types import Rollout


def demonstration(tokenizer: Any, row: dict[str, Any], version: int, chat_template: bool = True) -> Rollout:
    """A row's demonstration as a rollout: its `solution_messages` (a tool-using episode: tool output out
    of the loss, as in RL) when it has them, else its `solution` text. The prompt is rendered as in RL
    (`data.chat_template`)."""
    text = render_prompt(tokenizer, row["prompt"], chat_template=chat_template)
    prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    if row.get("solution_messages"):
        from rlstack.envs.tool_calls import demonstration_tokens

        response_ids, mask = demonstration_tokens(tokenizer, row["solution_messages"])
    elif row.get("solution"):
        response_ids = [*tokenizer.encode(row["solution"], add_special_tokens=False), tokenizer.eos_token_id]
        mask = [1] * len(response_ids)
    else:
        raise ValueError(f"row {row.get('prompt_id')!r} has no 'solution': SFT needs demonstrations")
    return Rollout(
        prompt_id=str(row["prompt_id"]),
        prompt_ids=prompt_ids,
        response_ids=response_ids,
        response_logprobs=[0.0] * len(response_ids),
        finish_reason="stop",
        version=version,
        response_mask=mask,
    )


def run_sft(cfg: RunConfig, progress: bool = True) -> Path:
    """Train `sft.steps` steps of `sft.batch_size` demonstrations; returns the HF policy directory."""
    from transformers import AutoTokenizer

    from rlstack.data.sources import PromptSource
    from rlstack.learner import LearnerGroup, collate
    from rlstack.metrics import MetricsSink
    from rlstack.mispo import AlgorithmConfig, apply_filters
    from rlstack.progress import TrainProgress
    from rlstack.run_dir import archive_previous_run

    run_dir = Path(cfg.trainer.run_dir)
    out_dir = run_dir / cfg.sft.output
    dump_config(cfg, run_dir / "config.resolved.yaml")
    owns_ray = init_ray(cfg)
    policy = initial_policy(cfg, run_dir)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    source = PromptSource.from_config(cfg.data)
    learner = LearnerGroup(policy, cfg.learner.model_copy(update={"lr": cfg.sft.lr, "n_minibatches": 1}))
    nll = AlgorithmConfig(name="mispo", traj_filter="off", loss_norm="token_mean")
    # Metrics live outside the policy directory, which must hold only what a checkpoint loader reads.
    archive_previous_run(run_dir / "logs" / "sft")  # a fresh SFT run's logs never mix with an older one's
    sink = MetricsSink(run_dir / "logs" / "sft", cfg.logging)
    try:
        with TrainProgress(
            cfg.sft.steps, 0, enabled=progress, every_s=cfg.logging.progress_every_s, name="sft"
        ) as bar:
            for step in range(1, cfg.sft.steps + 1):
                rows = source.next_batch(cfg.sft.batch_size)
                batch = collate(
                    [demonstration(tokenizer, r, learner.version, cfg.data.chat_template) for r in rows],
                    tokenizer.pad_token_id,
                )
                old_logp = torch.zeros_like(batch.rollout_logp)  # (B, L): pi_old = rollout, every ratio 1
                flt = apply_filters(old_logp, batch.rollout_logp, batch.loss_mask, nll.token_band, None)
                batch = batch.replace(old_logp=old_logp, filter=flt, advantages=batch.loss_mask)
                metrics = learner.train(batch, nll).metrics
                metrics["sft/nll"] = metrics.get("actor/loss", float("nan"))
                sink.log(step, metrics)
                bar.update(step, metrics)
        learner.save_checkpoint(out_dir)
    finally:
        sink.close()
        learner.shutdown()
        if owns_ray:
            import ray

            ray.shutdown()
    return out_dir


def memorize(
    checkpoint: Path, episodes: list[tuple[str, list[dict[str, Any]]]], max_steps: int = 300
) -> float:
    """Teach the policy at `checkpoint` (in place, plain PyTorch, one process) to act out a few fixed
    episodes, each (user prompt, assistant/tool messages), until it repeats them: fixtures for tests and
    benchmarks that need a real engine to write real tool calls. Returns the final loss (mean NLL of the
    model tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlstack.envs.tool_calls import demonstration_tokens

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    sequences = []
    for prompt, messages in episodes:
        prompt_ids = tokenizer.encode(render_prompt(tokenizer, prompt), add_special_tokens=False)
        response, mask = demonstration_tokens(tokenizer, messages)
        targets = [-100] * len(prompt_ids) + [t if m else -100 for t, m in zip(response, mask, strict=True)]
        sequences.append((prompt_ids + response, targets))
    length = max(len(ids) for ids, _ in sequences)
    ids = torch.tensor([s + [0] * (length - len(s)) for s, _ in sequences])  # (E, L)
    labels = torch.tensor([lab + [-100] * (length - len(lab)) for _, lab in sequences])  # (E, L)
    attention = (torch.arange(length)[None] < torch.tensor([len(s) for s, _ in sequences])[:, None]).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss = torch.tensor(float("inf"))
    for _ in range(max_steps):
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 1e-3:
            break
    model.save_pretrained(checkpoint)
    return loss.item()
