"""Screenshots of what a reader opens after `dvc repro`, for the README (docs/images/), made reproducibly.

    python tools/screenshots.py                     # in a repository where `dvc repro` has finished
    python tools/screenshots.py --repo /tmp/copy --out /tmp/shots

Starts ``mlflow server`` on 127.0.0.1 (a free port) at the repository root over its store (``mlflow.db``,
artifacts under ``mlruns/``), exactly as the README's command does; opens in headless Chromium (Debian's
``chromium``, driven by playwright: ``pip install -e '.[docs]'``, ``apt-get install chromium``):

1. the README's link, the *base / SFT / SOAR / GRPO* view: the score runs side by side, grouped by run group;
2. the ``results`` run's Overview: the results table as its description;
3. the *training curves* view (charts);
4. the first sample run's per-set grid (the prompts under the images), as MLflow's artifact viewer shows it;

and saves each as PNG, with the report's ``grid.png`` beside them. Every page is checked for what it must
show (the three score runs and a metric column, the table's rows, the chart sections); a page that lacks it
stops the script with exit status 1, naming the page and what is missing.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.mlflow_views import RESULTS_VIEW, TRAINING_VIEW, run_url, view_url  # noqa: E402

CHROMIUM = "/usr/bin/chromium"  # Debian's package
# flags for a sandboxed machine without a display or network (the background services would try to connect)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
VIEWPORT = {"width": 1440, "height": 900}
SERVER_START_S = 120  # how long `mlflow server` may take to answer /health
PAGE_S = 30  # how long a page may take to show what it must
ASSISTANT_CLOSE = '[data-component-id="mlflow.assistant.chat_panel.close"]'  # MLflow 3's chat side panel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(repo: Path, port: int) -> subprocess.Popen:
    """``mlflow server`` over ``repo``'s store, from ``repo`` (relative artifact roots resolve there)."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", "sqlite:///mlflow.db",
           "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: mlflow server exited: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise SystemExit(f"error: mlflow server on port {port} did not answer within {SERVER_START_S} s")


def find_runs(repo: Path) -> tuple[str, str, str]:
    """(experiment id, newest ``results`` run id, newest ``sample:base`` run id) in ``repo``'s store."""
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("soar")
    if exp is None:
        raise SystemExit(f"error: no experiment 'soar' in {repo / 'mlflow.db'}; run `dvc repro` there first")

    def newest(name: str) -> str:
        found = client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if not found:
            raise SystemExit(f"error: no run '{name}' in experiment soar of {repo / 'mlflow.db'}")
        return found[0].info.run_id

    return exp.experiment_id, newest("results"), newest("sample:base")


def shoot(page, url: str, out: Path, must_show: list[str], name: str, full_page: bool = False) -> None:
    """Open ``url``, wait until every text of ``must_show`` is on the page, save a screenshot as ``out``."""
    page.goto(url)
    try:
        for text in must_show:
            page.get_by_text(text, exact=False).first.wait_for(timeout=PAGE_S * 1000)
    except Exception:  # playwright's TimeoutError: report what the page showed instead
        body = " | ".join(page.inner_text("body").split("\n"))[:600]
        raise SystemExit(f"error: {name} ({url}) does not show {text!r}; it shows: {body}") from None
    close = page.locator(ASSISTANT_CLOSE)
    if close.count() and close.first.is_visible():
        close.first.click()
    page.wait_for_timeout(1500)  # charts and images finish drawing
    page.screenshot(path=str(out), full_page=full_page)
    print(f"{name}: {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=Path.cwd(), help="repository root with a finished dvc repro")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images", help="folder for the PNGs")
    args = parser.parse_args()
    repo, out = args.repo.resolve(), args.out
    out.mkdir(parents=True, exist_ok=True)
    experiment, results, sample = find_runs(repo)
    from playwright.sync_api import sync_playwright

    port = free_port()
    server = start_server(repo, port)
    ui = f"http://127.0.0.1:{port}"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport=VIEWPORT)
            shoot(page, view_url(ui, experiment, RESULTS_VIEW), out / "mlflow_results_view.png",
                  ["score:base", "score:sft", "score:soar", "score:grpo", "geneval", "run_group"],
                  "base / SFT / SOAR / GRPO view")
            shoot(page, run_url(ui, experiment, results), out / "mlflow_results_run.png",
                  ["+ SFT", "+ SOAR", "+ GRPO", "results/soar/geneval"], "results run")
            shoot(page, view_url(ui, experiment, TRAINING_VIEW, charts=True), out / "mlflow_training_view.png",
                  ["Training", "Reward vs step", "loss_aux"], "training curves view")
            shoot(page, f"{run_url(ui, experiment, sample).replace('?', '/artifacts/samples/geneval.png?')}",
                  out / "mlflow_sample_grid.png", ["geneval.png"], "sample grid")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    shutil.copyfile(repo / "data" / "report" / "grid.png", out / "report_grid.png")
    print(f"report grid: {out / 'report_grid.png'}")


if __name__ == "__main__":
    main()
