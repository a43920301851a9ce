#!/usr/bin/env bash
# The checks that need a GPU machine, in one go (the device tool's lease is short):
#   1. tests/train/test_gpu.py: NCCL with one GPU per rank, two ranks sharing a GPU (gloo),
#      async mode on CUDA against the CPU result;
#   2. issue 13: a 1-rank NCCL smoke run, and benchmarks/throughput.py (shared-memory
#      all-reduce vs gloo) with 2, 4 and 8 CPU ranks;
#   3. the async benchmarks on that machine's CPUs (more cores than a laptop or CI box):
#      ps_throughput.py and convergence.py (conv model, compute straggler; Adam and SGD);
#   4. issue 14: examples/char_lm.py on the GPUs in both modes.
# Usage: benchmarks/gpu_checks.sh OUT_DIR   (needs torch with CUDA, ray, pytest on the path)
#   GPU_CHECKS_STEPS="gpu_tests conv_adam"  run only these steps
#   GPU_CHECKS_DEADLINE_S=540               the whole script's time; later steps get what is left
# Every step writes into OUT_DIR and a tarball of it is refreshed after each step, so a run
# cut short still leaves what it finished.
set -u
out=${1:?usage: benchmarks/gpu_checks.sh OUT_DIR}
res=$(mktemp -d)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
cpus=$(nproc)
quick=${GPU_CHECKS_QUICK:+--quick}  # a smoke run of the script itself: the benchmarks' --quick
save() { tar czf "$out/results.tgz" -C "$res" . ; }
deadline=${GPU_CHECKS_DEADLINE_S:-100000}  # seconds for the whole script: later steps get what is left
step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2; shift 2
    if [[ -n ${GPU_CHECKS_STEPS:-} && " $GPU_CHECKS_STEPS " != *" $name "* ]]; then return; fi
    local left=$((deadline - SECONDS - 5))
    if (( left < limit )); then limit=$left; fi
    if (( limit < 20 )); then echo "== $name skipped: ${left}s left"; return; fi
    local t0=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$res/$name.log" 2>&1
    echo "rc=$? after $((SECONDS - t0)) s" | tee -a "$res/$name.log"
    tail -n 25 "$res/$name.log"
    save
}
{ nvidia-smi -L; echo "cpus=$cpus"; python3 -c 'import torch, ray; print("torch", torch.__version__, "ray", ray.__version__, "cuda", torch.cuda.is_available())'; } > "$res/env.log" 2>&1
cat "$res/env.log"
step gpu_tests 140 python3 -m pytest -q tests/train/test_gpu.py tests/train/test_gpu_sharing.py
# issue 13: the shared-memory all-reduce on this machine's CPUs with 2, 4, 8 ranks (the GPU path:
# tests/train/test_shm_sync.py::test_a_gpu_rank_keeps_nccl, a 1-rank NCCL run)
step nccl_smoke 90 python3 -m pytest -q tests/train/test_shm_sync.py -k gpu_rank_keeps_nccl
step shm_cpu 330 bash -c 'for w in 2 4 8; do python3 benchmarks/throughput.py --workers $w --models digits,mlp \
    --steps 30 --rounds 1 --blocks 8 '"$quick"' --name throughput_cpu_w$w --out-dir "'"$res"'/shm"; done'
step ps_throughput 120 python3 benchmarks/ps_throughput.py --steps 100 $quick --num-cpus "$cpus" --out "$res/ps"
step conv_adam 200 python3 benchmarks/convergence.py --model conv --straggler compute --optimizer adam \
    --epochs 6 --repeats 3 $quick --num-cpus "$cpus" --name conv_adam --out "$res/conv_adam"
step conv_sgd 200 python3 benchmarks/convergence.py --model conv --straggler compute --optimizer sgd \
    --epochs 6 --repeats 3 $quick --num-cpus "$cpus" --name conv_sgd --out "$res/conv_sgd"
# issue 14: the language-model example on the GPUs (use_gpu="auto": a GPU per worker), both modes;
# each run prints its validation loss, the figure for docs/benchmarks.md
step char_lm_sync 150 python3 examples/char_lm.py --mode sync --workers 2 --steps 600 --job-name gpu-char-lm-sync
step char_lm_async 150 python3 examples/char_lm.py --mode async --workers 2 --staleness 4 --steps 600 \
    --job-name gpu-char-lm-async
echo "results: $out/results.tgz"
