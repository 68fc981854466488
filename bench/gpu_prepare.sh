#!/usr/bin/env bash
# Prepare a GPU run of bench/gpu.py (see README, "On a GPU"). Run here, in the repository, with registry access:
#
#   bash bench/gpu_prepare.sh            # SHARED=../shared PYTHON=.venv/bin/python by default
#
# - .whl/: jsonargparse and the two packages of its [signatures] extra that the GPU machine lacks, as wheels for
#   its Python 3.12 (pure Python, so one wheel each), pinned to the versions the development venv uses. bench/gpu.py
#   itself does not need them; they are for analyze.py (validate) on that machine.
# - .gpu_data/: the ResNet20 checkpoint and 260 of the shared CIFAR-10 test images (26 of each class, evenly spread
#   over each class's files), in the layout of ../shared (checkpoints/cifar10/, data/cifar10/test/<class>/).
#
# Both folders are git-ignored (.gitignore), so they never get committed; the device tool carries them when `carry`
# names them. ../shared does not travel to that machine.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
shared="${SHARED:-$repo/../shared}"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  for candidate in "$repo/.venv/bin/python" "$repo/../main/.venv/bin/python" python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python="$candidate"; break; fi
  done
fi
per_class="${PER_CLASS:-26}"
cd "$repo"
{ git check-ignore -q .whl/x && git check-ignore -q .gpu_data/x; } || { echo "gpu_prepare: .whl/ and .gpu_data/ must be git-ignored" >&2; exit 1; }

# 1. wheels (the GPU machine has pyyaml and typing-extensions already)
mkdir -p .whl
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0
for wheel in .whl/*.whl; do
  echo "$(basename "$wheel") needs: $(unzip -p "$wheel" '*/METADATA' | grep '^Requires-Dist' | grep -v extra \
    | sed 's/Requires-Dist: //' | paste -sd, -)"
done

# 2. the ResNet20 checkpoint and a class-balanced sample of the test images
src="$shared/data/cifar10/test"
[[ -d "$src" ]] || { echo "gpu_prepare: $src not found (set SHARED=)" >&2; exit 1; }
rm -rf .gpu_data
mkdir -p .gpu_data/checkpoints/cifar10 .gpu_data/data/cifar10/test
cp "$shared/checkpoints/cifar10/resnet20-12fca82f.th" .gpu_data/checkpoints/cifar10/
for class_dir in "$src"/*/; do
  class="$(basename "$class_dir")"
  mkdir -p ".gpu_data/data/cifar10/test/$class"
  mapfile -t files < <(ls "$class_dir" | sort)
  step=$(( ${#files[@]} / per_class )); (( step >= 1 )) || step=1
  for (( i = 0, n = 0; i < ${#files[@]} && n < per_class; i += step, n++ )); do
    cp "$class_dir/${files[$i]}" ".gpu_data/data/cifar10/test/$class/"
  done
done
echo "gpu_prepare: $(ls .whl | wc -l) wheels in .whl ($(du -sh .whl | cut -f1)), $(find .gpu_data -name '*.jpg' | wc -l)" \
  "images and the checkpoint in .gpu_data ($(du -sh .gpu_data | cut -f1))"
