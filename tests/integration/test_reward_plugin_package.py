"""A third-party reward plugin, pip-installed from a package with an `rlstack.rewards` entry point, is used
by name from a YAML config and scored by the reward-worker actors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlstack.config import load_config
from rlstack.rewards.group import RewardGroup

pytestmark = [pytest.mark.ray]


def build_and_install(tmp_path: Path) -> Path:
    src = tmp_path / "acme-polite-rewards"
    (src / "acme_polite_rewards").mkdir(parents=True)
    (src / "acme_polite_rewards" / "__init__.py").write_text(
        textwrap.dedent(
            """
            def politeness(prompts, completions, bonus=1.0, **kwargs):
                return [bonus if "please" in c else 0.0 for c in completions]
            """
        )
    )
    (src / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [build-system]
            requires = ["setuptools"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "acme-polite-rewards"
            version = "0.1.0"

            [project.entry-points."rlstack.rewards"]
            politeness = "acme_polite_rewards:politeness"
            """
        )
    )
    target = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run([*cmd, "--target", str(target), str(src)], check=True, capture_output=True)
    assert (target / "acme_polite_rewards-0.1.0.dist-info" / "entry_points.txt").exists()
    return target


def test_installed_entry_point_plugin_is_used_by_name_from_yaml(tmp_path: Path) -> None:
    import ray

    site = build_and_install(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(
        textwrap.dedent(
            """
            rewards:
              - {name: politeness, weight: 2.0, options: {bonus: 0.5}}
            reward_workers: {num_workers: 1}
            """
        )
    )
    cfg = load_config(config)
    sys.path.insert(0, str(site))
    ray.init(
        num_cpus=1,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(site)}},
    )
    try:
        group = RewardGroup(cfg.rewards, cfg.reward_workers)
        try:
            out = group(["p", "p"], ["please add", "add"])
        finally:
            group.shutdown()
    finally:
        ray.shutdown()
        sys.path.remove(str(site))
        sys.modules.pop("acme_polite_rewards", None)
    assert out.per_reward["politeness"] == [0.5, 0.0]
    assert out.total == [1.0, 0.0]
