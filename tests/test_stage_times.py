"""pipeline.stage_times: per-stage seconds of a run group, from a real MLflow store."""

from __future__ import annotations

import pytest

from pipeline.stage_times import StageTime, main, stage_times, wall_seconds


def test_run_and_startup_seconds_in_start_order():
    runs = [("sample:base", 20_000, 50_000), ("synth:world", 1_000, 3_000), ("pretrain:base", 8_000, 18_500)]
    times = stage_times(runs)
    assert times == [StageTime("synth:world", 2.0, 0.0), StageTime("pretrain:base", 10.5, 5.0),
                     StageTime("sample:base", 30.0, 1.5)]
    assert wall_seconds(times) == pytest.approx((50_000 - 1_000) / 1000)


def test_a_rerun_counts_its_latest_run():
    times = stage_times([("a", 0, 1_000), ("b", 2_000, 3_000), ("a", 5_000, 9_000)])
    assert [t.name for t in times] == ["b", "a"]
    assert times[1] == StageTime("a", 4.0, 2.0)


def test_unfinished_run_is_named():
    with pytest.raises(ValueError, match="'train:soar' has no end time"):
        stage_times([("train:soar", 5_000, None)])


def write_store(folder, groups: dict) -> str:
    """A real MLflow sqlite store in ``folder`` with experiment "soar" holding ``groups``: {group: [(stage, start
    ms, end ms)]}, times relative to a fixed instant."""
    import mlflow

    T0 = 1_800_000_000_000  # ms since the epoch (0 would read as "now")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("soar", artifact_location=str(folder / "art"))
    for group, spans in groups.items():
        for name, start, end in spans:
            run = client.create_run(exp, start_time=T0 + start, tags={"run_group": group}, run_name=name)
            client.set_terminated(run.info.run_id, end_time=T0 + end)
    return uri


OLD = [("pretrain:base", 0, 600_000), ("sample:base", 606_000, 666_000)]
NEW = [("pretrain:base", 1_000_000, 1_200_000), ("sample:base", 1_203_000, 1_233_000)]


@pytest.mark.slow
def test_before_after_table_from_a_real_store(tmp_path, capsys):
    uri = write_store(tmp_path, {"repro-old": OLD, "repro-new": NEW})
    assert main(["--tracking-uri", uri, "--before", "repro-old"]) == 0  # newest group: repro-new
    out = capsys.readouterr().out
    assert "| stage | repro-old run s | repro-old start-up s | repro-new run s | repro-new start-up s |" in out
    assert "| pretrain:base | 600.0 | 0.0 | 200.0 | 0.0 |" in out
    assert "| sample:base | 60.0 | 6.0 | 30.0 | 3.0 |" in out
    assert "| **wall (first start to last end)** | **666** |  | **233** |  |" in out


@pytest.mark.slow
def test_before_from_another_checkouts_store(tmp_path, capsys):
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old = write_store(tmp_path / "old", {"repro-old": OLD})
    new = write_store(tmp_path / "new", {"repro-new": NEW})
    assert main(["--tracking-uri", new, "--before-tracking-uri", old]) == 0  # each store's newest group
    out = capsys.readouterr().out
    assert "| stage | before repro-old run s | before repro-old start-up s | repro-new run s |" in out
    assert "| sample:base | 60.0 | 6.0 | 30.0 | 3.0 |" in out
    with pytest.raises(SystemExit, match="no runs tagged run_group=repro-gone"):
        main(["--tracking-uri", new, "--before-tracking-uri", old, "--before", "repro-gone"])


@pytest.mark.slow
def test_an_unfinished_run_is_one_line_naming_it(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("soar", artifact_location=str(tmp_path / "art"))
    client.create_run(exp, tags={"run_group": "repro-live"}, run_name="pretrain:base")  # never terminated
    with pytest.raises(SystemExit, match="stage_times: run 'pretrain:base' has no end time"):
        main(["--tracking-uri", uri])
