#!/bin/bash
# One batched GPU run: the steps named on the command line, in order, each under a time limit;
# every step's full output goes to $OUT/STEP.txt, its exit status and seconds print last.
#   bash bench/gpu_session.sh tests prefill kda        (KIMI_GRAPH_COMMIT: the commit to record)
# Wheels in .whl (fla-core, transformers 5.24 and its dependencies) install to /tmp/site.
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl >/dev/null 2>&1
fi
export PYTHONPATH=$PWD/bench:/tmp/site
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
SUMMARY=()

step_tests() {
  python3 -c "import transformers, fla; print('transformers', transformers.__version__, 'fla', fla.__version__)"
  timeout ${TESTS_S:-280} python3 -m pytest -v -rf --timeout 100 --durations=15 ${TESTS_FILES:-tests/test_decode_graphs_gpu.py \
    tests/test_triton_gpu.py tests/test_moe_decode_gpu.py tests/test_triton_moe_quant.py tests/test_torch_step_graphs.py \
    "tests/test_lowering_torch_compile.py::test_decode_under_cuda_graphs"} ${TESTS_K:+-k "$TESTS_K"}
}
step_prefill() { timeout 200 python3 bench/prefill_split.py --layers 27 ${PREFILL_ARGS}; }
step_mla_small() { timeout 200 python3 bench/mla_decode.py --small; }
step_kda() { timeout 330 python3 bench/kda_chunk.py --sweep; }
step_kda_check() { timeout 240 python3 bench/kda_chunk.py; }
step_lowbit() { timeout ${LOWBIT_S:-150} python3 bench/lowbit.py; }
step_fp8_chain() {     # fp8's expert layer with the tokens quantized before the permutation (untimed 2026-12-02)
  timeout 200 python3 bench/lowbit.py --formats fp8 --prefill 8192 --chain --name lowbit-fp8-chain
}
step_moe_bytes() {     # does the B=1 MoE decode kernel's time follow its bytes? (the next B=1 question)
  KIMI_GRAPH_TRITON_TUNING=$TUNING timeout 120 python3 bench/moe_decode_bytes.py
}
step_moe_forms() {     # one-token tiles of the direct MoE kernels over distinct expert sets, then the 27-layer
  # B=1 step with the fastest of them beside the tuned ones
  KIMI_GRAPH_TRITON_TUNING=$TUNING timeout 120 python3 bench/moe_decode_bytes.py --forms || return 1
  KIMI_GRAPH_TRITON_TUNING=$TUNING timeout 150 python3 bench/decode_step.py --layers 27 --batches 1 \
    --variants fused,forms-best,fused,forms-best --no-sweep --name decode_step_forms
}
forms_tuning() {       # the tuning file with the forms sweep's best one-token tiles: /tmp and $OUT/tuning-forms.json
  python3 - "$TUNING" /tmp/tuning-forms.json <<'PY' || return 1
import json, sys
sys.path.insert(0, "bench")
from moe_decode_bytes import best_tiles
t = json.load(open(sys.argv[1]))
cfg = t["configs"].setdefault("moe_decode", {})
cfg["token_tiles"] = [[1, best_tiles()]] + [b for b in cfg.get("token_tiles", []) if b[0] != 1]
json.dump(t, open(sys.argv[2], "w"), indent=1)
PY
  cp /tmp/tuning-forms.json "$OUT/"
}
step_forms_e2e() {     # moe_forms, then its fastest one-token tiles in a copy of the tuning file
  # ($OUT/tuning-forms.json), the whole model with them beside transformers (B=1 / 32, 1k / 32k),
  # the GPU decode tests with them
  step_moe_forms || return 1
  forms_tuning || return 1
  KIMI_GRAPH_TRITON_TUNING=/tmp/tuning-forms.json timeout ${E2E_S:-300} python3 bench/e2e.py --phases ours,hf \
    --prefill 1x4096 --prefill-logits last --batches 1,32 --contexts 1024,32768 --hf-batches 1,32 --graphs on \
    --name e2e-forms || return 1
  KIMI_GRAPH_TRITON_TUNING=/tmp/tuning-forms.json timeout ${TESTS_S:-220} python3 -m pytest -q -rf --timeout 100 \
    tests/test_moe_decode_gpu.py tests/test_decode_graphs_gpu.py
}
step_down_e2e() {      # the down kernel's one-step forms (moe_decode_bytes --forms --only), its best tiles in
  # a copy of the tuning file, the whole model's B=1 decode at 1k with them
  KIMI_GRAPH_TRITON_TUNING=$TUNING timeout 90 python3 bench/moe_decode_bytes.py --forms --no-ceilings \
    --only "gu 2/256/w2 xt" || return 1
  forms_tuning || return 1
  KIMI_GRAPH_TRITON_TUNING=/tmp/tuning-forms.json timeout 120 python3 bench/e2e.py --phases ours --prefill 1x1024 \
    --prefill-logits last --batches 1 --contexts 1024,32768 --graphs on --name e2e-down
}
step_final_gemv() {    # the one-row projections with x in W's tile shape: sweep into the tuning file (with
  # cublas_shapes re-chosen), then the whole model beside transformers and the GPU decode tests with it
  timeout ${GEMV_S:-130} python3 bench/gemv.py --rows 1 --variants 1,9,10,11,12,13,14,15,16 --budget 100 --use-best \
    || return 1
  cp "$TUNING" "$OUT/tuning-final.json"
  KIMI_GRAPH_TRITON_TUNING=$TUNING timeout ${E2E_S:-220} python3 bench/e2e.py --phases ours,hf \
    --prefill 1x4096 --prefill-logits last --batches 1,32 --contexts 1024,32768 --hf-batches 1,32 --graphs on \
    --name e2e || return 1
  KIMI_GRAPH_TRITON_TUNING=$TUNING timeout ${TESTS_S:-150} python3 -m pytest -q -rf --timeout 100 \
    tests/test_gemv_gpu.py tests/test_moe_decode_gpu.py tests/test_decode_graphs_gpu.py
}
step_moe_beside() {    # one MoE layer at B=1: the shared expert on a side stream beside the router
  KIMI_GRAPH_TRITON_TUNING=$TUNING timeout 100 python3 bench/moe_decode_bytes.py --beside || return 1
  KIMI_GRAPH_TRITON_TUNING=$TUNING timeout 200 python3 bench/decode_step.py --layers 27 --batches 1 \
    --variants fused,shared-beside,fused,shared-beside --no-sweep --name decode_step_beside
}
step_beside_all() {    # the shared expert beside the router (on in the tuning file): one layer, the step, its GPU
  # tests, the whole model's decode with it and through a tuning file with it off
  step_moe_beside || return 1
  python3 - "$TUNING" /tmp/tuning-plain.json <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))
t["configs"].setdefault("moe_decode", {})["shared_beside"] = 0
json.dump(t, open(sys.argv[2], "w"))
PY
  timeout 60 python3 -m pytest -q -rf tests/test_moe_decode_gpu.py -k beside || return 1
  KIMI_GRAPH_TRITON_TUNING=$TUNING timeout 200 python3 -m pytest -q -rf --timeout 150 \
    tests/test_decode_graphs_gpu.py -k "not l2_prefetch and not int4" || return 1
  for t in /tmp/tuning-plain.json "$TUNING"; do
    KIMI_GRAPH_TRITON_TUNING=$t timeout 150 python3 bench/e2e.py --phases ours --batches 1,32 --contexts 1024,32768 \
      --prefill 1x4096 --graphs on --name e2e-decode-$(basename $t .json) || return 1
  done
}
step_e2e_fp8() {       # the whole model with fp8 experts beside bf16 (prefill 1x4k / 1x16k, B=1 decode at 1k)
  KIMI_GRAPH_TRITON_TUNING=$TUNING timeout ${E2E_FP8_S:-200} python3 bench/e2e.py --phases ours --experts fp8 \
    --batches 1 --contexts 1024 --prefill 1x4096,1x16384 --prefill-logits last --graphs on --name e2e-fp8-prefill \
    || return 1
  KIMI_GRAPH_TRITON_TUNING=$TUNING timeout ${E2E_FP8_S:-200} python3 bench/e2e.py --phases ours \
    --batches 1 --contexts 1024 --prefill 1x4096,1x16384 --prefill-logits last --graphs on --name e2e-bf16-prefill
}
step_lowbit_acc() { timeout 150 python3 bench/lowbit_accuracy.py --write; }
step_decode() { timeout 150 python3 bench/decode_step.py --layers 27 --batches 1,32; }
step_e2e() { timeout 420 python3 bench/e2e.py --phases ours,hf; }
step_e2e_int4() {
  timeout 200 python3 bench/e2e.py --phases ours --experts int4 --batches 1,32 --contexts 1024 \
    --prefill 1x4096 --graphs on --name e2e-int4
}
step_decode_int4() {    # every kernel of a B=1 / 32 step with int4 experts, beside bf16's
  KIMI_GRAPH_TRITON_TUNING=$TUNING timeout 90 python3 bench/decode_step.py --layers 27 \
    --batches 1,32 --variants fused --no-sweep --name decode_step_bf16
  KIMI_GRAPH_TRITON_TUNING=$TUNING timeout ${DECODE_INT4_S:-200} python3 bench/decode_step.py --layers 27 \
    --batches 1,32 --variants fused --no-sweep --experts int4 --name decode_step_int4
}
step_int_prefill() {    # int4 / int8 prefill: the dequantizing loops against dequantized passes (moe_dequant.py)
  timeout 200 python3 bench/lowbit.py --formats int4,int8 --tokens 1 --int-prefill 4096,16384 --name lowbit-int-prefill
}
step_int4_split() {     # the int4 B=1 step kernel by kernel, beside bf16's
  KIMI_GRAPH_TRITON_TUNING=$TUNING timeout 150 python3 bench/decode_step.py --layers 27 --batches 1 \
    --variants fused --no-sweep --experts int4 --name decode_step_int4_b1
}
step_next_untimed() {  # timed 2026-12-02 04:40 (9fbba3e): the shared expert split by id, overlapped generation
  KIMI_GRAPH_TRITON_TUNING=$TUNING timeout 150 python3 bench/decode_step.py --layers 27 --batches 1,8 --experts int4 \
    --variants fused,int4-id-a8,int4-id-a8-sh4 --no-sweep --name decode_step_int4_shared_split || return 1
  KIMI_GRAPH_TRITON_TUNING=$TUNING timeout 150 python3 bench/decode_step.py --layers 27 --batches 1,8 --experts int8 \
    --variants fused,shared-split2,shared-split4 --no-sweep --name decode_step_int8_shared_split || return 1
  timeout 120 python3 -m pytest -q -x tests/test_decode_graphs_gpu.py -k overlapped || return 1
  for o in off on; do
    KIMI_GRAPH_TRITON_TUNING=$TUNING timeout 150 python3 bench/e2e.py --phases ours --batches 1,32 --contexts 1024 \
      --prefill 1x4096 --prefill-logits last --graphs on --overlap $o --name e2e-overlap-$o || return 1
  done
}
step_l2_prefetch() {   # built 2026-12-02, untimed: weights into L2 beside the latency-bound steps (prefetch.py)
  timeout 150 python3 -m pytest -q -x tests/test_decode_graphs_gpu.py -k l2_prefetch || return 1
  KIMI_GRAPH_TRITON_TUNING=$TUNING timeout 240 python3 bench/decode_step.py --layers 27 --batches 1 \
    --variants fused,l2-prefetch,l2-prefetch-16,l2-prefetch-sf,fused --no-sweep --name decode_step_l2_prefetch
}
step_compiled() {
  timeout 300 python3 bench/e2e.py --phases ours --backend torch --graphs off --batches 1,32 \
    --contexts 1024 --prefill 1x4096 --name e2e-compiled \
    --backend-options '{"compile": true, "mode": "reduce-overhead", "kernels": "triton"}'
}
step_e2e_decode() {   # ours only, decode at B=1 and 32, 1k and 32k, with the tuning file
  KIMI_GRAPH_TRITON_TUNING=$TUNING timeout 200 python3 bench/e2e.py --phases ours --batches 1,32 \
    --contexts 1024,32768 --prefill 1x4096 --graphs on --name e2e-decode
}
step_compile200() {   # the 27-layer compiled torch backend: cold / warm compile, recompiles over 200 tokens
  timeout 580 python3 bench/compile_depth.py --layers 27 --new-tokens 200 --timeout 560
}
step_compile_profile() {   # where the warm process's first compiled prefill spends its time
  timeout 300 python3 bench/compile_depth.py --layers 27 --new-tokens 16 --no-check --profile --timeout 280
}
step_attention() { timeout 240 python3 bench/attention.py --write-tuning; }     # prefill flash attention forms and tiles
step_gemv() { timeout 180 python3 bench/gemv.py --use-best; }                    # decode projections against cuBLAS
step_decode_gemv() {    # the 27-layer step with the tuning file, decode projections on cuBLAS, then on the Triton GEMV
  for g in 0 1; do
    KIMI_GRAPH_TRITON_GEMV=$g KIMI_GRAPH_TRITON_TUNING=$TUNING timeout 120 python3 bench/decode_step.py --layers 27 \
      --batches 1,32 --variants fused --no-sweep --name decode_step_gemv$g || return 1
  done
}
step_long() { timeout 400 python3 bench/e2e.py --phases long; }
step_long_prefill() {   # the long-context table: real prefills up to 128k, decode at 4k / 128k / 1M, vs all-MLA
  KIMI_GRAPH_TRITON_TUNING=$TUNING timeout ${LONG_S:-300} python3 bench/e2e.py --phases long --graphs on \
    --long-prefill 131072 --name e2e-long
}
# the final run: tiles swept first (into this GPU's tuning file), then the whole model with them
TUNING=bench/results/tuning-nvidia-h200.json
step_kda_tiles() { timeout 150 python3 bench/kda_chunk.py --sweep-only --budget ${KDA_BUDGET:-100}; }
step_decode_tiles() {   # tiles, then the model plain and (when pdl_tests passed) with dependent launches
  local variants=fused
  [ -f "$OUT/pdl_ok" ] && variants=fused,pdl
  timeout 180 python3 bench/decode_step.py --layers 27 --batches 1,32 --variants $variants --use-best
}
step_decode_pdl() {     # the model with and without dependent launches (after pdl_tests passed)
  [ -f "$OUT/pdl_ok" ] || { echo "pdl_tests did not pass"; return 1; }
  timeout 120 python3 bench/decode_step.py --layers 27 --batches 1,32 --variants fused,pdl --no-sweep \
    --name decode_step_pdl
}
step_pdl_tests() {      # the decode graph tests with every generated kernel launched dependently
  KIMI_GRAPH_TRITON_PDL=1 timeout 150 python3 -m pytest -q -rf --timeout 100 tests/test_decode_graphs_gpu.py \
    && touch "$OUT/pdl_ok"
}
step_e2e_final() {      # prefill at the issue's shapes (every / last position's logits) and decode at 1k, both sides
  KIMI_GRAPH_TRITON_TUNING=$TUNING timeout ${E2E_S:-260} python3 bench/e2e.py --phases ours,hf \
    --prefill 1x16384,32x1024 --batches 1,32 --contexts 1024 --hf-batches 1,32 --graphs on --name e2e
}
step_e2e_tuned() {
  KIMI_GRAPH_TRITON_TUNING=$TUNING timeout ${E2E_S:-280} python3 bench/e2e.py --phases ours,hf \
    --batches 1,32,256 --contexts 1024,32768 --hf-batches 1,32 --graphs on ${E2E_ARGS}
  cp $TUNING "$OUT/tuning-final.json"
}

for s in "$@"; do
  t0=$SECONDS
  "step_$s" >"$OUT/$s.txt" 2>&1
  rc=$?
  SUMMARY+=("$s rc=$rc $((SECONDS - t0))s")
  tail -n 14 "$OUT/$s.txt" | grep -v -i warn | cut -c1-300
done
printf '%s\n' "${SUMMARY[@]}"
