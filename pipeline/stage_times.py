"""Where a `dvc repro` spent its time, from the MLflow runs of one run group (``tracking.run_group``).

    python -m pipeline.stage_times                        # the newest group of the soar experiment
    python -m pipeline.stage_times --group repro-1a2b3c4 --before repro-9f8e7d6   # side by side
    python -m pipeline.stage_times --before-tracking-uri sqlite:///../old/mlflow.db  # against another checkout

Each stage execution logs one MLflow run; a repro's runs share a ``run_group`` tag. Per stage the table gives the
run's own seconds (start to end: the stage's work after its imports and config load) and the seconds between
the previous run's end and its start (process start-up: Python imports, DVC's hashing and bookkeeping); the
total is the first start to the last end. A stage run twice in one group (a rerun) counts its latest run.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

GROUP_TAG = "run_group"


@dataclass(frozen=True)
class StageTime:
    """One stage's run in a group: its name, own seconds and the start-up seconds before it."""

    name: str
    run_s: float
    startup_s: float


def stage_times(runs: Iterable[tuple[str, int, int]]) -> list[StageTime]:
    """``runs``: ``(name, start_ms, end_ms)`` of one group, any order -> one ``StageTime`` per name in start order
    (the latest run of a name); the start-up of the first run is 0 (nothing before it to measure from)."""
    latest: dict[str, tuple[int, int]] = {}
    for name, start, end in sorted(runs, key=lambda r: r[1]):
        if end is None or end < start:
            raise ValueError(f"run {name!r} has no end time (still running, or killed): finish or delete it")
        latest[name] = (start, end)
    ordered = sorted(latest.items(), key=lambda kv: kv[1][0])
    out, previous_end = [], None
    for name, (start, end) in ordered:
        startup = 0.0 if previous_end is None else max(0.0, (start - previous_end) / 1000)
        out.append(StageTime(name, (end - start) / 1000, startup))
        previous_end = max(end, previous_end or end)
    return out


def wall_seconds(times: Sequence[StageTime]) -> float:
    """First start to last end, seconds (runs do not overlap in a `dvc repro`)."""
    return sum(t.run_s + t.startup_s for t in times)


def table(groups: Mapping[str, Sequence[StageTime]]) -> str:
    """A markdown table with one row per stage and, per group, its run and start-up seconds."""
    names = list(dict.fromkeys(t.name for times in groups.values() for t in times))
    head = "| stage | " + " | ".join(f"{g} run s | {g} start-up s" for g in groups) + " |"
    lines = [head, "|---" * (1 + 2 * len(groups)) + "|"]
    for name in names:
        cells = []
        for times in groups.values():
            found = next((t for t in times if t.name == name), None)
            cells += ["–", "–"] if found is None else [f"{found.run_s:.1f}", f"{found.startup_s:.1f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    walls = [f"**{wall_seconds(times):.0f}** | " for times in groups.values()]
    lines.append("| **wall (first start to last end)** | " + " | ".join(walls) + " |")
    return "\n".join(lines)


def group_runs(client, experiment_id: str, group: str) -> list[tuple[str, int, int]]:
    """``(name, start_ms, end_ms)`` of every run tagged ``run_group = group``."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.{GROUP_TAG} = '{group}'", max_results=5000)
    return [(r.info.run_name, r.info.start_time, r.info.end_time) for r in runs]


def newest_group(client, experiment_id: str) -> str:
    runs = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    if not runs or GROUP_TAG not in runs[0].data.tags:
        raise SystemExit("no run with a run_group tag in the experiment: run `dvc repro` first")
    return runs[0].data.tags[GROUP_TAG]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.stage_times", description=__doc__.splitlines()[0])
    ap.add_argument("--tracking-uri", default=None, help="MLflow store (default: as the stages: params, "
                    "$MLFLOW_TRACKING_URI, sqlite mlflow.db)")
    ap.add_argument("--experiment", default="soar", help="MLflow experiment (default soar)")
    ap.add_argument("--group", default=None, help="run group to report (default: the newest run's group)")
    ap.add_argument("--before", default=None, help="a second group, shown first, for a before/after table")
    ap.add_argument("--before-tracking-uri", default=None, help="read the --before group from this store (default: "
                    "the same store; without --before, that store's newest group), e.g. another clone's mlflow.db")
    args = ap.parse_args(argv)
    import mlflow

    from pipeline.tracking import tracking_uri

    def open_experiment(uri: str):
        client = mlflow.MlflowClient(uri)
        experiment = client.get_experiment_by_name(args.experiment)
        if experiment is None:
            raise SystemExit(f"no MLflow experiment {args.experiment!r} in {uri}")
        return client, experiment.experiment_id

    client, experiment_id = open_experiment(tracking_uri(args.tracking_uri))
    sources = []  # (label, client, experiment id, group): the before group first
    if args.before or args.before_tracking_uri:
        before_client, before_id = (open_experiment(args.before_tracking_uri) if args.before_tracking_uri
                                    else (client, experiment_id))
        before = args.before or newest_group(before_client, before_id)
        sources.append(("before " + before if args.before_tracking_uri else before, before_client, before_id, before))
    group = args.group or newest_group(client, experiment_id)
    sources.append((group, client, experiment_id, group))
    try:
        columns = [(label, stage_times(group_runs(c, e, g)), g) for label, c, e, g in sources]
    except ValueError as err:
        raise SystemExit(f"stage_times: {err}") from None
    for _, times, g in columns:
        if not times:
            raise SystemExit(f"no runs tagged {GROUP_TAG}={g} in experiment {args.experiment!r}")
    print(table({label: times for label, times, _ in columns}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
