"""Screenshots of a run's report for the docs (README, docs/dashboards.md), made in headless Chromium.

    .venv/bin/python scripts/report_screenshots.py RUN_DIR [RUN_DIR ...] --out docs/report.png \\
        [--from top|training|offpolicy|throughput|browser] [--height 2200]

Renders `rlstack report` for the run directories, opens it at 1400 px wide, scrolls to the section named by
--from, expands the newest trajectory with per-token data in the rollout browser, and saves one viewport of
--height pixels as PNG. Fails if the page logged a console error.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from rlstack.monitor.chromium import Chromium
from rlstack.monitor.report import write_report


def main(argv: list[str] | None = None) -> int:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--from", dest="section", default="top")
    parser.add_argument("--height", type=int, default=2200)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, Chromium(width=1400, height=args.height) as browser:
        report = write_report(args.run_dirs, Path(tmp) / "report.html")
        page = browser.open(report.as_uri())
        page.wait_for("window.RLSTACK && window.RLSTACK.ready === true")
        page.eval("window.RLSTACK.browse()")
        if args.section != "top":
            page.eval(f"document.getElementById('sec-{args.section}').scrollIntoView()")
        page.eval("new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))")
        if page.console_errors:
            print(f"console errors: {page.console_errors}", file=sys.stderr)
            return 1
        page.screenshot(args.out, full_page=False)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
