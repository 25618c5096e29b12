#!/usr/bin/env bash
# The GPU measurements of the README's GPU table, in one run.
#
#   bash benchmarks/gpu.sh [OUT]            # on a machine with a CUDA GPU
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu.sh /tmp/gpu-dry   # the same steps, small, on the CPU
#
# QUICK takes ResNet-18 for VGG16 (VGG16 on a CPU is too slow even for a dry run),
# 64 px for 224 and a few steps everywhere; MODEL names another torchvision classifier.
#
# Sections, most wanted first, each under its own time limit so that one that
# fails or hangs does not cost the others; everything printed goes to
# OUT/gpu.log, the benchmarks' JSON lines to OUT/gpu.jsonl:
#   1. the batched attack against one image at a time (digits-cnn, gradient)
#   2. the paper's model: VGG16 at 224 px (torchvision architecture; ImageNet
#      weights where torchvision's cache holds them, else random weights, which
#      cost the same), batched against one image at a time, peak GPU memory,
#      for the gradient and the LRP attack
#   3. the paper's experiment through the command line: VGG16, 224 px, the
#      gradient attack with the paper's 1500 steps on 4 of the built-in
#      photographs (scikit-image's and scikit-learn's, written to a folder as a
#      user's would be); about 2 minutes on an H200
#   4. a one-rank torchrun attack (one process, no process group: nccl needs a GPU per rank)
#   5. explanation speed against Captum
#   6. benchmarks/dimension.py, which adds 224 px on a GPU
# Sections 1 to 5 take about 6 minutes on an H200, section 6 (four sizes, the
# paper's 1500 steps, training included) longer.
# Needs the package (or PYTHONPATH=src), torchvision and captum; no network.
# Exits 1 when a section failed or ran past its limit (the log names it).
set -u
case "${1:-}" in
-h | --help)
    sed -n '2,/^set -u/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
    exit 0
    ;;
-*)
    echo "gpu.sh: error: unknown option $1; expected [OUT] (see bash benchmarks/gpu.sh --help)" >&2
    exit 2
    ;;
esac
out=${1:-runs/gpu}
device=${DEVICE:-cuda}
quick=${QUICK:-}
if [ -n "$quick" ]; then default_model=torchvision:resnet18; else default_model=torchvision:vgg16; fi
model=${MODEL:-$default_model}
py=${PYTHON:-python}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log="$out/gpu.log"
json="$out/gpu.jsonl"
export PYTHONUNBUFFERED=1

run() { # run LIMIT_SECONDS COMMAND...: one section, its time and exit status logged
    local limit=$1 start=$SECONDS
    shift
    echo "\$ $*"
    timeout "$limit" "$@"
    local status=$?
    echo "[exit $status after $((SECONDS - start)) s]"
    if [ "$status" -ne 0 ]; then echo "$*" >>"$work/failed"; fi
}

# Small settings for a dry run on the CPU; the measured ones on a GPU.
if [ -n "$quick" ]; then
    size=64
    loop="--loop-n 4 --steps 2 --repeats 1"
    big_loop="--loop-n 2 --steps 2 --repeats 1 --image-size $size"
    lrp_loop=$big_loop
    paper="-n 2 --steps 2 --method gradient --image-size $size"
    dimension="--quick --sizes 32 -n 2 --steps 5"
    explain="--batch 8 --repeats 1 --no-memory"
    torchrun="-n 8 --steps 5"
else
    size=224
    loop=""
    big_loop="--loop-n 8 --steps 20 --repeats 2"
    lrp_loop="--loop-n 4 --steps 20 --repeats 1"
    paper="-n 4 --method gradient"
    dimension=""
    explain=""
    torchrun="-n 64 --steps 200"
fi

{
    echo "== device"
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
    "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

    echo "== 1. batched attack against one image at a time (digits-cnn, gradient)"
    # shellcheck disable=SC2086
    run 100 "$py" benchmarks/attack.py --compare-loop --device "$device" --methods gradient \
        $loop --json "$json"

    echo "== 2. $model at $size px: batched against one image at a time"
    # Random weights, where none are cached, go into a cache of this run's own:
    # a later load from the user's cache would take them for the pretrained ones.
    if ! "$py" -c "import sys; from betasmooth.pretrained import checkpoint_path as c; \
sys.exit(not c(sys.argv[1]).is_file())" "$model"; then
        export TORCH_HOME="$work/torch"
    fi
    "$py" benchmarks/photo_folder.py "$work/photos" --weights "$model"
    # shellcheck disable=SC2086
    run 120 "$py" benchmarks/attack.py --compare-loop --device "$device" --methods gradient \
        --model "$model" --data "$work/photos" $big_loop --json "$json"
    # shellcheck disable=SC2086
    run 90 "$py" benchmarks/attack.py --compare-loop --device "$device" --methods lrp \
        --model "$model" --data "$work/photos" $lrp_loop --json "$json"

    echo "== 3. the paper's experiment: $model, $size px, the paper's steps"
    # shellcheck disable=SC2086
    run 240 "$py" -m betasmooth attack --model "$model" --data "$work/photos" \
        $paper --batch-size 4 --device "$device" --no-progress --out "$work/paper"

    echo "== 4. one-rank torchrun attack"
    # shellcheck disable=SC2086
    run 60 "$py" -m torch.distributed.run --standalone --nproc-per-node 1 -m betasmooth attack \
        --model digits-cnn --data digits --method gradient $torchrun \
        --device "$device" --out "$work/torchrun"
    "$py" -c "import json, sys; print('process group:', json.load(open(sys.argv[1]))['process_group'])" \
        "$work/torchrun/config.json"

    echo "== 5. explanation speed against Captum"
    # shellcheck disable=SC2086
    run 60 "$py" benchmarks/explain.py --device "$device" $explain --json "$json"

    echo "== 6. attack strength against input size"
    # shellcheck disable=SC2086
    run 900 "$py" benchmarks/dimension.py --device "$device" $dimension \
        --cache "$work/dimension-cache" --out "$out" --json "$json"
    echo "== done"
    date -u
} 2>&1 | tee "$log"
if [ -s "$work/failed" ]; then
    echo "sections that failed or ran past their limit:" | tee -a "$log"
    sed 's/^/  /' "$work/failed" | tee -a "$log"
    exit 1
fi
