#!/usr/bin/env bash
# orch's checks that need a GPU, and the pipeline benchmark on more cores than CI has, in one go
# on a CUDA machine, each part cut off at a time limit so the whole fits a short booking.
#
#   benchmarks/gpu.sh [PART ...]     PART: tests attention moe optim pipeline offload compile
#                                    (default all)
#
# Run from anywhere with the Python that has a CUDA torch and Triton (PYTHON, default python3);
# orch comes from this checkout (PYTHONPATH), nothing is installed. Each part writes what it
# prints to $RESULTS/PART.txt (default benchmarks/results/gpu-DATE; 8 files with machine.txt)
# and stops after its time limit: PART_LIMIT_S seconds if set, else the part's own below (about
# 14 minutes in all, for the smaller grids these commands ask for; the full ones take longer).
# The optimizer benchmark compares with bitsandbytes and torchao, and the fine-tuning one with
# DeepSpeed, where they are installed; each says when they are not.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-benchmarks/results/gpu-$(date +%Y%m%d)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$RESULTS"

{
    date
    "$PY" -c "import torch, triton; print('torch', torch.__version__, '| triton',
triton.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    echo "$(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB memory"
} > "$RESULTS/machine.txt" 2>&1

run() {  # NAME SECONDS COMMAND...: COMMAND's output to $RESULTS/NAME.txt, its exit status last
    local name=$1 limit=${PART_LIMIT_S:-$2}
    shift 2
    echo "== $name (at most ${limit} s): $*"
    timeout "$limit" "$@" > "$RESULTS/$name.txt" 2>&1
    echo "== $name: exit $?" | tee -a "$RESULTS/$name.txt"
}

for part in ${*:-tests attention moe optim pipeline offload compile}; do
    case $part in
        tests) run tests 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/kernels \
            tests/offload ;;
        attention) run attention 120 "$PY" benchmarks/attention.py --seqs 1024 4096 16384 ;;
        moe) run moe 60 "$PY" benchmarks/moe_dispatch.py ;;
        optim) run optim 90 "$PY" benchmarks/optim8bit.py --device cuda --steps 10 ;;
        pipeline)  # a core per stage: 4 and 8 stages, where CI's 2 cores allow only 2; one
            # file for both, so that every part's output fits the 8 files a device call returns
            run pipeline 180 bash -c 'for p in 4 8; do "$0" benchmarks/pipeline.py --stages $p \
                --blocks 16 --rounds 2 --steps 2; done' "$PY" ;;
        offload) run offload 150 "$PY" benchmarks/offload_finetune.py --shape 1b --seq 1024 \
            --batch 2 --steps 3 ;;
        compile) run compile 120 "$PY" benchmarks/compile.py --rounds 1 --steps 12 --set \
            model.dim=1024 model.layers=8 model.heads=16 model.kv_heads=8 model.ffn_dim=2816 \
            train.seq_len=1024 model.max_seq_len=1024 train.global_batch=8 train.micro_batch=8 ;;
        *) echo "unknown part $part; parts: tests attention moe optim pipeline offload compile" >&2
           exit 2 ;;
    esac
done
echo "results in $RESULTS"
