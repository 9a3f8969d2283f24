"""Weight sync learner → vLLM, in place: seconds and MB/s for the tiny and small models.

    .venv/bin/python benchmarks/weight_sync.py [--sizes tiny small] [--repeats 3]

Measures `RolloutGroup.update_weights` (serialise to safetensors, one `ray.put`, every engine loads it
through vLLM's reload_weights + CPU MoE re-prepack) on one rollout actor; best of `--repeats`.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import ray

from rlstack.model import BUILDERS, Step3p5ForCausalLM, init_checkpoint
from rlstack.rollout.config import RolloutConfig
from rlstack.rollout.group import RolloutGroup
from rlstack.rollout.weight_sync import serialize_state_dict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=list(BUILDERS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as path:
            init_checkpoint(BUILDERS[size](), path)
            state = Step3p5ForCausalLM.from_pretrained(path).state_dict()
            start = time.perf_counter()
            payload = serialize_state_dict(state)
            serialize_s = time.perf_counter() - start
            group = RolloutGroup(path, RolloutConfig(kv_cache_mb=128, cpus_per_worker=2))
            runs = [group.update_weights(state, version=v + 1) for v in range(args.repeats)]
            group.shutdown()
        best = min(runs, key=lambda r: r["sync/total_seconds"])
        mb = len(payload) / 2**20
        rows.append((size, mb, serialize_s, best["sync/seconds"], best["sync/total_seconds"]))
    ray.shutdown()
    header = f"{'model':<7}{'MB':>8}{'serialise s':>13}{'engine load s':>15}{'total s':>9}{'MB/s':>8}"
    print("\n" + header)
    for size, mb, ser, load_s, total in rows:
        print(f"{size:<7}{mb:>8.1f}{ser:>13.3f}{load_s:>15.3f}{total:>9.3f}{mb / total:>8.0f}")
    print("(total = serialise + ray.put + engine reload + re-prepack, as the driver pays it)")


if __name__ == "__main__":
    main()
