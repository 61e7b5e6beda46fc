#!/usr/bin/env bash
# Builds .gpucarry/ (git-ignored; add `/.gpucarry/` to .git/info/exclude), what the lent GPU
# machine lacks for scripts/gpu_serve_check.sh: the nvidia-pytriton 0.7.0 wheel's files
# (tritonserver, the Python backend, nvidia_pytriton.libs) less libpython3.13 and the stubs of
# Pythons other than $PY_TAG, as pytriton-0.7.0-py<tag>.tar.xz (the layout of site-packages is
# kept: the binaries find their libraries through $ORIGIN-relative RPATHs), and the numpy 1.26.4
# wheel for that Python (the python_backend stubs are built against numpy 1.x). About 43 MiB
# (26 + 17) for 3.12, well inside the 64 MiB a device run carries. Uses pip download (a package
# registry reachable here); DEST and PY_TAG (3.12, the GPU machine's Python) may be set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_TAG=${PY_TAG:-3.12}
DEST=${DEST:-.gpucarry}
DL=${DL:-/tmp/gpucarry-downloads}
mkdir -p "$DL" "$DEST"
platforms=(--platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_TAG" --implementation cp \
    "${platforms[@]}" -d "$DL" nvidia-pytriton==0.7.0 numpy==1.26.4
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
# unzip keeps the executable bits (python's zipfile does not)
unzip -q "$DL"/nvidia_pytriton-0.7.0-*.whl -d "$tree"
rm -f "$tree"/nvidia_pytriton.libs/libpython3-*.13.so*
for stub in "$tree"/pytriton/tritonserver/python_backend_stubs/*; do
    [ "$(basename "$stub")" = "$PY_TAG" ] || rm -rf "$stub"
done
chmod +x "$tree"/pytriton/tritonserver/bin/tritonserver "$tree"/pytriton/tritonserver/python_backend_stubs/*/*
rm -f "$DEST"/pytriton-*.tar.xz "$DEST"/numpy-*.whl
tar -cJf "$DEST/pytriton-0.7.0-py$PY_TAG.tar.xz" -C "$tree" .
cp "$DL"/numpy-1.26.4-cp"${PY_TAG/./}"-*.whl "$DEST"/
du -b "$DEST"/* | awk '{printf "%6.1f MiB  %s\n", $1 / 1048576, $2; s += $1} END {printf "%6.1f MiB  total\n", s / 1048576}'
