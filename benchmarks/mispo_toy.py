"""Toy off-policy benchmark: MIS-PO (fixed / adaptive / no trajectory band), GRPO and GSPO under staleness.

No LLM. The "policy" is a table of softmax logits over a vocabulary of V tokens, conditioned on the previous
token and the position: logits(prev, t) = W[prev] + P[t]. A prompt is a start token; a response is L tokens.
Reward: the fraction of positions where a_t == (a_{t-1} + 1) mod V (count upwards). Because the policy is
a Markov chain, the expected reward is computed exactly by propagating the token marginals.

Staleness k: responses are sampled from a copy of the policy k updates old (pi_rollout); the learner
recomputes pi_old with the current weights, exactly as an async trainer would. Every step: sample G
responses for each of n prompts, group advantages, MIS filter once on the batch, then `--minibatches`
Adam updates through `rlstack.mispo.compute_policy_loss`.

    python benchmarks/mispo_toy.py --steps 100 --seed 0     # rlstack installed, or PYTHONPATH=.

Prints the final exact expected reward, gradient-norm mean/variance over all updates, the mean fraction of
generated tokens that trained (MIS masks) and the clip fraction (baselines). No threshold is asserted:
it is a picture, not a test.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import torch

from rlstack.mispo import AlgorithmConfig, MISFilter, compute_advantages, compute_policy_loss, loss_normalizer

METHODS: dict[str, AlgorithmConfig] = {
    "mispo-fixed": AlgorithmConfig(name="mispo", traj_filter="fixed"),
    "mispo-adaptive": AlgorithmConfig(name="mispo", traj_filter="adaptive"),
    "mispo-traj-off": AlgorithmConfig(name="mispo", traj_filter="off"),
    "grpo": AlgorithmConfig(name="grpo"),
    "gspo": AlgorithmConfig(name="gspo"),
}


class TablePolicy(torch.nn.Module):
    def __init__(self, vocab: int, length: int) -> None:
        super().__init__()
        self.trans = torch.nn.Parameter(torch.zeros(vocab, vocab))  # (V, V) logits given the previous token
        self.pos = torch.nn.Parameter(torch.zeros(length, vocab))  # (L, V) position bias

    def logits(self, prev: torch.Tensor) -> torch.Tensor:
        """prev (B, L) previous tokens -> (B, L, V) next-token logits."""
        return self.trans[prev] + self.pos[None, : prev.shape[1]]

    def logp(self, prompts: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """prompts (B,), actions (B, L) -> (B, L) log-probs of the sampled tokens."""
        prev = torch.cat([prompts[:, None], actions[:, :-1]], dim=1)  # (B, L)
        return torch.log_softmax(self.logits(prev), -1).gather(-1, actions[..., None]).squeeze(-1)

    @torch.no_grad()
    def sample(self, prompts: torch.Tensor, length: int, gen: torch.Generator) -> torch.Tensor:
        prev, out = prompts, []
        for t in range(length):
            probs = torch.softmax(self.trans[prev] + self.pos[t], -1)  # (B, V)
            prev = torch.multinomial(probs, 1, generator=gen).squeeze(-1)  # (B,)
            out.append(prev)
        return torch.stack(out, dim=1)  # (B, L)

    @torch.no_grad()
    def expected_reward(self) -> float:
        """Exact E[reward] for a uniform start token, by propagating the marginal of the previous token."""
        vocab, length = self.pos.shape[1], self.pos.shape[0]
        p = torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)  # (V,) marginal of the previous token
        nxt = (torch.arange(vocab) + 1) % vocab
        total = 0.0
        for t in range(length):
            trans = torch.softmax((self.trans + self.pos[t]).double(), -1)  # (V, V)
            total += float((p * trans[torch.arange(vocab), nxt]).sum())
            p = p @ trans
        return total / length


def reward_fn(prompts: torch.Tensor, actions: torch.Tensor, vocab: int) -> torch.Tensor:
    prev = torch.cat([prompts[:, None], actions[:, :-1]], dim=1)  # (B, L)
    return (actions == (prev + 1) % vocab).double().mean(-1).float()  # (B,)


def run(cfg: AlgorithmConfig, k: int, args: argparse.Namespace, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    policy = TablePolicy(args.vocab, args.length)
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
    mis_filter = MISFilter(cfg)
    history = [copy.deepcopy(policy)]  # history[-1 - k] is the policy k updates old
    grad_norms: list[float] = []
    train_frac: list[float] = []
    clip_frac: list[float] = []
    batch = args.prompts * args.group
    for _ in range(args.steps):
        behaviour = history[max(0, len(history) - 1 - k)]
        prompts = torch.randint(0, args.vocab, (args.prompts,), generator=gen).repeat_interleave(args.group)
        actions = behaviour.sample(prompts, args.length, gen)  # (B, L)
        loss_mask = torch.ones(batch, args.length, dtype=torch.bool)  # (B, L) all generated
        with torch.no_grad():
            rollout_logp = behaviour.logp(prompts, actions)  # (B, L) recorded by the "engine"
            old_logp = policy.logp(prompts, actions)  # (B, L) recomputed by the learner
        adv, _ = compute_advantages(
            cfg, reward_fn(prompts, actions, args.vocab), loss_mask, group_size=args.group
        )
        fr = mis_filter(old_logp, rollout_logp, loss_mask)  # once per step
        for rows in torch.randperm(batch, generator=gen).chunk(args.minibatches):
            norm = loss_normalizer(loss_mask[rows], cfg.loss_norm)
            loss, metrics = compute_policy_loss(
                cfg,
                policy.logp(prompts[rows], actions[rows]),
                old_logp[rows],
                rollout_logp[rows],
                adv[rows],
                loss_mask[rows],
                norm,
                filter_result=fr.select(rows),
            )
            opt.zero_grad()
            loss.backward()
            grad_norms.append(float(torch.nn.utils.clip_grad_norm_(policy.parameters(), float("inf"))))
            train_frac.append(metrics["actor/train_frac"])
            clip_frac.append(metrics.get("actor/clip_frac", float("nan")))  # baselines only
            opt.step()
        history = [*history[-k:], copy.deepcopy(policy)] if k else [copy.deepcopy(policy)]
    return {
        "reward": policy.expected_reward(),
        "gn_mean": statistics.fmean(grad_norms),
        "gn_var": statistics.pvariance(grad_norms),
        "train_frac": statistics.fmean(train_frac),
        "clip_frac": statistics.fmean(clip_frac),
    }


def print_table(rows: list[list[str]], header: list[str], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        print(title)
        for r in [header, ["-" * w for w in widths], *rows]:
            print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
        return
    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="right")
    for r in rows:
        table.add_row(*r)
    Console(width=120).print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100, help="training steps (batches) per run")
    ap.add_argument("--seed", type=int, default=0, help="base seed; repeat r uses seed + r")
    ap.add_argument("--repeats", type=int, default=2, help="runs per (method, k), averaged")
    ap.add_argument("--staleness", type=int, nargs="+", default=[0, 2, 8], help="values of k")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--vocab", type=int, default=16)
    ap.add_argument("--length", type=int, default=12, help="response length L")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per step")
    ap.add_argument("--group", type=int, default=8, help="responses per prompt")
    ap.add_argument("--minibatches", type=int, default=2, help="optimizer updates per step")
    ap.add_argument("--lr", type=float, default=0.05)
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead

    start = time.perf_counter()
    initial = TablePolicy(args.vocab, args.length).expected_reward()
    rows = []
    for method in args.methods:
        for k in args.staleness:
            results = [run(METHODS[method], k, args, args.seed + r) for r in range(args.repeats)]
            mean = {key: statistics.fmean(res[key] for res in results) for key in results[0]}
            rows.append(
                [
                    method,
                    str(k),
                    f"{mean['reward']:.3f}",
                    f"{mean['gn_mean']:.3f}",
                    f"{mean['gn_var']:.2e}",
                    f"{mean['train_frac']:.3f}",
                    "-" if math.isnan(mean["clip_frac"]) else f"{mean['clip_frac']:.3f}",
                ]
            )
    header = ["method", "k", "exp. reward", "grad-norm mean", "grad-norm var", "trained tokens", "clip frac"]
    title = (
        f"MIS-PO toy: {args.steps} steps x {args.minibatches} updates, {args.repeats} seeds, "
        f"expected reward at init {initial:.3f}, max 1.0"
    )
    print_table(rows, header, title)
    print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
