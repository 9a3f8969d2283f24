"""`rlstack model init|check`: fresh policy checkpoints, and vLLM-vs-PyTorch log-prob agreement."""

from __future__ import annotations

import argparse


def cmd_model_init(args: argparse.Namespace) -> int:
    from rlstack.model import BUILDERS, init_checkpoint

    path = init_checkpoint(BUILDERS[args.builder](), args.path, seed=args.seed)
    print(f"wrote a fresh {args.builder} checkpoint to {path}")
    return 0


def cmd_model_check(args: argparse.Namespace) -> int:
    import tempfile

    from rlstack.model import BUILDERS, init_checkpoint
    from rlstack.model.auto import check_architecture
    from rlstack.rollout.parity import check_logprob_parity

    with tempfile.TemporaryDirectory(prefix="rlstack-check-") as tmp:
        path = args.path
        if path is None:
            config = BUILDERS[args.builder]()
            config.initializer_range = 0.2  # peaked distributions make disagreements visible
            path = init_checkpoint(config, tmp)
        arch = check_architecture(path)
        report = check_logprob_parity(path, args.prompts, args.tokens)
    ok = report.max_abs_diff <= args.tolerance
    print(f"\n{'architecture':<32}{arch}")
    print(f"{'sequences':<32}{report.num_sequences}")
    print(f"{'tokens compared':<32}{report.num_tokens}")
    print(f"{'max |logp_vllm - logp_torch|':<32}{report.max_abs_diff:.3g}  (tolerance {args.tolerance:g})")
    print(f"{'mean |diff|':<32}{report.mean_abs_diff:.3g}")
    print(f"{'past the sliding window':<32}{report.sliding_window_exceeded}")
    print(f"{'vLLM generate tokens/s':<32}{report.vllm_tokens_per_s:,.0f}")
    print(f"{'PyTorch forward tokens/s':<32}{report.torch_tokens_per_s:,.0f}")
    print("OK: vLLM and PyTorch agree" if ok else "FAIL: vLLM and PyTorch disagree")
    return 0 if ok else 1
