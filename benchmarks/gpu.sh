#!/usr/bin/env bash
# Issue 29's GPU measurements in one go, at most 7.5 minutes on an H200 (50 + 130 + 150 + 100 s of timeouts):
#   tests/test_gpu.py        (pytest -rs)                                  -> OUT/test_gpu.log
#   benchmarks/sample.py     paper and mid, batch 64 and 256, every path    -> OUT/sample.json (+ sample.log)
#   benchmarks/train_gpt.py  paper and mid, eager and torch.compile         -> OUT/train_gpt.json (+ .log)
#   benchmarks/embed.py      ViT-B-32 and toy CLIP, both decoders, where open_clip imports (carry it as a
#                            wheel in .whl/, with nvidia-nvimgcodec-cu13 and nvidia-nvjpeg) -> OUT/embed.json (+ .log)
# then a short table (OUT/summary.txt). Each part runs under its own timeout and writes its JSON row by row,
# so a hang or a crash costs only that part's remaining rows. At most 8 files land in OUT (the device
# machine returns no more). Each JSON names the device, the commit (git, else $GIT_COMMIT) and the date.
#
#   bash benchmarks/gpu.sh [OUT]            OUT defaults to benchmarks/results
#   GIT_COMMIT=<hash> bash benchmarks/gpu.sh OUT   on a copy of the tree without .git (the device machine)
#   SMOKE=1 bash benchmarks/gpu.sh OUT      tiny sizes, CPU is fine: checks this script end to end
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mkdir -p "${1:-$ROOT/benchmarks/results}" && cd "${1:-$ROOT/benchmarks/results}" && pwd)
cd "$ROOT" || exit 1
PY=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
# Python packages carried as wheels (see the device notes), if any: installed aside, not into the image
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export GIT_COMMIT=${GIT_COMMIT:-$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)}
: >"$OUT/summary.txt"

part() {  # part NAME SECONDS STDOUT STDERR COMMAND...: run it under a timeout (killed 10 s after), say how it ended
    local name=$1 seconds=$2 stdout=$3 stderr=$4 start=$SECONDS rc
    shift 4
    if [ "$stdout" = "$stderr" ]; then
        timeout -k 10 "$seconds" "$@" >"$stdout" 2>&1
    else
        timeout -k 10 "$seconds" "$@" >"$stdout" 2>"$stderr"
    fi
    rc=$?
    local how="ok"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && how="TIMED OUT after ${seconds}s"
    [ $rc -ne 0 ] && [ "$how" = "ok" ] && how="FAILED (exit $rc)"
    echo "$name: $how in $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}

if [ "$SMOKE" = 1 ]; then
    SAMPLE=(--presets tiny --batch-sizes 2,4 --repeats 1)
    TRAIN=(--presets tiny --steps 4 --batch-sizes 8 --micro-batch 4 --compile no)
else
    SAMPLE=(--presets paper,mid --batch-sizes 64,256 --repeats 2 --profile)
    TRAIN=(--presets paper,mid --steps 30 --compile no,yes --profile)
fi

$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee -a "$OUT/summary.txt"
part tests 50 "$OUT/test_gpu.log" "$OUT/test_gpu.log" $PY -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py
part sample 130 "$OUT/sample.log" "$OUT/sample.log" $PY benchmarks/sample.py "${SAMPLE[@]}" --out "$OUT/sample.json"
part train_gpt 150 "$OUT/train_gpt.log" "$OUT/train_gpt.log" \
    $PY benchmarks/train_gpt.py "${TRAIN[@]}" --out "$OUT/train_gpt.json"
if [ "$SMOKE" != 1 ] && $PY -c "import open_clip" 2>/dev/null; then
    part embed 100 "$OUT/embed.json" "$OUT/embed.log" $PY benchmarks/embed.py --models ViT-B-32,toy-clip \
        --decoders opencv,nvimgcodec --n 10000 --repeats 2 --device cuda
else
    echo "embed: skipped (needs open_clip)" | tee -a "$OUT/summary.txt"
fi
echo | tee -a "$OUT/summary.txt"
$PY benchmarks/summarize.py "$OUT" | tee -a "$OUT/summary.txt"
