#!/usr/bin/env bash
# One prepared check of the GPU profile on a CUDA machine (issue 14), about 5-6 minutes on an H200:
#   1. versions: nvidia-smi, python, torch, CUDA;
#   2. bench.py --profile gpu --measure: FLOP counts, predictions, and measured ms/step of the
#      real-size networks (64 px and 128 px) in bf16          -> $OUT/bench_gpu.json
#   3. side.py on the 500 sample CelebA faces at 64 px with the GPU profile's networks and stage
#      sizes cut to fit the time left (chosen from step 2's measurements, see below)
#                                                               -> $OUT/report.{json,md}, $OUT/*.png
# Everything printed is also in $OUT/log.txt. Each step has its own timeout, so one hang cannot eat
# the machine's time. Files land flat in $OUT (at most 8 come back from the device machine).
#
#   tools/gpu_check.sh prepare    # once, on the machine that has ../shared: copy the 500 faces to
#                                 # data/celeba (git-ignored; name `data` in the device run's carry)
#   tools/gpu_check.sh            # on the GPU machine, from the repository root
#   GPU_CHECK_DRY=1 OMP_NUM_THREADS=1 tools/gpu_check.sh   # toy sizes on the CPU: checks this script
set -uo pipefail
cd "$(dirname "$0")/.."
FACES=data/celeba/img_align_celeba
if [ "${1:-}" = prepare ]; then
    mkdir -p data/celeba && cp -r ../shared/data/celeba/img_align_celeba ../shared/data/celeba/identity_CelebA.txt data/celeba/
    echo "copied $(ls $FACES | wc -l) faces to $FACES"
    exit 0
fi
OUT=${OUT:-gpu_check_out}
DRY=${GPU_CHECK_DRY:-0}
WORK=$(mktemp -d)  # side.py's run folder (checkpoints, npz): kept out of $OUT, which returns 8 files
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
[ -d "$FACES" ] || { echo "no faces at $FACES: run 'tools/gpu_check.sh prepare' and carry data/"; exit 2; }

main() {
echo "=== versions ($(date -u))"
nvidia-smi || echo "(no nvidia-smi)"
python3 -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda',
torch.version.cuda, '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"

echo "=== bench.py --profile gpu --measure"
BENCH_ARGS=(--profile gpu --measure --json "$OUT/bench_gpu.json")
[ "$DRY" = 1 ] && BENCH_ARGS+=(--dry-run --windows 1)
SECONDS=0
timeout -k 10 200 python3 bench.py "${BENCH_ARGS[@]}" || echo "bench.py FAILED or timed out (exit $?)"
echo "bench: ${SECONDS} s"

# Optional (N_CURVE=1): tools/n_curve.py in the background while side.py runs below. The tiny digits
# networks leave the card mostly idle, so the two share it; side.py's stage timings are then taken on
# a shared GPU (bench.py's measurements above are not).
if [ "${N_CURVE:-0}" = 1 ]; then
    NC_DIR=$(mktemp -d)
    NC_ARGS=(--out "$NC_DIR" --device cuda --jobs 4 --sizes "${NC_SIZES:-64,128,256,512}"
             --clusters "${NC_CLUSTERS:-32,128}")
    [ "$DRY" = 1 ] && NC_ARGS=(--out "$NC_DIR" --device cpu --jobs 2 --sizes 12,16 --steps-per-image 3
                               --clusters 3,4 --grid 1,3 -- --n-syn 48 --clf-steps 10 --n-gen 12
                               --sampler ddim10 --channels 16,32 --batch-size 16 --cohesion 0)
    OMP_NUM_THREADS=2 timeout -k 10 "${NC_TIMEOUT:-300}" python3 tools/n_curve.py "${NC_ARGS[@]}" \
        > "$NC_DIR/n_curve_log.txt" 2>&1 &
    NC_PID=$!
fi

# Stage sizes for side.py from the measured 64-px steps: about 80 s of DDPM training, 30 s for the two
# classifiers, 20 s for N_syn and 60 s for the three methods' generations (50 DDIM steps each). Far
# too short to memorize 500 faces: this run checks that every stage works on CUDA at the real network
# size and times it; it does not reproduce the paper. Without a measurement (bench.py failed), fixed
# sizes that fit even at about 60 TFLOP/s are used.
SIZES=$(python3 - "$OUT/bench_gpu.json" <<'PY'
import json, sys
try:
    m = json.load(open(sys.argv[1]))["commands"][0]["measured"]
    per_image_s = {k: m[k]["ms_per_step"] / m[k]["batch"] / 1e3 for k in ("unguided", "guided")}
    clamp = lambda v, low, high, unit: int(min(high, max(low, v)) // unit * unit)
    train = clamp(80e3 / m["train"]["ms_per_step"], 200, 3000, 100)
    clf = clamp(30e3 / (2 * m["classifier"]["ms_per_step"]), 100, 1000, 50)
    n_syn = clamp(20 / (50 * per_image_s["unguided"]), 1024, 4096, 1024)
    n_gen = clamp(60 / (50 * (per_image_s["unguided"] + 2 * per_image_s["guided"])), 256, 1024, 256)
    print(train, clf, n_syn, n_gen)
except Exception as error:
    print(600, 200, 1024, 512, "# fallback:", error.__class__.__name__)
PY
)
read -r TRAIN CLF NSYN NGEN _ <<< "$SIZES"
echo "stage sizes: --train-steps $TRAIN --clf-steps $CLF --n-syn $NSYN --n-gen $NGEN ($SIZES)"
# --cohesion 0: after a few minutes of training the samples form no clusters with tau = 0.5, and a
# run whose filter keeps none stops with exit code 2 before the stages this check is for.
# --guidance 10 and the three rows of side.py: the stage sizes above are for one pass of three rows
# (experiments.py, which tunes lambda per row, would rerun the pipeline once per lambda).
SIDE_ARGS=(--dataset celeba --n 500 --data-root data --out "$WORK" --train-steps "$TRAIN" --clf-steps "$CLF"
           --n-syn "$NSYN" --n-gen "$NGEN" --cohesion 0 --guidance 10 --methods uncond,cond,side
           --extract-sampler ddim50)  # the sizes above are for 50 steps (the profile: ddpm250)
if [ "$DRY" = 1 ]; then
    SIDE_ARGS+=(--device cpu --n 32 --image-size 16 --channels 16,32 --attn-res 8 --train-steps 30 --clf-steps 10
                --clf-batch 16 --batch-size 16 --n-syn 64 --clusters 4 --n-gen 16 --sampler ddim10)
fi

echo "=== side.py ${SIDE_ARGS[*]}"
SECONDS=0
timeout -k 10 300 python3 side.py "${SIDE_ARGS[@]}" || echo "side.py FAILED or timed out (exit $?)"
echo "side.py: ${SECONDS} s"
cp "$WORK/report.json" "$WORK/report.md" "$OUT/" 2>/dev/null
cp "$WORK/figures/matches.png" "$WORK/figures/histograms.png" "$OUT/" 2>/dev/null
python3 -c "import json; r = json.load(open('$WORK/report.json')); print('timings (s):', r['timings_s'])" 2>/dev/null
rm -rf "$WORK"
if [ -n "${NC_PID:-}" ]; then
    wait "$NC_PID"; echo "n_curve exit $?"
    python3 tools/n_curve.py --out "$NC_DIR" --sizes "${NC_SIZES:-64,128,256,512}" --summarize-only \
        $([ "$DRY" = 1 ] && echo "--steps-per-image 3 --sizes 12,16") > "$OUT/n_curve.md"
    cat "$OUT/n_curve.md"
    tar -czf "$OUT/n_curve.tar.gz" -C "$NC_DIR" --exclude='*.pt' --exclude='*.npz' --exclude='*.png' .
fi
echo "=== done ($(date -u)); in $OUT: $(ls "$OUT" | tr '\n' ' ')"
}
main 2>&1 | tee "$OUT/log.txt"  # a pipeline, so the log is complete when the script returns
