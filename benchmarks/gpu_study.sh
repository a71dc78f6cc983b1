#!/usr/bin/env bash
# The default offline study end to end, model search included, on one GPU with 1, 2, 4 and 8 jobs
# per GPU: wall time, GPU utilisation (nvidia-smi sampled every 500 ms) and the tables per setting.
#
#   bash benchmarks/gpu_study.sh [--dry-run] [ARCHIVE] [OUT]
#
# ARCHIVE: the image-folder archive (default ../shared/data/cifar10-jpg.tar.gz, as in the README's
# offline command); OUT: where the results go (default docs/measurements/gpu-study/): per setting
# j<N>-runs.csv, j<N>-search.csv, j<N>-gpu.csv (the samples), j<N>.log, and summary.md. Each
# setting runs in a fresh working folder (snakemake --directory) under OUT/work/, removed at the
# end. With N jobs per GPU, Snakemake's gpu resource counts slots: --resources gpu=N.
# GPU_STUDY_JOBS="1 2" picks other settings; GPU_STUDY_CONFIG adds one --config item to every
# setting (e.g. 'run_groups={size: 1}'). --dry-run prints the commands and runs nothing.
# With the Python packages installed by `pip install --target DIR`, set JUPYTER_PATH=DIR/share/jupyter
# (nbconvert's templates live there).
set -euo pipefail

dry=0
if [[ "${1:-}" == "--dry-run" ]]; then
    dry=1
    shift
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
archive=$(realpath -m "${1:-$repo/../shared/data/cifar10-jpg.tar.gz}")
out=$(realpath -m "${2:-$repo/docs/measurements/gpu-study}")
python=${PYTHON:-$repo/.venv/bin/python}

run() {
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    if ((!dry)); then "$@"; fi
}

run mkdir -p "$out/work"
for n in ${GPU_STUDY_JOBS:-1 2 4 8}; do
    work="$out/work/j$n"
    command=(
        "$python" -m snakemake --snakefile "$repo/Snakefile" --directory "$work" --cores all
        --resources "gpu=$n" --configfile "$repo/config.yaml" "$repo/studies/cifar10-transfer.yaml"
        --config "search={enabled: true}" "data={archive: $archive}" "gpu_jobs_per_device=$n"
        ${GPU_STUDY_CONFIG:+"$GPU_STUDY_CONFIG"}
    )
    if ((dry)); then
        run "${command[@]}"
        continue
    fi
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 >"$out/j$n-gpu.csv" &
    sampler=$!
    start=$(date +%s.%N)
    status=0
    "${command[@]}" >"$out/j$n.log" 2>&1 || status=$?
    end=$(date +%s.%N)
    kill "$sampler"
    wait "$sampler" || true
    if ((status)); then
        echo "jobs per GPU $n: snakemake failed (exit $status); see $out/j$n.log" >&2
        exit "$status"
    fi
    cp "$work/results/tables/runs.csv" "$out/j$n-runs.csv"
    cp "$work/results/tables/search.csv" "$out/j$n-search.csv"
    awk -F', *' -v n="$n" -v start="$start" -v end="$end" '
        { util += $1; mem = ($2 > mem ? $2 : mem); count++ }
        END { printf "%s %.1f %.1f %d\n", n, end - start, (count ? util / count : 0), mem }
    ' "$out/j$n-gpu.csv" >>"$out/work/walls.txt"
    rm -rf "$work"
done
if ((dry)); then
    exit 0
fi

"$python" - "$out" <<'EOF'
import sys
from pathlib import Path

import pandas as pd

out = Path(sys.argv[1])
lines = ["| jobs per GPU | wall s | mean GPU utilisation % | peak GPU memory MiB |", "|---:|---:|---:|---:|"]
tables = {}
for row in (out / "work/walls.txt").read_text().split("\n"):
    if row:
        n, wall, util, mem = row.split()
        lines.append(f"| {n} | {float(wall):.0f} | {float(util):.0f} | {mem} |")
        runs = pd.read_csv(out / f"j{n}-runs.csv").set_index(["kind", "name"])
        tables[f"val (j{n})"], tables[f"test (j{n})"] = runs["val_accuracy"], runs["test_accuracy"]
accuracies = pd.DataFrame(tables).round(3).reset_index()
lines += ["", "Validation and test accuracy per run and setting:", ""]
lines += ["| " + " | ".join(map(str, accuracies.columns)) + " |", "|" + "---|" * len(accuracies.columns)]
lines += ["| " + " | ".join(map(str, row)) + " |" for row in accuracies.itertuples(index=False)]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
rm -rf "$out/work"
