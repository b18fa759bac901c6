#!/bin/bash
# The GPU checks of benchmarks/README.md in one script, for a GPU machine with no network (finishes in a few minutes
# on one H200; every part has its own time limit and the script goes on when one fails):
#   1. benchmarks/train_step.py: SD3.5-Medium-shaped SFT and SOAR steps (s/step, peak GiB, MFU);
#   2. benchmarks/soar_step.py: the tiny batched-vs-loop step benchmark (CPU);
#   3. a DeepSpeed ZeRO-2 single-GPU smoke run of the tiny trainer through
#      `accelerate launch --config_file pipeline/launch/zero2.yaml --num_processes 1 -m stages.train soar`
#      (random-init tiny model and a small tiny world in a temp folder, 5 steps, bf16; SOAR_PARAMS
#      points the stage at a temp params file).
# Run from the repository root:  bash benchmarks/device_check.sh   (PYTHON=... to pick the interpreter;
# OUT=folder to keep the logs, default a temp folder). Prints every figure; exit status = failed parts.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python}
ACCELERATE=${ACCELERATE:-$(dirname "$(command -v "$PYTHON")")/accelerate}
[ -x "$ACCELERATE" ] || ACCELERATE=accelerate
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
FAILED=0

part() {  # part NAME SECONDS CMD...: run with a time limit, tee the log, count failures
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T), limit ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v -e "it/s]" -e "^Writing model" -e "^Loading weights"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc"
    [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
}

echo "=== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" - <<'EOF'
import importlib
import torch
print(f"torch {torch.__version__}, cuda {torch.version.cuda}, available {torch.cuda.is_available()}")
for name in ("diffusers", "transformers", "accelerate", "deepspeed", "mlflow"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as err:  # noqa: BLE001 - report whatever is missing
        print(f"{name} MISSING ({type(err).__name__}: {err})")
EOF

part train_step 300 "$PYTHON" benchmarks/train_step.py --reps 5 --warmup 2
part soar_step 150 "$PYTHON" benchmarks/soar_step.py --threads 4 --reps 3
part sample 240 "$PYTHON" benchmarks/sample.py --reps 3

# 3. ZeRO-2 smoke run: a tiny world + random-init tiny model (params.yaml model.tiny) in $OUT/zero2
SMOKE="$OUT/zero2"
rm -rf "$SMOKE" && mkdir -p "$SMOKE"
cat > "$OUT/zero2_setup.py" <<'EOF'
import json, shutil, sys
from pathlib import Path
import yaml
from pipeline.config import parse_config, read_params
from soar.data.tiny_world import generate_world
from soar.models.tiny import TinyModelConfig, write_tiny_model

work, root = Path(sys.argv[1]), Path.cwd()
params = read_params(root / "params.yaml")
tiny = params["model"]["tiny"]
generate_world(work / "world", num_images=64, image_size=tiny["sample_size"], degraded_fraction=0.0,
               text_fraction=0.25, num_eval_geneval=0, num_eval_ocr=0, seed=0)
(work / "prepared").mkdir()
shutil.copy(work / "world" / "train.jsonl", work / "prepared" / "train.jsonl")
captions = [json.loads(line)["caption_en"] for line in (work / "world" / "train.jsonl").read_text().splitlines()]
write_tiny_model(work / "base", TinyModelConfig(**tiny), captions, seed=0)
params["data"].update(jsonl_path=str(work / "world/train.jsonl"), image_dir=str(work / "world/images"),
                      prepared_dir=str(work / "prepared"))
params["model"].update(base_path=str(work / "base"), models_dir=str(work / "models"))
params["train"].update(max_train_steps=5, train_batch_size=4, log_every=1, checkpointing_steps=0,
                       mixed_precision="bf16")
params["mlflow"].update(tracking_uri=f"sqlite:///{work / 'mlflow.db'}", experiment="device-check")
params["launch"].update(num_processes=1, config_file="pipeline/launch/zero2.yaml")
parse_config(params)
(work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
print(f"smoke setup in {work}")
EOF
cat > "$OUT/zero2_verify.py" <<'EOF'
import sys
from pathlib import Path
import torch
from safetensors.torch import load_file
work = Path(sys.argv[1])
trained = load_file(next((work / "models/soar/transformer").glob("*.safetensors")))
base = load_file(next((work / "base/transformer").glob("*.safetensors")))
changed = sum(not torch.equal(trained[k].float(), base[k].float()) for k in base)
print(f"zero2 smoke: saved transformer, {changed}/{len(base)} tensors changed from the base")
sys.exit(0 if changed else 1)
EOF
part zero2_setup 120 "$PYTHON" "$OUT/zero2_setup.py" "$SMOKE"
part zero2_smoke 240 env SOAR_PARAMS="$SMOKE/params.yaml" DVC_ROOT="$SMOKE" "$ACCELERATE" launch \
    --config_file pipeline/launch/zero2.yaml --num_processes 1 --num_machines 1 --main_process_port 29533 \
    -m stages.train soar
part zero2_verify 60 "$PYTHON" "$OUT/zero2_verify.py" "$SMOKE"

echo "=== done: $FAILED part(s) failed; logs in $OUT"
exit "$FAILED"
