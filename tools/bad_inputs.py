"""Bad inputs, as a new user makes them, through the real stage commands: every case must end well.

    python tools/bad_inputs.py                 # all cases, a markdown table, exit 1 if any case is BAD
    python tools/bad_inputs.py --only nan      # the cases whose name contains "nan"
    python tools/bad_inputs.py --keep /tmp/bi  # keep the working folder

A small tiny world (synth, prepare, embed on the tiny default with reduced sizes, and a randomly initialised
tiny base) is built in a temporary folder; each case then edits a copy of the parameters or of a file and
runs one stage as `dvc.yaml` does (`python -m stages.X`, or accelerate's launcher `--quiet` for train and
sample). A case is **good** when it ends as promised: either a clear failure (exit status 1, exactly one
`error:` line naming what is named in the case, no traceback), or correct handling (exit status 0 and the
case's own check of the result). Anything else is **BAD**: a traceback, a silent wrong result, a wrong
exit status or an error that does not name the key, file or line.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TRACEBACK = "Traceback (most recent call last)"
SETUP = {  # the tiny default, minutes smaller
    "synth": {"num_images": 48, "num_eval_geneval": 6, "num_eval_ocr": 4, "num_heldout": 4},
    "model": {"base_path": "base"},
    "train": {"max_train_steps": 2, "train_batch_size": 4, "snapshot_steps": 1, "validation_steps": 0,
              "log_every": 1},
    "sample": {"batch_size": 8, "num_inference_steps": 2, "resolution": 32},
}


@dataclass
class Case:
    name: str  # what the user did
    stage: list[str]  # stage command after `python -m` (or "train"/"sample" under accelerate)
    edit: dict = field(default_factory=dict)  # dotted key -> value (a string starting "yaml:" is raw YAML)
    expect: str | None = None  # a failure whose one error line contains this; None: exit 0 and ``check``
    prepare: Callable[[Path], None] | None = None  # changes files before the stage runs
    check: Callable[[Path, str], str | None] | None = None  # after exit 0: None / "ok: detail" if right, else what
    env: dict = field(default_factory=dict)
    shell_prefix: str = ""  # e.g. "ulimit -f 4000;"
    handled: str = ""  # the correct handling ``check`` verifies, for the table


def dotted_set(data: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    for p in parents:
        data = data.setdefault(p, {})
    data[last] = value


def write_params(work: Path, edits: dict, name: str) -> str:
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["mlflow"]["tracking_uri"] = f"sqlite:///{work / 'mlflow.db'}"  # this case's copy of the store
    raw = {}
    for key, value in edits.items():
        if isinstance(value, str) and value.startswith("yaml:"):
            raw[key] = value.removeprefix("yaml:")
        else:
            dotted_set(params, key, value)
    text = yaml.safe_dump(params, sort_keys=False)
    for key, value in raw.items():  # YAML that Python's dumper would not write (.nan, .inf)
        section, leaf = key.split(".")
        lines = text.splitlines()
        start = lines.index(f"{section}:")
        at = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(f"  {leaf}:"))
        lines[at] = f"  {leaf}: {value}"
        text = "\n".join(lines) + "\n"
    (work / name).write_text(text)
    return name


def command(stage: list[str]) -> list[str]:
    if stage[0] in ("train", "sample", "dynamics"):
        return [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--config_file",
                str(ROOT / "pipeline/launch/cpu.yaml"), "--num_processes", "1", "--num_machines", "1",
                "-m", f"stages.{stage[0]}", *stage[1:]]
    return [sys.executable, "-m", f"stages.{stage[0]}", *stage[1:]]


def run(work: Path, stage: list[str], params: str, env: dict | None = None, prefix: str = "",
        timeout: int = 600) -> subprocess.CompletedProcess:
    full = dict(os.environ, SOAR_PARAMS=params, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DVC_ROOT=str(work),
                **(env or {}))
    full.pop("SOAR_DEBUG", None)
    cmd = command(stage)
    if prefix:
        cmd = ["bash", "-c", prefix + " exec " + " ".join(f"'{c}'" for c in cmd)]
    return subprocess.run(cmd, cwd=work, env=full, capture_output=True, text=True, timeout=timeout)


def setup(work: Path) -> None:
    """The tiny world, prepared and embedded, and a random tiny base; the stages' own commands."""
    from pipeline.config import read_params
    from soar.models.tiny import TinyModelConfig, write_tiny_model

    params = read_params(ROOT / "params.yaml")
    for section, values in SETUP.items():
        params[section].update(values)
    params["mlflow"]["tracking_uri"] = f"sqlite:///{work / 'mlflow.db'}"
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in (["synth"], None, ["prepare"], ["embed"], ["train", "sft"]):
        if stage is None:  # the base the later stages read (pretraining skipped: random weights are enough)
            captions = [json.loads(line)["caption_en"] for line in (work / "data/world/train.jsonl").open()]
            write_tiny_model(work / "base", TinyModelConfig(**params["model"]["tiny"]), captions, seed=0)
            continue
        proc = run(work, stage, "params.yaml")
        if proc.returncode:
            raise SystemExit(f"setup: stage {stage[0]} failed:\n{proc.stderr[-3000:]}")


# --- file edits -------------------------------------------------------------------------------------------

def raw_jsonl(work: Path) -> Path:
    return work / "data/world/train.jsonl"


def first_md5(work: Path) -> str:
    return json.loads(raw_jsonl(work).open().readline())["md5"]


def append_line(text: str) -> Callable[[Path], None]:
    def edit(work: Path) -> None:
        with raw_jsonl(work).open("a") as f:
            f.write(text + "\n")
    return edit


def add_image(name: str, make: Callable[[], Image.Image], suffix: str = "jpg") -> Callable[[Path], None]:
    """An image file ``name`` in the world's image folder and a JSONL line for it (bucket 32 x 32)."""
    def edit(work: Path) -> None:
        path = work / "data/world/images" / f"{name}.{suffix}"
        make().save(path)
        if suffix != "jpg":  # the dataset reads {md5}.jpg: keep the other format's bytes under that name
            path.rename(path.with_suffix(".jpg"))
        append_line(json.dumps({"md5": name, "caption_en": "a photo of a red circle", "bw": 32, "bh": 32}))(work)
    return edit


def nan_weights(work: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = next((work / "base/transformer").glob("*.safetensors"))
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})


def truncate_weights(work: Path) -> None:
    path = next((work / "base/transformer").glob("*.safetensors"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def snapshot_gap(work: Path) -> None:
    snaps = work / "data/models/sft/snapshots"
    shutil.copytree(snaps / "step-000002", snaps / "step-000004")  # steps 1, 2, 4: 3 is missing


def stale_run(work: Path) -> None:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    mlflow.set_experiment("soar")
    run = mlflow.start_run(run_name="synth:world", tags={"host": socket.gethostname(), "pid": "999999999"})
    (work / "stale_run").write_text(run.info.run_id)
    mlflow.end_run(status="RUNNING")


# --- checks after exit 0 ----------------------------------------------------------------------------------

def prepare_report(work: Path) -> dict:
    return json.loads((work / "data/prepared/report.json").read_text())


def dropped(reason: str, md5: str) -> Callable[[Path, str], str | None]:
    def check(work: Path, _: str) -> str | None:
        examples = prepare_report(work)["examples"][reason]
        hit = [e for e in examples if e["md5"] == md5]
        return None if hit and md5 in hit[0]["message"] else f"{md5} not dropped as {reason}: {examples}"
    return check


def sixteen_bit() -> Image.Image:
    """A 16-bit grayscale square, left half 10000, right half 60000 (8 bits: 39 and 233)."""
    values = np.full((32, 32), 10000, np.uint16)
    values[:, 16:] = 60000
    return Image.fromarray(values)


def decoded_scaled(work: Path, _: str) -> str | None:
    from soar.data.images import load_rgb

    if any(e["md5"] == "deep16" for e in prepare_report(work)["examples"]["unreadable_image"]):
        return "the 16-bit image was dropped as unreadable"
    levels = sorted(np.unique(load_rgb(work / "data/world/images/deep16.jpg")).tolist())
    return None if levels == [39, 233] else f"16-bit image decoded to levels {levels[:5]}"


def duplicates(work: Path, _: str) -> str | None:
    dup = prepare_report(work)["duplicate_md5"]
    return None if dup["lines"] == 1 else f"duplicate_md5 report: {dup}"


def bounded_memory(limit_gb: float) -> Callable[[Path, str], str | None]:
    def check(work: Path, _: str) -> str | None:
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        kept = prepare_report(work)["kept"]
        ok = peak < limit_gb and kept > 0
        return f"{'ok: ' * ok}peak RSS of a stage process {peak:.1f} GB, {kept} image(s) kept"
    return check


def marked_failed(work: Path, output: str) -> str | None:
    import mlflow

    run_id = (work / "stale_run").read_text()
    status = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}").get_run(run_id).info.status
    return None if status == "FAILED" and "marked FAILED" in output else f"stale run is {status}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cases() -> list[Case]:
    sample, score, prepare, train = ["sample", "base"], ["score", "base"], ["prepare"], ["train", "sft"]
    return [
        # parameters: checked where params.yaml is parsed, named with their value
        Case("train.max_grad_norm: -1", train, {"train.max_grad_norm": -1.0}, "train.max_grad_norm: must be > 0"),
        Case("sample.num_inference_steps: 0", sample, {"sample.num_inference_steps": 0},
             "sample.num_inference_steps: must be >= 1"),
        Case("sample.guidance_scale: .nan", sample, {"sample.guidance_scale": "yaml:.nan"},
             "sample.guidance_scale: must be a finite number, got nan"),
        Case("soar.lambda_aux: .inf", ["train", "soar"], {"soar.lambda_aux": "yaml:.inf"},
             "soar.lambda_aux: must be a finite number, got inf"),
        Case("sample.batch_size: 0", sample, {"sample.batch_size": 0}, "sample.batch_size: must be >= 1"),
        Case("score.batch_size: 0", score, {"score.batch_size": 0}, "score.batch_size: must be >= 1"),
        Case("train.lr_warmup_steps: -5", train, {"train.lr_warmup_steps": -5}, "train.lr_warmup_steps: must be >= 0"),
        Case("launch.num_processes: 0", sample, {"launch.num_processes": 0}, "launch.num_processes: must be >= 1"),
        Case("typo soar.lambda_auxx", ["train", "soar"], {"soar.lambda_auxx": 1.0}, "soar.lambda_auxx: unknown key"),
        Case("train.max_train_steps: ten", train, {"train.max_train_steps": "ten"},
             "train.max_train_steps: expected an integer"),
        Case("a scored set never sampled", score, {"score.scorers": {"geneval": ["geneval"], "drawbench": ["ocr"]}},
             "score.scorers.drawbench: no prompt set of that name"),
        Case("sample.resolution: 30 (patch 4)", sample, {"sample.resolution": 30},
             "sample.resolution is 30 px, not a multiple of 4 px"),
        Case("train.train_batch_size above every bucket", train, {"train.train_batch_size": 1000},
             "train.train_batch_size is 1000 but the largest bucket holds"),
        Case("model.base_path missing", sample, {"model.base_path": "nowhere"}, "model folder not found: nowhere"),
        Case("data.jsonl_path missing", prepare, {"data.jsonl_path": "nope.jsonl"}, "nope.jsonl"),
        Case("data.image_dir missing", prepare, {"data.image_dir": "noimages"},
             "image directory not found: noimages"),
        # data: dropped with a reason, decoded right, or a clear stop
        Case("malformed JSONL line", prepare, prepare=append_line('{"md5": "x", "caption_en": '),
             handled="the line is dropped and counted as malformed in report.json",
             check=lambda w, _: None if prepare_report(w)["dropped"]["malformed"] == 1 else "not reported"),
        Case("corrupt image file", prepare, prepare=lambda w: (append_line(json.dumps(
            {"md5": "corrupt", "caption_en": "a", "bw": 32, "bh": 32}))(w),
            (w / "data/world/images/corrupt.jpg").write_bytes(b"not an image")),
            handled="dropped as unreadable_image, the file named in report.json",
            check=dropped("unreadable_image", "corrupt")),
        Case("decompression bomb (182 MP)", prepare, prepare=add_image("bomb", lambda: Image.new("1", (14000, 13000)),
                                                                       "png"),
             handled="dropped as unreadable_image naming the file and Pillow's limit",
             check=dropped("unreadable_image", "bomb")),
        Case("100 MP image", prepare, prepare=add_image("huge", lambda: Image.new("L", (10000, 10000), 128), "png"),
             handled="downscaled to 16.8 MP on load, the quality filter's memory bounded by that",
             check=bounded_memory(6.0)),  # the tiny filter at the 16.8 MP budget: ~3.5 GB
        Case("16-bit PNG", prepare, prepare=add_image("deep16", sixteen_bit, "png"),
             handled="decoded to 8 bits by value / 257 (levels 39 and 233), not clipped to white",
             check=decoded_scaled),
        Case("duplicate md5", prepare, prepare=lambda w: append_line(raw_jsonl(w).open().readline().strip())(w),
             handled="kept, listed under duplicate_md5 in report.json", check=duplicates),
        Case("bucket not a multiple of the patch", prepare,
             prepare=lambda w: append_line(json.dumps({"md5": first_md5(w), "caption_en": "a", "bw": 30, "bh": 32}))(w),
             expect="bucket 30x32 (bw x bh) is not a multiple of 4 px"),
        Case("prepared JSONL edited by hand", train, prepare=lambda w: (w / "data/prepared/train.jsonl").write_text(
            json.dumps({"md5": first_md5(w), "caption_en": "a", "bw": 30, "bh": 32}) + "\n"),
            expect="train.jsonl:1: bucket 30x32"),
        # weights
        Case("NaN in the base weights", sample, prepare=nan_weights, expect="weight tensor(s) hold NaN or infinity"),
        Case("truncated weights file", sample, prepare=truncate_weights, expect="base/transformer"),
        # runtime
        Case("unreachable tracking server", ["synth"], {"mlflow.tracking_uri": f"http://127.0.0.1:{free_port()}"},
             "does not answer"),
        Case("a snapshot missing from the curve", ["dynamics", "sft"], prepare=snapshot_gap,
             expect="the snapshots of steps [3] are missing"),
        Case("a run left RUNNING by a killed stage", ["synth"], prepare=stale_run,
             handled="the stale run is marked FAILED, and the stage says so",
             check=marked_failed),
        Case("no space for the weights (file-size limit)", train, shell_prefix="ulimit -f 3000;",
             expect="while writing data/models/sft/"),
    ]


def judge(case: Case, proc: subprocess.CompletedProcess, work: Path) -> tuple[str, str]:
    out = proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    if TRACEBACK in out:
        return "BAD", "traceback: " + (errors[0] if errors else out.strip().splitlines()[-1])[:160]
    if case.expect is not None:
        if proc.returncode == 1 and len(errors) == 1 and case.expect in errors[0]:
            return "good", errors[0]
        return "BAD", f"exit {proc.returncode}, error lines {errors[:2]} (wanted one naming {case.expect!r})"
    if proc.returncode != 0:
        return "BAD", f"exit {proc.returncode}: {(errors or out.strip().splitlines()[-1:])[0][:160]}"
    wrong = case.check(work, out)  # None, or "ok: <measured detail>" when right; anything else is what is wrong
    if wrong and not wrong.startswith("ok: "):
        return "BAD", wrong
    return "good", f"exit 0: {case.handled}" + (f" ({wrong.removeprefix('ok: ')})" if wrong else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument("--keep", type=Path, help="build and keep the working folders here")
    args = parser.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="bad_inputs-"))
    base.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    world = base / "world"
    if not (world / "data/models/sft/transformer").is_dir():
        shutil.rmtree(world, ignore_errors=True)
        world.mkdir()
        setup(world)
    print(f"setup: {world} ({time.perf_counter() - tic:.0f} s)\n", flush=True)
    print("| # | case | stage | verdict | what the user sees |\n|---|---|---|---|---|", flush=True)
    bad = 0
    selected = [c for c in cases() if args.only in c.name]
    for i, case in enumerate(selected, 1):
        work = base / f"case-{i:02d}"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(world, work, symlinks=True)
        if case.prepare:
            case.prepare(work)
        params = write_params(work, copy.deepcopy(case.edit), "case.yaml")
        proc = run(work, case.stage, params, case.env, case.shell_prefix)
        verdict, seen = judge(case, proc, work)
        bad += verdict == "BAD"
        seen = seen.replace(str(work) + "/", "").replace("|", "/")
        print(f"| {i} | {case.name} | {' '.join(case.stage)} | {verdict} | {seen} |", flush=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{len(selected) - bad} of {len(selected)} cases good, {bad} BAD ({time.perf_counter() - tic:.0f} s)")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
