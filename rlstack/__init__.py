"""rlstack: RL post-training for Mixture-of-Experts LMs (vLLM rollouts, DeepSpeed learners, MIS-PO, Ray)."""

__version__ = "0.1.0"
