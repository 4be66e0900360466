#!/usr/bin/env bash
# Downloads the wheels that benchmarks/gpu_check.sh installs on an accelerator machine without
# network access: the project's packages that such an image usually lacks (the data stack:
# tensorflow-datasets, grain, array_record, ml-collections, simplejpeg, av) and their own
# dependencies that are not commonly there, at requirements.txt's versions, for CPython 3.12 on
# manylinux x86_64. Run it where pip reaches PyPI; it fills .whl/ (git-ignored by
# `.git/info/exclude`, add `/.whl/` there) or the folder given as $1.
#
#   bash benchmarks/gpu_wheels.sh            # then carry .whl with the check
#
# PYTHON_VERSION (default 3.12) picks another interpreter's wheels. Nothing here runs on import.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PYV=${PYTHON_VERSION:-3.12}
mkdir -p "$DEST"
pin() { grep -i "^$1==" requirements.txt | head -1; }
# Pinned by requirements.txt, then the dependencies without a pin there (newest compatible).
PKGS=("$(pin tensorflow-datasets)" "$(pin grain)" "$(pin ml-collections)" "$(pin simplejpeg)"
      "$(pin av)" array-record dm-tree promise immutabledict simple-parsing termcolor toml
      docstring-parser tensorflow-metadata portpicker)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
for pkg in "${PKGS[@]}"; do
  [[ -z "$pkg" ]] && continue
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYV" \
    --implementation cp "${PLATFORMS[@]}" -d "$DEST" "$pkg" \
    || python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYV" \
      --implementation py -d "$DEST" "$pkg" \
    || python3 -m pip wheel --quiet --no-deps -w "$DEST" "$pkg" \
    || echo "gpu_wheels: no wheel for $pkg (pure-Python sdists such as promise are built by" \
            "'pip wheel'; it failed here)" >&2
done
du -ch "$DEST"/*.whl | tail -1
echo "wheels in $DEST; they count towards the 64 MiB that travel with the working tree"
