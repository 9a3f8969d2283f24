"""Weight sync learner → vLLM, in place: bytes, buckets, seconds and MB/s for the tiny and small models.

    .venv/bin/python benchmarks/weight_sync.py [--sizes tiny small] [--repeats 2] [--bucket-mb 64 16]

One rollout actor per model; every row pushes through the object-store backend (rollout.sync): plan
(digests), then per bucket serialise + `ray.put` + the engine's layerwise reload, then the CPU MoE
re-prepack. Rows:

- `one blob`: a single bucket holding the whole model, every tensor sent (the pre-bucketing path);
- `B MB buckets`: every tensor sent, in buckets of at most B MB;
- `unchanged`: changed-only push of weights identical to the last push (digests only, nothing sent);
- `1 layer changed`: changed-only push after one decoder layer changed.

Best of `--repeats`. The machine is shared and small (2 cores): numbers are noisy, compare within a run.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable

import ray

from rlstack.model import BUILDERS, Step3p5ForCausalLM, init_checkpoint
from rlstack.rollout.config import RolloutConfig
from rlstack.rollout.group import RolloutGroup
from rlstack.rollout.sync.object_store import ObjectStoreBackend


def best(repeats: int, push: Callable[[], dict[str, float]]) -> dict[str, float]:
    return min((push() for _ in range(repeats)), key=lambda m: m["sync/seconds"])


def bench_size(size: str, repeats: int, bucket_mbs: list[float]) -> list[tuple[str, dict[str, float]]]:
    rows = []
    with tempfile.TemporaryDirectory() as path:
        init_checkpoint(BUILDERS[size](), path)
        state = Step3p5ForCausalLM.from_pretrained(path).state_dict()
        group = RolloutGroup(path, RolloutConfig(kv_cache_mb=128, cpus_per_worker=2))
        try:
            version = iter(range(1, 10_000))
            one_blob = ObjectStoreBackend(group.workers, bucket_mb=1e6, changed_only=False)
            rows.append(("one blob", best(repeats, lambda: one_blob.push(state, next(version)))))
            for mb in bucket_mbs:
                backend = ObjectStoreBackend(group.workers, bucket_mb=mb, changed_only=False)
                push = lambda b=backend: b.push(state, next(version))  # noqa: E731
                rows.append((f"{mb:g} MB buckets", best(repeats, push)))
            changed_only = ObjectStoreBackend(group.workers, bucket_mb=bucket_mbs[0])
            changed_only.push(state, next(version))
            rows.append(("unchanged", best(repeats, lambda: changed_only.push(state, next(version)))))
            layer = f"model.layers.{BUILDERS[size]().num_hidden_layers // 2}."
            edited = {k: v + 1e-3 if k.startswith(layer) else v for k, v in state.items()}

            def push_edit() -> dict[str, float]:
                changed_only.push(state, next(version))  # untimed: back to the baseline
                return changed_only.push(edited, next(version))

            rows.append(("1 layer changed", best(repeats, push_edit)))
        finally:
            group.shutdown()
    return [(f"{size} {name}", m) for name, m in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=list(BUILDERS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bucket-mb", nargs="+", type=float, default=[64.0, 16.0])
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rows = [row for size in args.sizes for row in bench_size(size, args.repeats, args.bucket_mb)]
    finally:
        ray.shutdown()
    header = f"{'model / push':<26}{'buckets':>8}{'MB sent':>9}{'MB skipped':>11}{'digest s':>10}"
    header += f"{'total s':>9}{'MB/s':>8}"
    print("\n" + header)
    for name, m in rows:
        print(
            f"{name:<26}{m['sync/buckets']:>8.0f}{m['sync/bytes'] / 2**20:>9.1f}"
            f"{m['sync/bytes_skipped'] / 2**20:>11.1f}{m['sync/plan_seconds']:>10.3f}"
            f"{m['sync/seconds']:>9.3f}{m['sync/mb_per_s']:>8.0f}"
        )
    print("(total = digests + per bucket: serialise, ray.put, engine reload; then MoE re-prepack. Noisy:")
    print(" shared 2-core machine, best of --repeats; MB/s counts bytes sent, so 0 when nothing changed)")


if __name__ == "__main__":
    main()
