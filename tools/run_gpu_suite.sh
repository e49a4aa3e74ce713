#!/usr/bin/env bash
# On a CUDA machine: the GPU tests, then the decode and throughput benchmarks in bf16, then the whole suite.
# Results (logs, JSON, PNG) go to $OUT (default gpu_results/). Each step has its own time limit so one slow
# step cannot starve the rest; a failing step is reported and the next one still runs.
#
#     bash tools/run_gpu_suite.sh            # the default steps, ~13 min on an H100
#     STEPS="tests decode" bash tools/run_gpu_suite.sh
#     STEPS="model340m model340m_compile" bash tools/run_gpu_suite.sh   # the 340M MFU, eager and compiled
set -uo pipefail
OUT=${OUT:-gpu_results}
STEPS=${STEPS:-"tests decode decode_hybrid decode_batched throughput model340m suite"}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run, log to $OUT/NAME.log, report the exit status
  local name=$1 limit=$2; shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  echo "=== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
$PY -c "import flash_attn; print('flash-attn', flash_attn.__version__)" 2>/dev/null | tee -a "$OUT/gpu.txt" \
  || echo "flash-attn not installed: attention runs through torch SDPA" | tee -a "$OUT/gpu.txt"

step tests 150 $PY -m pytest -q -rs -m gpu tests
step decode 200 $PY tools/bench_decode.py --device cuda --dtype bfloat16 --model --num-layers 4 --dim 256 \
  --attn-prefill-max 100000 --json "$OUT/decode_cuda.json" --plot "$OUT/decode_cuda.png"
# The distilled Flash STU (LDS + window-1024 attention blocks) from one CUDA graph against its eager step:
# the goal is ms/token flat in P and >= 5x faster ("lds-attn-graph flatness" and "tokens/s of
# lds-attn-graph / lds-attn" in the log). Prompts above 4096 get synthetic caches (SDPA's windowed
# prompt pass is O(P^2) without flash-attn); the step costs the same.
step decode_hybrid 150 $PY tools/bench_decode.py --device cuda --dtype bfloat16 --model --num-layers 4 --dim 256 \
  --methods lds-attn lds-attn-graph --prompt-lens 1024 4096 16384 65536 --attn-prefill-max 4096 \
  --json "$OUT/decode_hybrid_cuda.json" --plot "$OUT/decode_hybrid_cuda.png"
# Batched decoding: tokens/s and state memory at batch 1, 8, 64 for every decoder (LDS vs full attention).
step decode_batched 240 $PY tools/bench_decode.py --device cuda --dtype bfloat16 --model --num-layers 4 --dim 256 \
  --batch 1 8 64 --prompt-lens 1024 16384 --attn-prefill-max 4096 --new-tokens 32 --repeats 3 \
  --methods stu-naive stu-futurefill lds lds-graph attn-full attn-window lds-attn lds-attn-graph \
  --json "$OUT/decode_batched_cuda.json" --plot "$OUT/decode_batched_cuda.png"
step throughput 150 $PY tools/bench_throughput.py --device cuda --dtype bfloat16 \
  --json "$OUT/throughput_cuda.json" --plot "$OUT/throughput_cuda.png"
# The 340M configs' shapes (configs/flash_stu_340m.yaml; the Transformer here has the same MLP, 355M).
step model340m 150 $PY tools/bench_throughput.py --device cuda --dtype bfloat16 --dim 896 --num-layers 12 \
  --mlp-ratio 4.75 --vocab-size 200064 --seq-lens 8192 --batch 2 --configs model-flash model-transformer \
  --json "$OUT/throughput_340m_cuda.json"
# The same with LanguageModel(compile=True) (the MFU goal; the first step compiles). Not a default step:
# with it the suite outgrows a 15-minute device session.
step model340m_compile 300 $PY tools/bench_throughput.py --device cuda --dtype bfloat16 --dim 896 \
  --num-layers 12 --mlp-ratio 4.75 --vocab-size 200064 --seq-lens 8192 --batch 2 --compile \
  --configs model-flash model-transformer --json "$OUT/throughput_340m_compile_cuda.json"
step suite 240 $PY -m pytest -q -x -n 8 tests
