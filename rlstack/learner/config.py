"""Typed configuration of the learner: data-parallel ranks, ZeRO stage, optimizer, micro-batching, critic.

Imports pydantic only (no torch, no DeepSpeed), so a run config validates before anything heavy loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from rlstack.config_base import StrictModel

if TYPE_CHECKING:
    from rlstack.learner.micro import MicroSplit

DEFAULT_LOGPROB_CHUNK_TOKENS = 2048
"""Default of `learner.logprob_chunk_tokens` (and of rlstack.learner.logprobs before a worker sets it)."""


class CriticConfig(StrictModel):
    """The value model of the actor-critic variant (`algorithm.advantage: critic`, docs/algorithm.md): the
    policy checkpoint's trunk plus a fresh scalar head, trained with a masked MSE as a second DeepSpeed
    engine on every learner rank. It shares the learner's ZeRO stage, ranks, micro-batching, mini-batches
    and AdamW settings (betas, eps, weight decay, clipping); only the learning rate is its own."""

    enabled: bool = False
    """Build and train the critic. `LearnerGroup.compute_values` and the `returns` of `train_step` need it."""

    lr: float | None = Field(None, gt=0.0)
    """AdamW peak learning rate of the critic (same schedule as the policy); None uses `learner.lr`."""

    model_path: str | None = Field(None, min_length=1)
    """Checkpoint whose trunk (a causal LM without its LM head) starts the critic; None = the policy
    checkpoint the learner loads. The scalar value head is always fresh (std 1 / (hidden + 1), zero bias)."""

    head_seed: int = 0
    """Seed of the value head's initialisation (the same on every rank)."""

    @model_validator(mode="after")
    def _check(self) -> CriticConfig:
        stray = [name for name in ("lr", "model_path") if getattr(self, name) is not None]
        if stray and not self.enabled:
            keys = ", ".join(f"learner.critic.{name}" for name in stray)
            raise ValueError(
                f"{keys} set but learner.critic.enabled is false: set learner.critic.enabled: true "
                "(algorithm.advantage: critic needs it) or drop those keys"
            )
        return self


class MoEConfig(StrictModel):
    """Mixture-of-Experts stability: load balancing and routing diagnostics (docs/moe.md)."""

    balance_coef: float = Field(0.0, ge=0.0)
    """Weight of the EP-group balanced routing loss (Step 3.5 Flash): G * sum_g f_g * P_g over the
    `balance_groups` groups of experts, f_g the share of routed slots the group received and P_g its share of
    the router's normalised scores, averaged over MoE layers; 1 at perfect balance. 0 = off (RL default)."""

    balance_groups: int | None = Field(None, ge=1)
    """Expert groups of the balancing loss (an expert-parallel group each); they must divide the number of
    experts. None = one group per expert: the plain load-balance loss."""

    bias_update_rate: float = Field(0.0, ge=0.0)
    """Auxiliary-loss-free balancing: after each optimizer step every MoE layer's router selection bias moves
    by this much toward balance, b_e += rate * sign(mean load - load_e) over the mini-batch's real tokens.
    The bias steers which experts are chosen, never their weights; it is saved in checkpoints and pushed to
    the engines with the weights. 0 = off (RL default; pre-training used ~1e-3)."""

    probe_every: int = Field(10, ge=0)
    """Every this many train steps, one extra no-grad forward measures routing mismatch and the log-prob gap
    to the rollout engine with routing replay flipped (on when `routing_replay` is off, and vice versa). The
    rollout engines record routing for it. 0 = never (and no recording unless `routing_replay: rollout`)."""


class LoRAConfig(StrictModel):
    """Low-rank adapters (PEFT) on the policy: only the adapters train; the base weights stay frozen, and the
    rollout engines receive merged weights (docs/models.md)."""

    r: int = Field(8, ge=1)
    """Rank of each adapter."""

    alpha: float = Field(16.0, gt=0.0)
    """Scaling numerator: an adapter's update is (alpha / r) * B @ A."""

    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapters' input during training. Keep 0 for RL: the learner's log-probs must be those of
    the merged weights the engines sample with, or every token ratio carries dropout noise."""

    target_modules: list[str] | str = "all-linear"
    """Modules that get adapters: names as PEFT matches them (e.g. [q_proj, k_proj, v_proj, o_proj]), or
    `all-linear` (every linear layer but the LM head)."""


class LearnerConfig(StrictModel):
    """How the policy is trained: DeepSpeed ZeRO over `num_ranks` Ray actors, AdamW, micro-batching."""

    num_ranks: int = Field(1, ge=1)
    """Data-parallel learner ranks (one Ray actor each). Results equal one rank up to float rounding:
    the loss normaliser is global and gradients are summed exactly over ranks."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage: 0 = plain data parallel, 1 = shard optimizer state, 2 = + gradients,
    3 = + parameters (gathered on the fly; MoE blocks are gathered whole)."""

    lr: float = Field(3e-4, gt=0.0)
    """AdamW peak learning rate (after warm-up; see `lr_schedule`)."""

    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning rate after warm-up: `constant`, or decayed to `lr * min_lr_ratio` at optimizer step
    `lr_decay_steps`, linearly or along a half cosine (rlstack.learner.schedule). The optimizer-step
    counter is checkpointed, so a resumed run continues the schedule exactly."""

    warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warm-up: step s < warmup_steps uses lr * (s + 1) / warmup_steps."""

    lr_decay_steps: int | None = Field(None, ge=1)
    """Optimizer step at which the decay reaches `lr * min_lr_ratio`; None = `trainer.steps *
    n_minibatches` (the whole run), filled in by the run config."""

    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    """Where `linear` and `cosine` decay end, as a fraction of `lr`."""

    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW decoupled weight decay, applied to matrices only (norm weights and vectors are exempt)."""

    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (beta1, beta2)."""

    adam_eps: float = Field(1e-8, gt=0.0)
    """AdamW epsilon. Adam's first steps move each weight by about lr * g / (|g| + eps), so weights whose
    gradient is near 0 move by rounding noise; a larger eps (1e-6) damps that where runs must match."""

    grad_clip: float = Field(1.0, ge=0.0)
    """Clip the global gradient 2-norm of each optimizer step to this value; 0 disables clipping."""

    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype of the learner's model; 'bfloat16' also turns on DeepSpeed's bf16 mode (fp32 master
    weights in the optimizer). Log-probs are computed in fp32 from the logits either way."""

    micro_batch_size: int = Field(8, ge=1)
    """Rows (sequences) per forward/backward pass on one rank; gradients accumulate across micro-batches."""

    micro_batch_tokens: int | None = Field(None, ge=1)
    """Cut micro-batches by tokens instead of rows (verl's dynamic batch size): each forward/backward holds
    as many rows as fit this many real (prompt + response) tokens, binned longest first; a longer row runs
    alone. Long-tailed lengths then cost what their tokens cost: short responses share a forward, a long one
    does not drag a whole row-count micro-batch with it. None: `micro_batch_size` rows each. Same update
    either way (the loss is normalised over the whole mini-batch), to float rounding."""

    n_minibatches: int = Field(1, ge=1)
    """Optimizer steps per `train_step`: the step's batch is split into this many mini-batches, each
    normalised on its own (docs/algorithm.md, "One step")."""

    fuse_old_logp: bool = True
    """Take pi_old from the training forward instead of a separate forward pass over the batch, where that
    is exact: `n_minibatches` 1 (no optimizer step has run when it is read) and `algorithm.traj_filter`
    `fixed` or `off` (then computed per micro-batch). Saves a forward pass, about a quarter of the learner's
    compute. False always runs the separate pass; where it would not be exact, the pass runs anyway."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend: `gloo` on CPU, `nccl` on GPU; `auto` picks nccl when the Ray cluster has
    GPUs (one per rank) and gloo otherwise."""

    seed: int = 0
    """Seed of each rank's torch/numpy/python RNGs (rank r uses seed + r)."""

    cpus_per_rank: float = Field(1.0, gt=0.0)
    """Ray CPUs reserved per learner actor (fractional is allowed, e.g. 0.5 to share a core in tests)."""
    ray_resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each learner actor needs, e.g. `{learner_node: 1}`: places the ranks on the
    nodes started with them (`ray start --resources='{"learner_node": 8}'`). Empty: anywhere."""

    num_threads: int | None = Field(None, ge=1)
    """torch threads per learner actor on CPU; None = floor(cpus_per_rank), at least 1. In sync mode the
    learner and the rollout engines take turns, so the learner can use every core of its node (a 2-core
    machine: 2) though it reserves fewer Ray CPUs; in async mode they run at once and more threads than
    reserved CPUs make the two fight over cores."""

    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them (activation
    checkpointing): activation memory falls from every layer's to about one layer's, for ~1/3 more compute."""

    logprob_chunk_tokens: int = Field(DEFAULT_LOGPROB_CHUNK_TOKENS, ge=0)
    """Positions (rows x sequence positions of a micro-batch) whose vocabulary-sized logits exist at once when
    the learner scores tokens. Above it, the LM head, log-softmax and entropy run chunk by chunk along the
    sequence, each chunk recomputed in the backward pass (activation checkpointing), so logit memory is about
    this many x vocabulary x a few fp32 copies instead of micro_batch_size x sequence x vocabulary: what
    bounds the learner's memory on long responses. Costs about one more LM-head forward per training step;
    results equal unchunked scoring to float rounding. A micro-batch with at most this many scored positions
    runs unchunked, and so does ZeRO-3 with LoRA adapters on lm_head itself (a warning says so). 0 = never
    chunk."""

    pack_sequences: bool = True
    """The learner's forwards lay each micro-batch's sequences end to end (first-fit into rows no longer than
    its longest sequence, positions restarting per sequence, attention kept within each sequence) instead of
    padding every row to the longest: compute on padding drops to the row ends. Log-probs, entropy, routing
    and gradients equal the padded forward's to float rounding (rlstack.learner.packing). Needs a model that
    reads transformers' packed format (position ids without an attention mask): ours and transformers'
    own attention implementations do."""

    skip_zero_signal: bool = True
    """Rows without learning signal (every trainable token has advantage 0, no KL term: e.g. a group whose
    samples all got the same reward) run no backward pass, and with pi_old already computed no forward
    either; their gradient is exactly 0, so the update is unchanged (docs/algorithm.md, "Rows without
    signal"). Not on MoE balancing-loss/router-bias runs, probe steps or with dropout, where those rows still
    shape the update. False runs every row."""

    offload_optimizer: bool = False
    """ZeRO optimizer offload: AdamW states and fp32 master weights live in host memory and the update runs on
    the CPU (DeepSpeed `offload_optimizer: cpu`, stage >= 1). For GPU runs whose optimizer state does not fit
    the GPUs; on a CPU-only learner everything already lives in host memory, so it changes nothing there."""

    lora: LoRAConfig | None = None
    """Train low-rank adapters instead of the full policy (None = full fine-tuning)."""

    routing_replay: Literal["off", "rollout", "old"] = "off"
    """MoE routing replay in the training forward: `rollout` (R3) uses, per token and MoE layer, the experts
    the rollout engine chose (recorded by the engines); `old` (R2) those of the learner's own pi_old forward;
    `off` lets the router choose. Replayed experts keep gate weights from the live router scores, so the
    router still learns. Prompt and tool tokens replay too (the engine routed them at prefill); a response's
    last token, never fed to the engine, routes freely (its hidden state scores nothing). docs/moe.md."""

    moe: MoEConfig = MoEConfig()
    """MoE load balancing and routing diagnostics."""

    critic: CriticConfig = CriticConfig()
    """Value model for critic advantages (off by default: group advantages need none)."""

    @property
    def micro_split(self) -> MicroSplit:
        """How each rank cuts its rows into micro-batches (`micro_batch_size` / `micro_batch_tokens`)."""
        from rlstack.learner.micro import MicroSplit  # torch: not needed to load a config

        return MicroSplit(rows=self.micro_batch_size, tokens=self.micro_batch_tokens)

    @property
    def critic_lr(self) -> float:
        """The critic's learning rate: `critic.lr`, or `lr` when that is unset."""
        return self.lr if self.critic.lr is None else self.critic.lr

    @model_validator(mode="after")
    def _check(self) -> LearnerConfig:
        b1, b2 = self.betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"learner.betas = ({b1}, {b2}): both must be in [0, 1), e.g. [0.9, 0.95]")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError(
                "learner.offload_optimizer needs ZeRO stage >= 1 (the offloaded optimizer is ZeRO's); set "
                "learner.zero_stage: 1, 2 or 3"
            )
        if self.lr_decay_steps is not None and self.lr_decay_steps <= self.warmup_steps:
            raise ValueError(
                f"learner.lr_decay_steps = {self.lr_decay_steps} must exceed warmup_steps = "
                f"{self.warmup_steps} (decay starts after warm-up)"
            )
        return self
