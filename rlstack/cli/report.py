"""`rlstack report`, `rlstack dashboard`: the HTML report of runs, written or served live."""

from __future__ import annotations

import argparse
import sys


def add_report_budgets(p: argparse.ArgumentParser) -> None:
    from rlstack.monitor.report.data import MAX_ROLLOUTS, MAX_TOKENS

    p.add_argument(
        "--max-tokens",
        type=int,
        default=MAX_TOKENS,
        help=f"per-token samples to include, in tokens (default {MAX_TOKENS:,}; steps spread over the run)",
    )
    p.add_argument(
        "--max-rollouts",
        type=int,
        default=MAX_ROLLOUTS,
        help=f"rollout records to include (default {MAX_ROLLOUTS:,}; steps spread over the run)",
    )


def cmd_report(args: argparse.Namespace) -> int:
    from rlstack.monitor.report import ReportError, write_report

    try:
        path = write_report(args.run_dirs, args.out, args.max_tokens, args.max_rollouts)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from rlstack.monitor.report import DashboardServer, ReportError

    try:
        server = DashboardServer(
            args.run_dirs, args.host, args.port, args.refresh_s, args.max_tokens, args.max_rollouts
        )
    except (ReportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"dashboard of {', '.join(args.run_dirs)}: {server.url}  (Ctrl-C stops it)", flush=True)
    server.start().wait()
    print("dashboard stopped")
    return 0
