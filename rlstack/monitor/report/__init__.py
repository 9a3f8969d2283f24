"""The run report (`rlstack report`: one self-contained HTML file) and the live dashboard (`rlstack
dashboard`: the same page served on 127.0.0.1, polling while the run goes).

- `data`: run directories -> one JSON payload (metrics, expert load, log-ratio quantiles, rollouts,
  per-token samples, config summary, warnings).
- `page`: the HTML page (vendored uPlot, report.js and report.css from assets/, the payload inlined).
- `server`: the dashboard's HTTP server (stdlib).
"""

from rlstack.monitor.report.data import ReportError, build_payload
from rlstack.monitor.report.page import render_page, write_report
from rlstack.monitor.report.server import DashboardServer, serve

__all__ = ["DashboardServer", "ReportError", "build_payload", "render_page", "serve", "write_report"]
