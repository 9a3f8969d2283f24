"""The report page: one self-contained HTML file (chart library, script, style and data inlined)."""

from __future__ import annotations

import html
import json
from importlib import resources
from pathlib import Path
from typing import Any

from rlstack.monitor.report.data import MAX_ROLLOUTS, MAX_TOKENS, build_payload, to_json

ASSETS = ("uPlot.min.css", "report.css", "uPlot.iife.min.js", "report.js")


def asset(name: str) -> str:
    """The text of a file in the package's assets/ (works from a wheel and from a checkout)."""
    return resources.files("rlstack.monitor.report").joinpath("assets", name).read_text(encoding="utf-8")


def render_page(payload: dict[str, Any], live: dict[str, Any] | None = None) -> str:
    """The page for `payload`. `live` ({"refresh_s": s, "data_url": "data.json"}) makes it poll the
    dashboard's data URL and redraw when the runs change."""
    names = ", ".join(run["name"] for run in payload["runs"])
    options = json.dumps({"live": live}).replace("<", "\\u003c")
    css = "\n".join(_safe(asset(n), "style") for n in ASSETS if n.endswith(".css"))
    js = "\n".join(_safe(asset(n), "script") for n in ASSETS if n.endswith(".js"))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>rlstack {"dashboard" if live else "report"}: {html.escape(names)}</title>
<style>
{css}
</style>
</head>
<body>
<div id="app"><p class="loading">Loading the report…</p></div>
<script type="application/json" id="rlstack-options">{options}</script>
<script type="application/json" id="rlstack-data">{to_json(payload)}</script>
<script>
{js}
</script>
</body>
</html>
"""


def write_report(
    run_dirs: list[str | Path],
    out: str | Path,
    max_tokens: int = MAX_TOKENS,
    max_rollouts: int = MAX_ROLLOUTS,
) -> Path:
    """Build the report of `run_dirs` and write it to `out` (one HTML file); returns its path."""
    out = Path(out)
    text = render_page(build_payload(run_dirs, max_tokens, max_rollouts))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out


def _safe(text: str, tag: str) -> str:
    """`text` with no `</tag` in it, so that it cannot end its inline element early."""
    if f"</{tag}" in text.lower():
        raise ValueError(f"asset text holds '</{tag}'; it cannot be inlined")
    return text
