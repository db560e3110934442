#!/bin/bash
# This session's one GPU run (~240 s): correctness of the new kernels on the GPU first, then the
# whole-model decode step, prefill, and the torch backend's CUDA graphs. Prints as it goes.
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1
export PYTHONPATH=$PWD/bench
export OUT=${OUT:-/tmp/out}
# t SECONDS CMD...: run with a time limit; the step's exit status and seconds print whatever
# the filter after it keeps (they go to stderr)
t() { local s=$SECONDS; timeout "$@"; echo "[rc=$? $((SECONDS-s))s] ${*:2:4}" >&2; }
t 60 python3 -m pytest -q -x tests/test_decode_graphs_gpu.py "tests/test_triton_gpu.py::test_moe_experts_batch_equals_alone" "tests/test_triton_gpu.py::test_kernel_bf16_against_fp64" 2>/dev/null | grep -E "passed|failed|Error|assert" | tail -6
t 85 python3 bench/decode_step.py --layers 27 --batches 1,32 --no-sweep 2>&1 | grep -v Warning | tail -22
t 55 python3 bench/prefill.py --no-sweep 2>&1 | grep -v Warning | tail -22
t 35 python3 -m pytest -q tests/test_torch_step_graphs.py "tests/test_lowering_torch_compile.py::test_decode_under_cuda_graphs" 2>/dev/null | grep -E "passed|failed|Error" | tail -4
ls $OUT
