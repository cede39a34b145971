#!/usr/bin/env bash
# The GPU proof kit: proves and measures the CUDA path on one GPU in one call (docs/gpu.md).
#
#   bench/gpu_check.sh              # core: environment, pytest -m gpu, the 4-layer benchmark, one profiled step (~4 min on an H100, computed)
#   bench/gpu_check.sh --qlora      # environment + the 32-layer 4-bit (QLoRA) benchmark (~1-2 min, computed)
#   bench/gpu_check.sh --all        # core + qlora in one call
#   bench/gpu_check.sh --quick      # the 4-layer benchmark alone (a rerun)
#   bench/gpu_check.sh --dry-run    # every part on CPU with tiny shapes, same files and schema (CI: .ci/run)
#
# Output: $OUT (the device tool's output folder), or a new temporary folder: env.json, tests.json,
# bench.json, qlora.json, profile.json, report.json, results.md (rows for bench/RESULTS.md), kit.log;
# at most 8 files, what the device tool brings back. Each part runs as its own process under its
# own timeout, so one hang loses only that part; report.json says which part ended how.
# If .whl/ holds wheels (bench/gpu_wheels.sh), they are installed first into a folder put ahead
# on PYTHONPATH (the device image lacks trl, datasets, bitsandbytes and has an older transformers);
# through the device tool: run with carry [".whl"].
# PYTHON picks the interpreter (default python3). Exit status: 0 when every part ran clean.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-python3}
mode=core dry=()
for arg in "$@"; do
    case $arg in
        --dry-run) dry=(--dry-run) ;;
        --quick) mode=quick ;;
        --qlora) mode=qlora ;;
        --all) mode=all ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    esac
done
if [ ${#dry[@]} -gt 0 ]; then
    parts=(env tests bench qlora profile)
    # generous: CI machines are shared (measured on a 2-core box under load 5-8: 7-64 s a part, 40 s for tests)
    declare -A limit=([env]=120 [tests]=300 [bench]=240 [qlora]=240 [profile]=240 [report]=60)
else
    case $mode in
        core) parts=(env tests bench profile) ;;
        quick) parts=(bench) ;;
        qlora) parts=(env qlora) ;;
        all) parts=(env tests bench profile qlora) ;;
    esac
    # seconds; core worst case 45+240+150+90+30 = 555, inside the device tool's 600-second command
    # limit; --qlora 45+180+30; --all adds both and can outrun 600 s only if parts hit their limits
    declare -A limit=([env]=45 [tests]=240 [bench]=150 [profile]=90 [qlora]=180 [report]=30)
fi
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-kit.XXXXXX")}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/kit.log") 2>&1
echo "# bench/gpu_check.sh $* -> $OUT ($(date -u +%Y-%m-%dT%H:%M:%SZ))"

if [ ${#dry[@]} -eq 0 ] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check.sh: no CUDA GPU visible to $PYTHON; on a CPU machine run: bench/gpu_check.sh --dry-run" >&2
    exit 2
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
site=""
if [ ${#dry[@]} -eq 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
    site=$(mktemp -d "${TMPDIR:-/tmp}/gpu-kit-site.XXXXXX")
    echo "# installing $(ls .whl/*.whl | wc -l) carried wheels into $site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || { echo "gpu_check.sh: installing .whl/*.whl failed" >&2; exit 1; }
fi
export PYTHONPATH="${site:+$site:}$REPO${PYTHONPATH:+:$PYTHONPATH}"

rcs=()
for part in "${parts[@]}"; do
    t=${limit[$part]}
    echo "# part $part (limit ${t} s)"
    extra=()
    [ "$part" = tests ] && extra=(--timeout $((t - 30)))  # pytest stops first, so tests.json keeps what finished
    start=$SECONDS
    timeout -k 10 "$t" "$PYTHON" bench/gpu_kit/kit.py "$part" --out "$OUT" "${dry[@]}" "${extra[@]}"
    rc=$?
    echo "# part $part: exit $rc after $((SECONDS - start)) s"
    rcs+=(--rc "$part=$rc:$((SECONDS - start))")
done
timeout -k 10 "${limit[report]}" "$PYTHON" bench/gpu_kit/kit.py report --out "$OUT" "${dry[@]}" "${rcs[@]}" --command "bench/gpu_check.sh $*"
rc=$?
[ -n "$site" ] && rm -rf "$site"
echo "# files in $OUT:"
ls -l "$OUT"
echo "# report exit $rc (0: every part ran clean)"
exit $rc
