"""The study's tables and drift figure, from ``{study.out_dir}/runs/*/metrics.json`` (pipeline/study.py).

* main table: per metric, the base, SFT and SOAR as mean ± std over seeds, and SOAR − SFT with its
  Welch interval; the verdict says which is better only when the interval excludes 0 (drift: lower
  is better, every reward: higher);
* GRPO table: per metric, GRPO as mean ± std over seeds, GRPO − base with its one-sample t interval
  (the base is one exact value) and GRPO − SOAR with its Welch interval, each with its verdict;
* steps table: the final metrics at each ``study.sampling_steps`` (mean over seeds);
* sweep table: SOAR at each lambda_aux x trajectory_length (seed ``study.seeds[0]``);
* ``drift.png``: drift D(k) per starting sigma, base and the seed means ± std of SFT and SOAR.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pipeline.study_stats import Difference, shift_from, summarize, welch_difference

LOWER_IS_BETTER = ("drift",)  # metric name prefixes where smaller is better
DRIFT = re.compile(r"drift/s(?P<sigma>[0-9.]+)/k(?P<k>\d+)$")


def read_runs(folder: Path, names: Sequence[str]) -> dict[str, dict]:
    """``metrics.json`` of every run in ``names``; a missing one is an error naming its file."""
    out = {}
    for name in names:
        path = Path(folder) / name / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"study run {name!r} has no results: {path} (run `dvc repro study/dvc.yaml`)")
        out[name] = json.loads(path.read_text())
    return out


def headline_metrics(metrics: Mapping[str, float], max_k: int) -> list[str]:
    """The metrics of the main table: the scorers' (no step prefix) and the mean drift at k = 1, K/2, K."""
    keys = [k for k in metrics if not k.startswith(("steps", "drift"))]
    ks = sorted({1, max(1, max_k // 2), max_k})
    return sorted(keys) + [f"drift/mean/k{k}" for k in ks if f"drift/mean/k{k}" in metrics]


def verdict(metric: str, d: Difference, name: str = "SOAR") -> str:
    """Plain words for the interval of ``metric``'s difference ``name`` − other (SOAR − SFT by default)."""
    if not d.excludes_zero:
        return "no clear difference"
    higher = d.low > 0
    lower_better = metric.startswith(LOWER_IS_BETTER)
    return f"{name} better" if higher != lower_better else f"{name} worse"


def fmt(x: float) -> str:
    return "nan" if np.isnan(x) else f"{x:.4f}"


def main_table(base: Mapping[str, float], sft: Sequence[Mapping], soar: Sequence[Mapping], metrics: Sequence[str],
               confidence: float) -> tuple[str, list[dict]]:
    """Markdown table and rows (for JSON/MLflow) of SFT vs SOAR over seeds."""
    pct = round(confidence * 100)
    lines = [f"| metric | base | SFT (mean ± std) | SOAR (mean ± std) | SOAR − SFT [{pct}% CI, Welch] | verdict |",
             "|---|---|---|---|---|---|"]
    rows = []
    for m in metrics:
        a, b = [r[m] for r in sft], [r[m] for r in soar]
        sa, sb, d = summarize(a), summarize(b), welch_difference(a, b, confidence)
        rows.append({"metric": m, "base": base.get(m, float("nan")), "sft_mean": sa.mean, "sft_std": sa.std,
                     "soar_mean": sb.mean, "soar_std": sb.std, "diff": d.diff, "low": d.low, "high": d.high,
                     "dof": d.dof, "n_sft": sa.n, "n_soar": sb.n, "verdict": verdict(m, d)})
        interval = f"{d.diff:+.4f} [{d.low:+.4f}, {d.high:+.4f}]"
        lines.append(f"| {m} | {fmt(base.get(m, float('nan')))} | {fmt(sa.mean)} ± {fmt(sa.std)} | "
                     f"{fmt(sb.mean)} ± {fmt(sb.std)} | {interval} | {verdict(m, d)} |")
    return "\n".join(lines), rows


def grpo_table(base: Mapping[str, float], soar: Sequence[Mapping], grpo: Sequence[Mapping], metrics: Sequence[str],
               confidence: float) -> tuple[str, list[dict]]:
    """Markdown table and rows of GRPO over seeds: its shift from the base (one-sample t) and from SOAR (Welch)."""
    pct = round(confidence * 100)
    lines = [f"| metric | base | GRPO (mean ± std) | GRPO − base [{pct}% CI, t] | verdict | "
             f"GRPO − SOAR [{pct}% CI, Welch] | verdict |", "|---|---|---|---|---|---|---|"]
    rows = []
    for m in [m for m in metrics if m in base]:
        g = [r[m] for r in grpo]
        sg, up, vs = summarize(g), shift_from(g, base[m], confidence), welch_difference([r[m] for r in soar], g,
                                                                                      confidence)
        said = {"verdict_base": verdict(m, up, "GRPO"), "verdict_soar": verdict(m, vs, "GRPO")}
        rows.append({"metric": m, "base": base[m], "grpo_mean": sg.mean, "grpo_std": sg.std, "n_grpo": sg.n,
                     "grpo_minus_base": up.diff, "grpo_minus_base_low": up.low, "grpo_minus_base_high": up.high,
                     "grpo_minus_soar": vs.diff, "grpo_minus_soar_low": vs.low, "grpo_minus_soar_high": vs.high,
                     **said})
        lines.append(f"| {m} | {fmt(base[m])} | {fmt(sg.mean)} ± {fmt(sg.std)} | "
                     f"{up.diff:+.4f} [{up.low:+.4f}, {up.high:+.4f}] | {said['verdict_base']} | "
                     f"{vs.diff:+.4f} [{vs.low:+.4f}, {vs.high:+.4f}] | {said['verdict_soar']} |")
    return "\n".join(lines), rows


def steps_table(base: Mapping[str, float], groups: Mapping[str, Sequence[Mapping]], metrics: Sequence[str],
                steps: Sequence[int], default_steps: int) -> str:
    """Final metrics vs number of sampling steps: the base and the seed means of each of ``groups`` (name -> runs)."""
    def key(m: str, n: int) -> str:
        return m if n == default_steps else f"steps{n}/{m}"

    lines = ["| metric | steps | base | " + " | ".join(groups) + " |", "|---" * (len(groups) + 3) + "|"]
    for m in metrics:
        for n in sorted(steps):
            means = [float(np.mean([r[key(m, n)] for r in group])) for group in groups.values()]
            vals = [base.get(key(m, n), float("nan")), *means]
            lines.append(f"| {m} | {n} | " + " | ".join(fmt(v) for v in vals) + " |")
    return "\n".join(lines)


def sweep_table(cells: Mapping[tuple[float, int], Mapping[str, float]], metric: str) -> str:
    """``metric`` of SOAR for each (lambda_aux, trajectory_length): rows lambda_aux, columns trajectory_length."""
    lams = sorted({lam for lam, _ in cells})
    ts = sorted({t for _, t in cells})
    lines = [f"| {metric}: lambda_aux \\ trajectory_length | " + " | ".join(str(t) for t in ts) + " |",
             "|---" * (len(ts) + 1) + "|"]
    for lam in lams:
        lines.append(f"| {lam} | " + " | ".join(fmt(cells[(lam, t)][metric]) for t in ts) + " |")
    return "\n".join(lines)


def drift_series(metrics: Mapping[str, float]) -> dict[float, dict[int, float]]:
    """``{sigma: {k: D}}`` from ``drift/s{sigma}/k{k}`` metrics."""
    out: dict[float, dict[int, float]] = {}
    for key, value in metrics.items():
        m = DRIFT.match(key)
        if m:
            out.setdefault(float(m["sigma"]), {})[int(m["k"])] = value
    return out


def drift_figure(path: Path, base: Mapping[str, float], groups: Mapping[str, Sequence[Mapping]]) -> None:
    """One panel per starting sigma: D(k) of the base and mean ± std over seeds of each group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = drift_series(base)
    sigmas = sorted(series, reverse=True)
    fig, axes = plt.subplots(1, len(sigmas), figsize=(3.2 * len(sigmas), 3.0), squeeze=False)
    for ax, sigma in zip(axes[0], sigmas, strict=True):
        ks = sorted(series[sigma])
        ax.plot(ks, [series[sigma][k] for k in ks], "k--", label="base")
        for name, runs in groups.items():
            per_run = np.array([[drift_series(r)[sigma][k] for k in ks] for r in runs])
            mean, std = per_run.mean(axis=0), per_run.std(axis=0, ddof=1) if len(runs) > 1 else 0 * per_run[0]
            ax.plot(ks, mean, label=f"{name} (n={len(runs)})")
            ax.fill_between(ks, mean - std, mean + std, alpha=0.25)
        ax.set_title(f"start sigma = {sigma:.2f}")
        ax.set_xlabel("sampler steps k")
        ax.set_ylabel("drift D(k) (RMS)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
