"""How near each precision ran to this device's limit, over a study's measured windows.

Every window of ``energy_repeats.csv`` carries its useful GFLOP, its achieved GFLOP/s and that rate
over the throughput probe's for its precision (``limit_share``; measure/flops.py, measure/throughput.py).
Per precision this takes the median over the windows of the phases asked for (by default the
inference phase: every base and adapter config's evaluation), over all of them and apart for
scoring (prefill: the multiple-choice tasks) and generation (decoding, one token per step: far
from a matmul's rate by its nature). The report's "Precisions on this device" and
``benchmarks/study_profile.py`` read it.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

GENERATION_TASKS: tuple[str, ...] = ("rca_resolution",)
LIMIT_COLUMNS: tuple[str, ...] = ("precision", "windows", "probe_gflop_per_s", "gflop_per_s", "limit_share",
                                  "scoring_limit_share", "generation_limit_share")


def precision_limits(energy: pd.DataFrame, repeats: pd.DataFrame,
                     phases: Sequence[str] = ("inference",)) -> pd.DataFrame:
    """One row per precision (LIMIT_COLUMNS): its windows with a counted rate, the probe's GFLOP/s,
    and the medians of the windows' GFLOP/s and limit_share (all, scoring, generation). Empty for a
    study written before the windows carried their work."""
    if (energy.empty or repeats.empty or "gflop_per_s" not in repeats.columns
            or "precision" not in energy.columns):
        return pd.DataFrame(columns=list(LIMIT_COLUMNS))
    keys = ["config_id", "phase", "task"]
    probe = energy["probe_gflop_per_s"] if "probe_gflop_per_s" in energy.columns else float("nan")
    configs = energy.assign(probe_gflop_per_s=probe)[[*keys, "precision", "probe_gflop_per_s"]]
    measured = repeats[repeats["phase"].isin(phases)]
    windows = measured.astype({k: str for k in keys}).merge(configs.astype({k: str for k in keys}), on=keys)
    windows = windows[pd.to_numeric(windows["gflop_per_s"], errors="coerce").notna()]
    rows = []
    for precision, group in windows.groupby("precision", sort=False):
        share = pd.to_numeric(group["limit_share"], errors="coerce")
        generation = group["task"].isin(GENERATION_TASKS)
        rows.append({"precision": precision, "windows": len(group),
                     "probe_gflop_per_s": pd.to_numeric(group["probe_gflop_per_s"], errors="coerce").median(),
                     "gflop_per_s": pd.to_numeric(group["gflop_per_s"], errors="coerce").median(),
                     "limit_share": share.median(), "scoring_limit_share": share[~generation].median(),
                     "generation_limit_share": share[generation].median()})
    return pd.DataFrame(rows, columns=list(LIMIT_COLUMNS))
