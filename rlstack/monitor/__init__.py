"""Watching a run: where metrics go (sinks), the metric registry, progress lines, the per-token samples,
and the run report / live dashboard (`rlstack report`, `rlstack dashboard`)."""
