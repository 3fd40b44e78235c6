#!/usr/bin/env bash
# orch's checks that need a GPU, and the pipeline benchmark on more cores than CI has, in one go
# on a CUDA machine, each part cut off at a time limit so the whole fits a short booking.
#
#   benchmarks/gpu.sh [PART ...]           PART: tests attention moe optim pipeline offload
#                                          compile (default all)
#   benchmarks/gpu.sh --print [PART ...]   print each part's commands, run nothing
#
# Run from anywhere with the Python that has a CUDA torch and Triton (PYTHON, default python3);
# orch comes from this checkout (PYTHONPATH), nothing is installed. Without a CUDA device it
# stops before running anything (exit 1), as it does for an unknown part (exit 2). Each part
# writes what it prints to $RESULTS/PART.txt (default benchmarks/results/gpu-DATE-DEVICE, such
# as gpu-20260101-h100-80gb-hbm3; 8 files with machine.txt; a folder that holds files already
# is refused, so a second run never overwrites the first) and stops after its time limit:
# PART_LIMIT_S seconds if set, else the part's own below (about 14 minutes in all, for the
# smaller grids these commands ask for; the full ones take longer). A part fails when any of
# its commands does; the script then exits 1 after the other parts, naming the failed ones.
# The attention part times orch's kernels against torch SDPA's flash backend, then within packed
# documents of about 1,024 tokens against SDPA with the block-causal mask (--documents). The
# attention benchmark compares with flash-attn too, the optimizer one with bitsandbytes and
# torchao, and the fine-tuning one with DeepSpeed, where they are installed; each says when they
# are not.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PARTS=(tests attention moe optim pipeline offload compile)
declare -A LIMIT_S=([tests]=150 [attention]=120 [moe]=60 [optim]=90 [pipeline]=180 [offload]=150
                    [compile]=120)

known() {  # PART: whether it is one of PARTS (compared as text: a name is never evaluated)
    local name
    for name in "${PARTS[@]}"; do [[ $1 == "$name" ]] && return 0; done
    return 1
}

command_line() { echo "$*"; }  # one command's Python arguments (no word holds a space)

commands() {  # PART: the Python arguments of each command PART runs, one command a line
    case $1 in
        tests) command_line -m pytest -q -p no:cacheprovider -m gpu tests/kernels tests/offload ;;
        attention)  # the kernels against SDPA's flash backend, then within packed documents
            command_line benchmarks/attention.py --seqs 1024 4096 16384
            command_line benchmarks/attention.py --documents 1024 --seqs 8192 16384 ;;
        moe) command_line benchmarks/moe_dispatch.py ;;
        optim) command_line benchmarks/optim8bit.py --device cuda --steps 10 ;;
        pipeline)  # a core per stage: 4 and 8 stages, where CI's 2 cores allow only 2; one
            # file for both, so that every part's output fits the 8 files a device call returns
            for stages in 4 8; do
                command_line benchmarks/pipeline.py --stages "$stages" --blocks 16 --rounds 2 \
                    --steps 2
            done ;;
        offload) command_line benchmarks/offload_finetune.py --shape 1b --seq 1024 --batch 2 \
            --steps 3 ;;
        compile) command_line benchmarks/compile.py --rounds 1 --steps 12 --set model.dim=1024 \
            model.layers=8 model.heads=16 model.kv_heads=8 model.ffn_dim=2816 \
            train.seq_len=1024 model.max_seq_len=1024 train.global_batch=8 train.micro_batch=8 ;;
    esac
}

# Runs one part's commands in turn (each line word-split, no globbing) and exits with the last
# failure's status, so that the 8-stage pipeline run's success does not hide the 4-stage one's
# failure.
# shellcheck disable=SC2016  # expanded by the inner bash
RUN_ALL='set -f; status=0
for args; do
    echo "== $0 $args"
    "$0" $args || { status=$?; echo "== exit $status: $0 $args"; }
done
exit $status'

run() {  # PART: its commands, output to $RESULTS/PART.txt, its exit status last; returns it
    local part=$1 limit=${PART_LIMIT_S:-${LIMIT_S[$1]}} status lines why=""
    mapfile -t lines < <(commands "$part")
    echo "== $part (at most ${limit} s)"
    timeout "$limit" bash -c "$RUN_ALL" "$PY" "${lines[@]}" > "$RESULTS/$part.txt" 2>&1
    status=$?
    ((status == 124)) && why=" (cut off at the ${limit} s limit)"
    echo "== $part: exit $status$why" | tee -a "$RESULTS/$part.txt"
    return "$status"
}

if (($#)) && [[ $1 == --print ]]; then print=1; shift; else print=0; fi
if (($#)); then parts=("$@"); else parts=("${PARTS[@]}"); fi
unknown=()
for part in "${parts[@]}"; do
    known "$part" || unknown+=("'$part'")
done
if ((${#unknown[@]})); then
    echo "gpu.sh: unknown part ${unknown[*]}; parts: ${PARTS[*]}" >&2
    exit 2
fi
if ((print)); then
    for part in "${parts[@]}"; do
        commands "$part" | while read -r line; do printf '%s: %q %s\n' "$part" "$PY" "$line"; done
    done
    exit 0
fi

# The device's name, or why there is none (on stderr, exit 1).
CUDA_DEVICE='import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device: " + (
        "a CPU-only build" if torch.version.cuda is None else
        "no GPU visible (driver, CUDA_VISIBLE_DEVICES?)"))
print(torch.cuda.get_device_name())'
if ! device=$("$PY" -c "$CUDA_DEVICE"); then
    echo "gpu.sh: no CUDA device for $PY (above); run it on a GPU machine, with PYTHON set to a" \
        "Python whose torch has CUDA" >&2
    exit 1
fi
device=${device##*$'\n'}  # the name is the last line
# "NVIDIA H100 80GB HBM3" -> h100-80gb-hbm3: runs on two kinds of GPU on one day keep apart
slug=$(echo "${device,,}" | sed -E 's/^nvidia //; s/[^a-z0-9]+/-/g; s/^-+|-+$//g')
RESULTS=${RESULTS:-benchmarks/results/gpu-$(date +%Y%m%d)-${slug:-gpu}}
if [[ -d $RESULTS && -n $(ls -A "$RESULTS") ]]; then
    echo "gpu.sh: $RESULTS holds results already (an earlier run on this device today?): move" \
        "them away, or set RESULTS to a new folder" >&2
    exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$RESULTS"

{
    date
    "$PY" -c "import torch, triton; print('torch', torch.__version__, '| triton',
triton.__version__, '|', torch.cuda.get_device_name())"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    echo "$(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB memory"
} > "$RESULTS/machine.txt" 2>&1

failed=()
for part in "${parts[@]}"; do
    run "$part" || failed+=("$part")
done
echo "results in $RESULTS"
if ((${#failed[@]})); then
    echo "gpu.sh: failed: ${failed[*]} (see their files in $RESULTS)" >&2
    exit 1
fi
