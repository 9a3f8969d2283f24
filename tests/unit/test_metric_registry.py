"""The metric registry (rlstack/monitor/registry.py): pattern matching, the strict and lenient checks,
docs/metrics.md generated from it, and every metric key rlstack logs registered, both ways: a static scan
of rlstack/'s string literals and f-strings, plus the producers whose keys are built at run time."""

from __future__ import annotations

import ast
import functools
import logging
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from rlstack.monitor import registry
from rlstack.monitor.registry import GROUPS, METRICS, Metric, check, lookup, render_markdown, unknown

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "rlstack"

# ---- matching and checking -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("reward/mean", "reward/mean"),
        ("reward/math", "reward/{label}"),
        ("reward/math_errors", "reward/{label}_errors"),  # the most specific pattern wins
        ("reward/trl.rewards:get_soft_overlong_punishment_timeouts", "reward/{label}_timeouts"),
        ("staleness/hist_3", "staleness/hist_{s}"),
        ("moe/layer12/router_entropy", "moe/layer{layer}/router_entropy"),
        ("moe/load/3/17", "moe/load/{layer}/{expert}"),
        ("eval/greedy_notool_accuracy", "eval/{mode}_accuracy"),
        ("placement", "placement"),
    ],
)
def test_lookup_finds_literal_keys_and_pattern_families(key: str, name: str) -> None:
    found = lookup(key)
    assert found is not None and found.name == name


@pytest.mark.parametrize(
    "key", ["moe/load/3", "moe/load/3/17/1", "reward/a/b", "eval/", "loss", "perf/not_registered"]
)
def test_a_placeholder_is_one_path_segment_and_nothing_else_matches(key: str) -> None:
    assert lookup(key) is None


def test_unknown_lists_the_unregistered_keys_in_order() -> None:
    keys = ["reward/mean", "perf/not_registered", "moe/load/0/1", "loss", "placement"]
    assert unknown(keys) == ["perf/not_registered", "loss"]


def test_strict_mode_raises_naming_every_unregistered_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(registry.STRICT_ENV, "1")
    check(["reward/mean", "time/step"])  # registered: fine
    with pytest.raises(ValueError, match="perf/not_registered, loss") as error:
        check(["reward/mean", "perf/not_registered", "loss"])
    assert registry.REGENERATE in str(error.value)


def test_lenient_mode_warns_once_per_key_and_never_raises(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(registry.STRICT_ENV, raising=False)
    monkeypatch.setattr(registry, "_warned", set())
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        check(["plugin/score", "reward/mean"])
        check(["plugin/score", "plugin/other"])
    warned = [r.getMessage() for r in caplog.records if r.name == registry.__name__]
    assert len(warned) == 2 and "'plugin/score'" in warned[0] and "'plugin/other'" in warned[1]


def test_the_registry_is_well_formed() -> None:
    names = [m.name for m in METRICS]
    assert len(names) == len(set(names)), "a metric is registered twice"
    for m in METRICS:
        assert m.group in GROUPS, f"{m.name}: group {m.group!r} is not in GROUPS"
        assert re.fullmatch(r"[a-z_]+(/[a-z0-9_{}]+)*", m.name), m.name
        assert m.unit and m.meaning.endswith("."), m.name
    assert all(any(m.group == g for m in METRICS) for g in GROUPS), "a group without metrics"


# ---- docs/metrics.md and the command ------------------------------------------------------------------


def test_docs_metrics_md_is_the_generated_one() -> None:
    committed = (REPO / registry.DOC_PATH).read_text()
    assert committed == render_markdown(), f"{registry.DOC_PATH} is stale: run `{registry.REGENERATE}`"


def test_render_has_one_table_per_group_and_every_metric() -> None:
    text = render_markdown()
    assert text.count("| name | unit | meaning |") == len(GROUPS)
    assert all(f"| `{m.name}` | {m.unit} |" in text for m in METRICS)
    assert "logging.sinks" in text and "metrics.jsonl" in text


def test_the_command_prints_and_writes_without_importing_torch(tmp_path: Path) -> None:
    out = tmp_path / "metrics.md"
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['registry', '--write', {str(out)!r}]\n"
        "runpy.run_module('rlstack.monitor.registry', run_name='__main__')\n"
        "assert 'torch' not in sys.modules, 'the registry must not import torch'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert out.read_text() == render_markdown()
    printed = subprocess.run(
        [sys.executable, "-m", "rlstack.monitor.registry"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert printed.returncode == 0 and printed.stdout == render_markdown()


# ---- every metric key in rlstack/ is registered (static scan) ---------------------------------------------

# A metric key's shape: `group/name...`, lowercase; `{}` is an f-string placeholder.
_KEY = re.compile(r"(?:[a-z][a-z0-9_]*|\{\})(?:/[a-z0-9_{}]+)+")
# `f"eval/{k}"`: puts a prefix on keys made elsewhere (checked through their producer, not here).
_PREFIXER = re.compile(r"[a-z][a-z0-9_]*/\{\}")
# Stages of `Trainer.step` (`with timer("generate"):`) become `time/<stage>`.
_TIMER = "timer"

NOT_LOGGED: dict[str, str] = {
    # MetricSums.arrays accumulators; learner.moe.health_metrics turns them into moe/load/* and moe/layer*
    "moe/expert_tokens": "per-layer x per-expert token counts, summed over ranks, never logged as such",
    "moe/entropy_sum": "router-entropy sums, divided into moe/layer{layer}/router_entropy",
    "moe/confidence_sum": "routing-confidence sums, divided into moe/layer{layer}/routing_confidence",
    "moe/real_tokens": "the token count health_metrics divides by",
    # summed counts that learner.step.probe_metrics pops and turns into ratios
    "moe/replay_overridden": "numerator of moe/replay_overrides",
    "moe/replay_decisions": "denominator of moe/replay_overrides",
    "moe/probe_routing_differ": "numerator of moe/routing_mismatch",
    "moe/probe_routing_total": "denominator of moe/routing_mismatch",
    "moe/probe_gap_{}_sum": "numerator of moe/logp_gap_free / _replay",
    "moe/probe_gap_{}_n": "denominator of moe/logp_gap_free / _replay",
    # token-weighted moments that learner.critic.finish_critic_metrics pops
    "critic/_ret": "-> critic/return_mean and critic/explained_var",
    "critic/_ret2": "-> critic/explained_var",
    "critic/_err": "-> critic/explained_var",
    "critic/_err2": "-> critic/explained_var",
}
"""Key-shaped literals in rlstack/ that are not logged metrics (each with the reason)."""

INDIRECT: dict[str, str] = {
    "step": "added to every record by MetricsSink",
    "time": "added to every record by MetricsSink",
    "placement": "Trainer._record_placement logs {'placement': {...}}: no slash, so not a scanned key",
}
"""Registered names whose producer neither the scan nor `runtime_keys` sees (each with the reason)."""


def _group_prefixes() -> set[str]:
    return {m.name.split("/")[0] for m in METRICS if "/" in m.name}


def _parents(tree: ast.AST) -> dict[int, ast.AST]:
    return {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _skipped(tree: ast.AST) -> set[int]:
    """Docstrings (also attribute docstrings), the pieces of f-strings, and operands of `/` (path joins)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            skip.add(id(node.value))
        elif isinstance(node, ast.JoinedStr):
            skip |= {id(part) for part in ast.walk(node) if part is not node}
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            skip |= {id(node.left), id(node.right)}
    return skip


def _in_metric_context(node: ast.AST, parents: dict[int, ast.AST]) -> bool:
    """A dict key, a subscript that is assigned to, or the key argument of a MetricSums / sink call."""
    parent = parents.get(id(node))
    if isinstance(parent, ast.Dict):
        return any(key is node for key in parent.keys)
    if isinstance(parent, ast.DictComp):
        return parent.key is node
    if isinstance(parent, ast.Subscript):
        return parent.slice is node and isinstance(parent.ctx, ast.Store)
    if isinstance(parent, ast.Call) and isinstance(parent.func, ast.Attribute):
        return parent.func.attr in ("add", "add_weighted", "add_array", "log") and any(
            a is node for a in parent.args
        )
    return False


def _scan_source(text: str, name: str) -> list[tuple[str, str]]:
    """(template, where) of every metric-key-shaped string in one module (f-string placeholders as `{}`),
    and `time/<stage>` for every `timer("<stage>")`. A key of a registered group counts wherever it appears;
    one of another group, or starting with a placeholder (`f"{prefix}/lr"`), only in a metric context (a
    dict key, `metrics[...] = `, `stats.add(...)`, `sink.log(...)`), so paths and labels are ignored."""
    prefixes = _group_prefixes()
    tree = ast.parse(text, filename=name)
    skip, parents = _skipped(tree), _parents(tree)
    found: list[tuple[str, str]] = []
    for node in ast.walk(tree):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == _TIMER
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            found.append((f"time/{node.args[0].value}", where))
        if id(node) in skip:
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            template = node.value
        elif isinstance(node, ast.JoinedStr):
            template = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        else:
            continue
        if not _KEY.fullmatch(template) or not re.search("[a-z]", template.replace("{}", "")):
            continue
        first = template.split("/")[0]
        if first in prefixes or _in_metric_context(node, parents):
            found.append((template, where))
    return found


@functools.cache
def _scan() -> tuple[tuple[str, str], ...]:
    """`_scan_source` over every module of rlstack/ but the registry itself."""
    found: list[tuple[str, str]] = []
    for path in sorted(SOURCE.rglob("*.py")):
        if path != SOURCE / "monitor" / "registry.py":
            found += _scan_source(path.read_text(), str(path.relative_to(REPO)))
    return tuple(found)


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile(".+".join(re.escape(part) for part in template.split("{}")))


def _registered(template: str) -> bool:
    """A literal key: registered as exactly that name. A template: some registered name fits it."""
    if "{}" not in template:
        found = lookup(template)
        return found is not None and not found.is_pattern
    rx = _template_regex(template)
    return any(rx.fullmatch(m.name) for m in METRICS)


def test_the_scan_sees_the_metric_producers() -> None:
    """Guards the scan itself: it must keep finding keys of every kind in the code."""
    templates = {t for t, _ in _scan()}
    for expected in (
        "sync/bytes",
        "reward/{}_errors",
        "moe/layer{}/max_violation",
        "{}/grad_norm",
        "staleness/hist_{}",
        "time/generate",
        "time/{}",
        "eval/{}",
    ):
        assert expected in templates, f"the scan no longer finds {expected!r}"
    assert len(templates) > 60


_EXAMPLE = '''
def step(run_dir, metrics, stats, timer):
    """reward/in_a_docstring"""
    metrics["perf/not_registered"] = 0.4
    metrics |= {"actor/new_thing": 1.0, "reward/mean": 0.5}
    stats.add(f"moe/layer{3}/new_health", 1.0)
    with timer("new_stage"):
        pass
    tokens = run_dir / "samples/tokens"
    kind = {"html": "text/plain"}
    seed = f"rlstack/{run_dir}/seed"
    logs = f"{run_dir}/logs"
    return {"time/step": 1.0}
'''


def test_the_scan_catches_new_metrics_and_ignores_paths_and_labels() -> None:
    found = sorted(t for t, _ in _scan_source(_EXAMPLE, "example.py"))
    new = ["actor/new_thing", "moe/layer{}/new_health", "perf/not_registered", "time/new_stage"]
    assert found == sorted([*new, "reward/mean", "time/step"])
    assert [t for t in found if not _registered(t)] == new


def test_every_metric_key_in_the_source_is_registered() -> None:
    missing = [
        f"{where}: {template}"
        for template, where in _scan()
        if template not in NOT_LOGGED and not _registered(template)
    ]
    assert not missing, (
        "metric keys not in rlstack/monitor/registry.py (register them with unit and meaning, then run "
        f"`{registry.REGENERATE}`; or, if the string is no logged metric, add it to NOT_LOGGED in "
        f"{Path(__file__).name} with the reason):\n" + "\n".join(missing)
    )


def test_the_not_logged_exclusions_are_still_in_the_code() -> None:
    templates = {t for t, _ in _scan()}
    assert not set(NOT_LOGGED) - templates, "stale NOT_LOGGED entries: remove them"
    assert not [t for t in NOT_LOGGED if _registered(t) and "{}" not in t], "registered AND excluded"


# ---- keys built at run time -------------------------------------------------------------------------


def _episode_rollouts() -> list[Any]:
    from rlstack.types import EpisodeInfo, Rollout

    info = EpisodeInfo(turns=2, tool_calls=1, tool_errors=0, tool_timeouts=0, tool_seconds=0.5)
    return [
        Rollout("p", [1], [2, 3, 4], [-1.0] * 3, "stop", 0, response_mask=[1, 0, 1], episode=info),
        Rollout("q", [1], [2, 3], [-1.0] * 2, "length", 0, episode=EpisodeInfo(turns=1)),
    ]


def _eval_keys(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """`evaluate.accuracy` with an `env:` (every mode), generator, prompts and scorer stubbed; the driver
    logs its keys under `eval/`."""
    import rlstack.data.prompts
    import rlstack.envs.registry
    import rlstack.evaluate

    rollouts = _episode_rollouts()
    monkeypatch.setattr(rlstack.data.prompts, "rollout_prompt", lambda *args: args[2])
    monkeypatch.setattr(rlstack.envs.registry, "env_tool_schemas", lambda config: [])
    scores = SimpleNamespace(per_reward={"math": [1.0, None]})
    monkeypatch.setattr(rlstack.evaluate, "score_rollouts", lambda rewards, found: scores)
    generator = SimpleNamespace(generate=lambda prompts, sampling, tools: rollouts)
    cfg: Any = SimpleNamespace(
        env=object(),
        data=SimpleNamespace(chat_template=None),
        rollout=SimpleNamespace(sampling=SimpleNamespace(max_tokens=8)),
        eval=SimpleNamespace(samples=2, temperature=1.0),
        trainer=SimpleNamespace(seed=0),
        rewards=[SimpleNamespace(label="math")],
    )
    rows = [{"prompt_id": "a"}, {"prompt_id": "b"}]
    out = rlstack.evaluate.accuracy(generator, None, None, rows, cfg)  # type: ignore[arg-type]
    return {f"eval/{k}" for k in out}


def _learner_keys() -> set[str]:
    """Expert health of two MoE layers, the routing probe, and every policy loss with KL and TIS."""
    from rlstack.learner.moe import health_metrics
    from rlstack.learner.step import probe_metrics
    from rlstack.mispo import AlgorithmConfig, compute_policy_loss
    from rlstack.mispo.registry import policy_loss_names

    f64 = torch.float64
    arrays = {
        "moe/expert_tokens": torch.tensor([[3.0, 0.0, 1.0], [1.0, 1.0, 2.0]], dtype=f64),
        "moe/entropy_sum": torch.tensor([1.0, 2.0], dtype=f64),
        "moe/confidence_sum": torch.tensor([0.5, 0.6], dtype=f64),
        "moe/real_tokens": torch.tensor([4.0], dtype=f64),
    }
    keys = set(health_metrics(arrays, [1, 3]))
    probe = ("replay_overridden", "replay_decisions", "probe_routing_differ", "probe_routing_total")
    sums = {f"moe/{k}": 1.0 for k in probe}
    sums |= {f"moe/probe_gap_{s}_{p}": 1.0 for s in ("free", "replay") for p in ("sum", "n")}
    keys |= set(probe_metrics(sums))
    logp = torch.full((2, 3), -1.0, requires_grad=True)
    old = torch.full((2, 3), -1.0)
    mask = torch.ones(2, 3)
    for name in policy_loss_names():
        tis = {"tis_cap": 2.0} if name in ("ppo", "grpo") else {}
        cfg = AlgorithmConfig(name=name, kl_coef=0.1, **tis)
        _, metrics = compute_policy_loss(
            cfg, logp, old, old, torch.ones(2), mask, 6.0, ref_logp=old, entropy=torch.ones(2, 3)
        )
        keys |= set(metrics)
    return keys


@pytest.fixture(scope="module")
def runtime_keys() -> set[str]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        from rlstack.rollout.multiturn import episode_metrics

        keys = set(episode_metrics(_episode_rollouts())) | _eval_keys(monkeypatch) | _learner_keys()
    return keys


def test_keys_built_at_run_time_are_registered(runtime_keys: set[str]) -> None:
    assert {"env/tool_call_rate", "eval/greedy_notool_accuracy", "moe/load/3/2"} <= runtime_keys
    assert unknown(sorted(runtime_keys)) == []


def test_every_registered_metric_is_logged_by_the_code(runtime_keys: set[str]) -> None:
    """The reverse: nothing registered that the code no longer logs. `f"eval/{k}"` and the like, which
    may only put a prefix on keys made elsewhere, produce just a family of exactly their shape
    (`f"reward/{label}"`: `reward/{label}`)."""
    scanned = {t for t, _ in _scan() if t not in NOT_LOGGED}
    templates = {t for t in scanned if not _PREFIXER.fullmatch(t)}

    def produced(m: Metric) -> bool:
        if m.name in templates or re.sub(r"\{[a-z_]+\}", "{}", m.name) in scanned:
            return True
        if any(lookup(k) is m for k in runtime_keys):
            return True
        return any("{}" in t and _template_regex(t).fullmatch(m.name) for t in templates)

    stale = [m.name for m in METRICS if m.name not in INDIRECT and not produced(m)]
    assert not stale, (
        f"registered but logged nowhere (remove them, then run `{registry.REGENERATE}`): {stale}"
    )
