#!/usr/bin/env bash
# The study at the GPU's speed, measured in one command on one GPU, within a time budget (default
# 480 s of the GPU, GPU_SPEED_BUDGET_S):
#
#   bash benchmarks/gpu_speed.sh [--dry-run] [ARCHIVE] [OUT]
#
#   0. calibrate: `snakemake plan_recalibrate` with the run groups' size and fusion left to the plan,
#      in a scratch folder: measures this GPU's plan into the per-user cache (which every later
#      step reads) and fills the per-user subset cache (later steps neither unpack nor decode);
#   1. the study-level benchmark, plain script against the workflow (benchmarks/study.py);
#   2. the default offline study with the model search, run groups of the plan's size
#      ('run_groups={size: auto}'), GPU utilisation sampled every 500 ms (benchmarks/gpu_study.sh);
#   3. the same with one run a job ('run_groups={size: 1}'), in what is left of the budget.
#
# Each step after the first runs under `timeout` with what is left of the budget (at least
# GPU_SPEED_MIN_S, 60 s); a step cut short says so in OUT/summary.md. ARCHIVE: the image-folder
# archive (default ../shared/data/cifar10-jpg.tar.gz); OUT: the raw output (default
# docs/measurements/gpu-speed/): plan.json, calibrate.log, study-benchmark-<gpu>.{md,json},
# groups-auto/ and groups-1/ (gpu_study.sh's files: runs, search, GPU samples, log, summary.md),
# steps.tsv (seconds and exit status per step) and summary.md. GPU_SPEED_JOBS: jobs per GPU of
# steps 2 and 3 (default 4). --dry-run checks that every file it needs exists, prints the commands
# and runs nothing (it needs no GPU).
set -euo pipefail

dry=0
if [[ "${1:-}" == "--dry-run" ]]; then
    dry=1
    shift
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
archive=$(realpath -m "${1:-$repo/../shared/data/cifar10-jpg.tar.gz}")
out=$(realpath -m "${2:-$repo/docs/measurements/gpu-speed}")
python=${PYTHON:-$repo/.venv/bin/python}
budget=${GPU_SPEED_BUDGET_S:-480}
floor=${GPU_SPEED_MIN_S:-60}
jobs=${GPU_SPEED_JOBS:-4}

missing=0
for file in "$archive" "$python" "$repo/Snakefile" "$repo/config.yaml" "$repo/studies/cifar10-transfer.yaml" \
    "$repo/benchmarks/study.py" "$repo/benchmarks/plain_study.py" "$repo/benchmarks/gpu_study.sh" \
    "$repo/scripts/calibrate.py"; do
    if [[ ! -e "$file" ]]; then
        echo "missing: $file" >&2
        missing=1
    fi
done
if ((missing)); then
    exit 1
fi
if ((!dry)) && ! command -v nvidia-smi >/dev/null; then
    echo "no nvidia-smi: this measures a GPU (use --dry-run to check the command on a machine without one)" >&2
    exit 1
fi

label=gpu
if ((!dry)); then
    label=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/-$//')
fi

started=$SECONDS
left() {
    local rest=$((budget - (SECONDS - started)))
    echo $((rest > floor ? rest : floor))
}

step() { # step NAME LOG COMMAND...: run it under the budget left (output to LOG; - for the terminal), record its seconds and exit status
    local name=$1 log=$2
    shift 2
    printf '+ [%s]' "$name"
    printf ' %q' "$@"
    if [[ "$log" != - ]]; then printf ' > %q 2>&1' "$log"; fi
    printf '\n'
    if ((dry)); then
        return 0
    fi
    local limit status=0 begin=$SECONDS
    limit=$(left)
    if [[ "$log" == - ]]; then
        timeout --signal=TERM --kill-after=20 "$limit" "$@" || status=$?
    else
        timeout --signal=TERM --kill-after=20 "$limit" "$@" >"$log" 2>&1 || status=$?
    fi
    printf '%s\t%d\t%d\t%d\n' "$name" $((SECONDS - begin)) "$status" "$limit" >>"$out/steps.tsv"
}

if ((!dry)); then
    mkdir -p "$out"
    : >"$out/steps.tsv"
    nvidia-smi >"$out/nvidia-smi.txt"
fi
groups="run_groups={size: auto, fuse: auto}"
scratch="$out/work/calibrate"
step calibrate "$out/calibrate.log" "$python" -m snakemake --snakefile "$repo/Snakefile" --directory "$scratch" \
    --cores all --resources gpu=1 --configfile "$repo/config.yaml" "$repo/studies/cifar10-transfer.yaml" \
    --config "data={archive: $archive}" "$groups" plan_recalibrate
if ((!dry)); then
    cp "$scratch"/results/plans/*.json "$out/plan.json" 2>/dev/null || true
    rm -rf "$scratch"
fi
step study-benchmark - "$python" "$repo/benchmarks/study.py" --archive "$archive" --out "$out" --device-label "$label"
for size in auto 1; do
    step "groups-$size" - env GPU_STUDY_JOBS="$jobs" GPU_STUDY_CONFIG="run_groups={size: $size, fuse: auto}" \
        PYTHON="$python" bash "$repo/benchmarks/gpu_study.sh" "$archive" "$out/groups-$size"
done
if ((dry)); then
    echo "dry run: every file is there; on a GPU this takes about ${budget}s (GPU_SPEED_BUDGET_S)"
    exit 0
fi

{
    echo "# The study on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
    echo
    echo "benchmarks/gpu_speed.sh, budget ${budget}s, $jobs jobs per GPU in the studies; raw files beside this one."
    echo
    echo "| step | seconds | exit status | limit s |"
    echo "|---|---:|---:|---:|"
    awk -F'\t' '{ note = ($3 == 124 || $3 == 137) ? " (cut at the limit)" : ""; printf "| %s | %d | %d%s | %d |\n", $1, $2, $3, note, $4 }' "$out/steps.tsv"
    for size in auto 1; do
        if [[ -f "$out/groups-$size/summary.md" ]]; then
            echo
            echo "## Run groups of size $size (wall time and GPU utilisation of the whole study)"
            echo
            cat "$out/groups-$size/summary.md"
        fi
    done
    if compgen -G "$out/study-benchmark-*.md" >/dev/null; then
        echo
        echo "## Plain script against the workflow"
        echo
        cat "$out"/study-benchmark-*.md
    fi
} >"$out/summary.md"
cat "$out/summary.md"
