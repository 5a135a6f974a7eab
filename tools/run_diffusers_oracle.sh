#!/usr/bin/env bash
# diffusers' own tests as the oracle of cow_model's isolation contract (issue 8; tools/diffusers_oracle.py).
#
#   tools/run_diffusers_oracle.sh TESTS_PARENT VENV [OUT_DIR] [-- extra pytest args]
#
# TESTS_PARENT: the folder holding diffusers' repository `tests/` package (fetched, never committed here),
#               e.g. made with `git archive <diffusers commit> tests | tar -x -C TESTS_PARENT`.
# VENV:         a venv with torch, diffusers, peft, parameterized, requests-mock, pytest-timeout,
#               accelerate and this repository installed editable (`pip install -e REPO[test]`), so the
#               live cow_model is what gets tested.
# OUT_DIR:      where plain.xml, clone.xml, clone.json and the logs go (default: a new temp dir).
# ORACLE_CONTROL=1 adds a control pass (control.json): the models are checked but not cloned, so it lists
#               every test that mutates its model, i.e. what the clone pass is able to catch.
#
# Runs the test files twice, on plain models and with every model replaced by a LazyClonedModel clone,
# then prints, for the tests that pass on plain models, how many hold on clones, are refused with
# SharedWeightsError (base unchanged), change the base, or break. Exit status: 0 when every test that
# passes on plain models holds or is refused, 1 otherwise.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TESTS_PARENT="$(cd "${1:?usage: $0 TESTS_PARENT VENV [OUT_DIR] [-- pytest args]}" && pwd)"
VENV="$(cd "${2:?usage: $0 TESTS_PARENT VENV [OUT_DIR] [-- pytest args]}" && pwd)"
shift 2
OUT="$(mktemp -d /tmp/diffusers-oracle.XXXXXX)"
if [[ $# -gt 0 && "$1" != "--" ]]; then OUT="$1"; shift; fi
[[ $# -gt 0 && "$1" == "--" ]] && shift
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="$VENV/bin/python"

FILES=(
  tests/models/unets/test_models_unet_2d_condition.py
  tests/models/test_attention_processor.py
)
# Hub/network, GPU-only and slow tests fail or skip on plain models here anyway: deselected for speed.
DESELECT=(
  -k "not HubLoading and not SingleFile and not IntegrationTests and not DeprecatedAttentionBlock and not ModelCompile and not HotSwap"
)

"$PY" - "$REPO" <<'EOF'
import sys, importlib.util, pathlib
import cow_model, torch, diffusers
repo = pathlib.Path(sys.argv[1]).resolve()
got = pathlib.Path(cow_model.__file__).resolve()
if repo not in got.parents:
    sys.exit(f"the venv's cow_model is {got}, not this repository's ({repo}): pip install -e {repo}")
for name in ("peft", "parameterized", "requests_mock", "pytest_timeout"):
    if importlib.util.find_spec(name) is None:
        sys.exit(f"the venv lacks {name}")
print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, cow_model from {got.parent}")
EOF

export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$REPO/tools${PYTHONPATH:+:$PYTHONPATH}"
COMMON=(-q -p no:cacheprovider --timeout 300 -W ignore::DeprecationWarning "${DESELECT[@]}" "$@")

cd "$TESTS_PARENT"
echo "plain models -> $OUT/plain.log"
nice -n 10 "$PY" -m pytest "${COMMON[@]}" --junitxml="$OUT/plain.xml" "${FILES[@]}" >"$OUT/plain.log" 2>&1 || true
tail -n 1 "$OUT/plain.log"
echo "clones -> $OUT/clone.log"
nice -n 10 "$PY" -m pytest "${COMMON[@]}" -p diffusers_oracle --oracle-report="$OUT/clone.json" \
  --junitxml="$OUT/clone.xml" "${FILES[@]}" >"$OUT/clone.log" 2>&1 || true
tail -n 1 "$OUT/clone.log"
if [[ "${ORACLE_CONTROL:-0}" == 1 ]]; then
  echo "control (models checked, not cloned) -> $OUT/control.log"
  nice -n 10 "$PY" -m pytest "${COMMON[@]}" -p diffusers_oracle --oracle-control --oracle-report="$OUT/control.json" \
    "${FILES[@]}" >"$OUT/control.log" 2>&1 || true
  "$PY" "$REPO/tools/diffusers_oracle.py" summary "$OUT/plain.xml" "$OUT/control.json" >"$OUT/control.md" || true
  echo "control: $(grep -m1 'changed the base' "$OUT/control.md" || echo 'no change') (tests that mutate their model)"
fi
echo
"$PY" "$REPO/tools/diffusers_oracle.py" summary "$OUT/plain.xml" "$OUT/clone.json" | tee "$OUT/summary.md"
