#!/usr/bin/env bash
# What the per-user subset cache saves a new study (tlselect/data/subset_cache.py): the workflow's
# two decoding steps with the default sizes (subset: 500 training, 50 validation, 100 test images
# per class; source task: 2,000 and 100), run as its rules run them, in a fresh study folder
# (unpacks the archive, decodes, stores the cache entry) and then in a second one (restores).
#
#   nice -n 19 bash benchmarks/subset_cache.sh [ARCHIVE] [WORK]
#
# ARCHIVE defaults to ../shared/data/cifar10-jpg.tar.gz; WORK (default: a temporary folder) holds
# the two study folders and the cache, removed at the end. Prints the seconds of each step.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
archive=$(realpath "${1:-$repo/../shared/data/cifar10-jpg.tar.gz}")
work=$(realpath -m "${2:-$(mktemp -d)}")
python=${PYTHON:-$repo/.venv/bin/python}
export TLSELECT_SUBSET_CACHE="$work/cache"
sizes=(--image-size 32 --seed 0 --classes --archive "$archive")

for study in first second; do
    mkdir -p "$work/$study"
    cd "$work/$study"
    start=$(date +%s.%N)
    "$python" "$repo/scripts/prepare_data.py" subset --root resources/cifar10 --out results/data \
        --train-per-class 500 --val-per-class 50 --test-per-class 100 "${sizes[@]}"
    middle=$(date +%s.%N)
    "$python" "$repo/scripts/prepare_data.py" source --root resources/cifar10 --subset results/data/subset.json \
        --out results/source/data --train-per-class 2000 --val-per-class 100 "${sizes[@]}"
    end=$(date +%s.%N)
    echo "$study study: subset $(echo "$middle - $start" | bc) s, source task $(echo "$end - $middle" | bc) s"
done
cmp "$work/first/results/data/train.pt" "$work/second/results/data/train.pt" && echo "identical train.pt"
rm -rf "$work"
