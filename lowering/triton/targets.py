"""Per-GPU targets and their tile configurations (one table; tuning files override it).

A target names a CUDA compute capability and, per kernel family, the tile sizes, warps and
pipeline stages its generated kernels are built with. "interpret" is the CPU Triton
interpreter (TRITON_INTERPRET=1): small tiles so tests cover several blocks and ragged tails.
"""
from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path

_BASE = {
    # pdl: programmatic dependent launch of every generated kernel (codegen.with_pdl; sm_90+);
    # pdl_rows: also those of graph calls of at most this many token rows (decode at small
    # batch; 0: none); pdl_trigger: where a kernel lets its successor launch: "start" (first
    # statement: successors may launch, and wait, several kernels ahead) or "wait" (once its
    # own wait has passed: one kernel ahead); pdl_kernels: the entries launched dependently
    # (empty: every one; the others still built with the prologue, so their successors start early)
    "launch": {"pdl": False, "pdl_rows": 0, "pdl_trigger": "start", "pdl_kernels": []},
    # weights into L2 beside latency-bound decode steps (prefetch.py), in graph calls of at most
    # max_rows token rows: before an item reading <= host_max_bytes of weights, the weights of the
    # first item within `ahead` reading >= min_bytes (tensors of <= max_tensor_bytes, <= max_bytes
    # in all), by `programs` programs of num_warps warps, BL lines a step; off until timed
    "l2_prefetch": {"enabled": False, "max_rows": 1, "host_max_bytes": 4 << 20, "min_bytes": 4 << 20,
                    "max_bytes": 32 << 20, "max_tensor_bytes": 1 << 30, "ahead": 2, "programs": 132,
                    "BL": 512, "num_warps": 4},
    "elementwise": {"BLOCK": 1024, "num_warps": 4, "num_stages": 1},
    # tile: elements a program normalises (rows of N: max(1, tile // pow2(N)) rows a program);
    # rows of `wide` elements (pow2) or more take num_warps_wide
    "norm": {"tile": 4096, "num_warps": 4, "wide": 4096, "num_warps_wide": 4, "num_stages": 1},
    "conv": {"BT": 32, "BC": 128, "num_warps": 4, "num_stages": 1},
    # prep_rows: rows the prep kernel takes at a time; prep_kg: how prep finds the chunk's
    # total decay for k G_L/G ("reload": a second pass over the stored k and G, "prepass": a
    # first pass over f, "inline": the whole chunk a step, no second pass; "intra": the intra kernel
    # stores it from the rows it loads); bkg_fp32: beta k G in fp32, else in the activation dtype; ftz_exp:
    # the chunk kernels' exponentials as ex2.approx.ftz (2 instructions, not 4-5);
    # KH: the slice of K the intra-chunk products take at a time; BW: W/U columns per block;
    # diag: the diagonal BC x BC blocks token-parallel ("token": kda_chunk_diag, BH heads a
    # program, diag_unroll: its columns unrolled, diag_store: its sums stored once per row
    # ("row") or column by column ("column")), a sub-chunk and head a program ("block":
    # kda_chunk_diag_block, diag_warps), inside prep ("prep": prep takes BC rows a step) or
    # inside the intra kernel ("levels": by reference rows on tensor cores; "intra": the block
    # kernel's code, saving its launch and its reads of q, k, G); diag_form: how "block",
    # "intra" and "prep" compute a sub-chunk's blocks ("columns": exp(G_i - G_j) per pair,
    # "rows": row by row from the previous row's ratios, one exponential per row and channel);
    # wu: W/U in their own kernel from a stored (I + A)^-1 ("split": kda_chunk_wu) or inside
    # the intra kernel ("fused");
    # scan_ks: rows of K a tile of the scan's state (128: one tile; 64: two, fla's layout);
    # scan_many: from this many scan programs (N x H x V/BV) on, the scan takes BV_many columns
    # and warps_many warps (packed sequences: fewer programs reloading each head's q, k, W; 0: off);
    # scan_seg: the chunk table in segments of this many chunks, each segment's scan on a side
    # stream beside the next segment's prep / diag / intra (0: one launch each; H200 2026-12-01:
    # 256 chunks 7.52 vs 7.63 ms at 64k, slower at 16k and 64x512); scan_seg_min: segments
    # only where the sequences average at least this many chunks (long single prompts: the scan's
    # few programs run long beside the other kernels; 0: wherever the table exceeds a segment);
    # BV_seg / warps_seg / stages_seg: the segmented scan's own tiles (0: the scan's; fewer stages
    # hold less shared memory: 45 KB at 2 against 100 KB at 4, so it fits beside the other kernels);
    # conv_in_prep: KDA's q/k/v convs (+ SiLU) of a prefill run inside the prep kernel (kda.ConvKDA:
    # the projections read once, only v's conv output stored), the new conv states after it (off: on
    # an H200, 2026-12-01 06:35, 0eda109, bench/kda_chunk.py --conv, 16k 3.661 vs 2.362 ms and 32x1k
    # 6.973 vs 4.386 for the conv kernel then the chunk kernels: prep at 142 registers a thread on
    # sm_90 with the convs, 56 without, so a third of the programs in flight; 80 since, untimed);
    # op_chunk: chunks of the op's chunk_size (chunk-kda{chunk-size=N}); False: of BT whatever
    # the op asks (the chunk form's results do not depend on it beyond rounding)
    "kda_chunk": {"BT": 64, "BC": 16, "BV": 32, "KH": 64, "BW": 64, "num_warps": 4, "num_stages": 2,
                  "prep_warps": 8, "prep_rows": 16, "prep_kg": "reload", "bkg_fp32": True, "ftz_exp": False,
                  "intra_warps": 4, "intra_stages": 1, "diag": "token", "BH": 4, "diag_warps": 4, "diag_unroll": False,
                  "diag_store": "row", "diag_form": "columns", "wu": "split", "wu_warps": 4, "wu_stages": 2,
                  "scan_ks": 128, "scan_many": 0, "BV_many": 64, "warps_many": 4, "scan_seg": 0,
                  "scan_seg_min": 0, "BV_seg": 0, "warps_seg": 0, "stages_seg": 0, "conv_in_prep": False,
                  "op_chunk": True},
    # fused_decode: one-token steps of up to this many sequences run the convs, f_b / g_b and the
    # step in one launch (kda_decode.py; one program a head on decode_warps warps; 0: never); up to
    # decode_early_rows sequences its state and f_b / g_b rows load before the convs; up to
    # decode_split_rows sequences each head takes decode_split programs (V columns split; on
    # decode_split_warps warps, 0: decode_warps), the q / k conv states stored by the last to finish
    "kda_recurrent": {"BV": 32, "num_warps": 4, "num_stages": 1, "fused_decode": 256, "decode_warps": 8,
                      "decode_early_rows": 16, "decode_split": 1, "decode_split_rows": 0, "decode_split_warps": 0},
    # split_min: fewest keys a split takes; small so that short contexts at small batch still
    # spread over many programs (H200 e2e, B=1, 1k context, split_min 512: two programs,
    # mla_latent_split ~80 us per MLA layer)
    # split_keys / min_splits / programs: the split count (mla.split_count); BM_small: the row
    # tile for up to small_tokens query tokens; merge_splits: the splits the merge sums a step
    # (1: one at a time; a power of two: that many loaded together); merge_cols: the latent
    # columns a merge program takes (0: all; fewer: more programs a row); merge_cols_small: the
    # same up to small_tokens query tokens (0: merge_cols)
    "mla_decode": {"BS": 64, "num_warps": 8, "num_stages": 2, "split_min": 64, "split_keys": 512,
                   "min_splits": 16, "programs": 264, "BM_small": 16, "small_tokens": 4, "merge_splits": 1,
                   "merge_cols": 0, "merge_cols_small": 0},
    # prefill flash attention (mla.flash_spec): BM queries x BN keys a step; split: the key blocks
    # below a query block's diagonal without masks, the diagonal ones masked (else all masked);
    # order: "heavy_first" (the longest query blocks of all heads start first) or "forward";
    # fold_scale: scale * log2(e) folded into q once, in q's dtype (else one FMA on the scores);
    # lazy_rescale: the growth (log2) of a row's maximum before acc is rescaled (0: every block);
    # tma: q, k, v tiles through tensor descriptors (when the tensors are 16-byte aligned);
    # overlap (with split): the next key block's scores computed before this block's softmax;
    # maxnreg: registers a thread at most (0: the compiler's choice; 128 with 8 warps: two programs an SM);
    # rope_apart: MLA's prefill keys read as k and the shared rope key (mla.SplitKeyAttention), no concat
    # key_block: cached rows whose keys and values a prefill decompresses at a time (mla.prefix_attention:
    # 16 KB a row at the published width; a longer context runs in blocks merged by log-sum-exp)
    "attention": {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 2, "split": True, "order": "heavy_first",
                  "fold_scale": False, "lazy_rescale": 0, "tma": False, "overlap": False, "maxnreg": 0,
                  "rope_apart": True, "key_block": 16384},
    # router logits: BN tokens x BE experts x BK per step, K split until ~`programs` programs run;
    # the *_small tiles serve <= small_max tokens (decode); the selection takes BR tokens a program
    # and sums select_unroll K splits' partials a step; up to fused_max tokens (<= BN_small) the
    # router is one launch (0: always two); select: the top-k's form (moe_route.SELECTIONS:
    # "argmax" three reductions a pick, "packed" one); norm_inline: the add_rmsnorm feeding the
    # router runs inside that launch; prefetch: the decode tiles' logits load each weight tile
    # one step ahead (the first before the inline norm's reads)
    "moe_route": {"BN": 64, "BE": 128, "BK": 64, "num_warps": 8, "num_stages": 3,
                  "BN_small": 16, "BE_small": 32, "BK_small": 128, "num_warps_small": 4, "num_stages_small": 2,
                  "small_max": 64, "programs": 264, "BR": 4, "select_warps": 4, "select_unroll": 4, "fused_max": 2,
                  "select": "argmax", "norm_inline": False, "prefetch": True},
    # grouped SwiGLU: *_small tiles for <= 256 rows, *_mid below mid_rows rows per expert on
    # average (each falling back to the unsuffixed key); BN_down / BK_down / num_warps_down /
    # num_stages_down: the down projection's own (else gate_up's); tma: weights (and down's h
    # rows) through tensor descriptors built on the device (true / "device") or passed from the
    # host ("host"); half: n halvings of BM as smaller tiles for an expert's last rows; ws:
    # warp-specialized loops (with tma); persistent (persistent_down: the down GEMM's): programs
    # an SM looping over the tiles (0: one program a tile; one row tile); these flags fall back
    # to the large ones for "mid" only (moe.gemm_tiles); moe_experts runs its fused form (rows
    # read by index) from fused_min_rows token copies
    "moe_gemm": {"BM": 64, "BN": 64, "BK": 64, "num_warps": 4, "num_stages": 3,
                 "BM_small": 16, "BN_small": 64, "BK_small": 64, "BM_mid": 64, "mid_rows": 256,
                 "fused_min_rows": 257},
    # quantized grouped SwiGLU (moe_quant.py): BK <= the quantization group; fp8_dot: fp8 tensor
    # cores take prefill tiles (sm_89+): True quantizes activation tiles in the main loop,
    # "w8a8" runs moe_fp8.py's kernels (activations quantized before gate_up and in its
    # epilogue; BM/BN/BK_w8a8 gate_up tiles, BN_w8a8 also down's K tile, BND_w8a8 down's N tile,
    # warps_w8a8 / warps_down_w8a8, stages_w8a8 (stages_down_w8a8: down's, 0 the same),
    # h_halves_w8a8: gate_up programs of two BN tiles, h's scale block (down's K tile) 2 BN;
    # h_pass_w8a8: h stored in the activation dtype, then quantized per 2 BN by the rows pass;
    # BMD_w8a8: down's row tile (0: BM; else a tile map of its own); QR_w8a8
    # rows and QK_w8a8 K tiles a program of the
    # quantization pass,
    # tma_w8a8: the GEMMs' operands through host tensor descriptors on sm_90+)
    # rows_max (rows_max_FMT for one format): up to that many rows (token copies), int4 / int8 take one program per (row, N
    # block) dotting the row with its expert's codes read as words (dequant.py; moe_decode's
    # loops), in BN_rows x BK_rows (gate/up) and BND_rows x BKD_rows (down) tiles (K in int4
    # columns: int8 takes half), prefetch_rows as moe_decode's prefetch; rows_kernel "w4a8": int4
    # takes moe_w4a8.py's kernels instead (codes times int8 activations by dp4a; BN_w4a8 /
    # BND_w4a8 rows, TPS_w4a8 groups a step (TPSD_w4a8 down's, if given), warps_w4a8 (and
    # warps_down_w4a8), stages_w4a8; fuse_w4a8: gate_up / down quantize their activations
    # themselves, two launches instead of four), "words": these; dequant_min_rows (dequant_min_rows_FMT
    # for one format; 0: never): from
    # that many rows int4 / int8 take moe_dequant.py, dequant_experts experts a pass written in the
    # activation dtype (BN_dequant rows x BC_dequant code columns a step, warps_dequant) and the
    # bf16 grouped GEMMs over their rows
    "moe_gemm_q": {"BM": 64, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 3,
                   "BM_small": 16, "BN_small": 32, "BK_small": 128, "fp8_dot": False,
                   "rows_max": 128, "BN_rows": 16, "BK_rows": 512, "BND_rows": 16, "BKD_rows": 512,
                   "warps_rows": 4, "stages_rows": 2, "prefetch_rows": True,
                   "rows_kernel": "words", "BN_w4a8": 32, "BND_w4a8": 32, "TPS_w4a8": 2, "warps_w4a8": 4,
                   "stages_w4a8": 3, "fuse_w4a8": False,
                   "BM_w8a8": 64, "BN_w8a8": 128, "BK_w8a8": 128, "BND_w8a8": 128, "warps_w8a8": 8,
                   "warps_down_w8a8": 4, "stages_w8a8": 3, "QR_w8a8": 16, "QK_w8a8": 1,
                   "stages_down_w8a8": 0, "h_halves_w8a8": False, "h_pass_w8a8": False,
                   "BMD_w8a8": 0,
                   "tma_w8a8": False, "dequant_min_rows": 0, "dequant_experts": 32, "BN_dequant": 16,
                   "BC_dequant": 256, "warps_dequant": 4},
    # permutation: BLOCK token copies per block (ranked SUB at a time), rows copied BD columns a
    # program; the scan takes SCAN_E experts x SCAN_B blocks a step
    "moe_permute": {"BLOCK": 1024, "SUB": 64, "BD": 256, "SCAN_E": 16, "SCAN_B": 64, "num_warps": 4,
                    "num_stages": 1},
    # routed experts read by id (decode, <= max_pairs token copies): gate/up BN rows x BK columns a
    # step per (token, expert) pair, num_warps; down BND rows x BKD columns a step per pair,
    # warps_down. Two tokens on one expert read it twice: 64 copies (8 tokens at top-8 of 256)
    # read ~1.1x the distinct experts' bytes, 128 copies ~1.25x, so larger batches go to the
    # grouped kernels. token_tiles: [[max tokens, {tile key: value}], ...]: a batch of at most that
    # many tokens (the first entry that holds it) takes those tiles over the ones above. Low-bit
    # experts: dequant "words" (32-bit words, no conversion instructions, dequant.py; prefetch:
    # the next K tile's words loaded before this one is dotted) in the tiles of quant_tiles over
    # those (K tiles in int4 columns: int8 takes half as many, the same bytes), or "elements"
    # (each weight dequantized and rounded as the op library does; fp8 always). The bf16 experts'
    # K loops (moe_decode.FORMS): acc "row" (a row sum per K step) or "tile" ([rows, K tile]
    # accumulators summed once); unroll: the loop unrolled (every load of a program issued first);
    # x_load "tile": the activation row read in the weight tile's [rows, K tile] shape (its copies
    # from L1) rather than as a vector moved to that layout through shared memory (two barriers a
    # K step, and the gate and up loads of a step one after the other); acc_down, unroll_down,
    # x_load_down: the down kernel's forms where they differ from the gate/up's; quant_token_tiles:
    # [[token_tiles bound, {tile key: value}], ...], low-bit experts' own tiles in that bucket
    # over all the above (K tiles as quant_tiles' for the word loader), quant_token_tiles_FMT
    # one format's over those;
    # quant_direct False (or a list: the formats that go by id): decode-sized low-bit batches
    # take the permuted grouped path instead (moe_gemm_q's kernels), except batches of at most
    # quant_direct_tokens[format] tokens; a8: int4 experts by id on moe_w4a8's loops (int8 activations by
    # dp4a, quantized in the kernels; moe_gemm_q's *_w4a8 tiles); shared_split: with low-bit experts,
    # the shared (float) expert's rows of an output block over that many programs a token (a power
    # of two), so its programs read about what the codes' programs read; shared_split_tokens: only
    # in token buckets (token_tiles bounds) of at most that many tokens (0: every batch);
    # shared_first: the shared expert's programs first in launch order (l2_prefetch); shared_beside:
    # in steps of up to that many tokens (0: never) the shared expert runs on a side stream beside
    # the router (its own norm, then the direct kernels alone), the routed down kernel's acc
    "moe_decode": {"BN": 16, "BK": 256, "BND": 16, "BKD": 256, "max_pairs": 64, "num_warps": 4,
                   "warps_down": 4, "num_stages": 2, "token_tiles": [], "quant_tiles": {}, "quant_token_tiles": [],
                   "dequant": "words", "prefetch": True, "acc": "row", "unroll": False, "x_load": "vector",
                   "quant_direct": True, "quant_direct_tokens": {}, "a8": False, "shared_split": 1,
                   "shared_split_tokens": 0, "shared_first": False, "shared_beside": 0},
    # dense projections of up to max_rows rows (lowering/triton/gemv.py; larger take cuBLAS):
    # enabled: the kernel in place of cuBLAS (env KIMI_GRAPH_TRITON_GEMV=1/0 overrides); BN output
    # columns x BK a step per program, K split until ~`programs` programs (at most max_split);
    # dot_min_rows rows and more take tl.dot on 16-row tiles; norm_pass: a norm inline in one pass
    # ("one": rstd applied to the fp32 sums) or two ("two": rstd first, the normalised row rounded
    # as rmsnorm_rows rounds it); cublas_shapes: weight shapes ([N, K], [H, N, R]) left to cuBLAS;
    # head_matmul (w [H, N, R], contiguous along R) in BK_heads x BN_heads tiles; token_tiles as
    # moe_decode's
    "gemv": {"enabled": False, "max_rows": 16, "BN": 16, "BK": 512, "num_warps": 4, "num_stages": 2,
             "programs": 528, "max_split": 8, "dot_min_rows": 2, "norm_pass": "one", "cublas_shapes": [],
             "BN_heads": 64, "BK_heads": 128, "token_tiles": []},
}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for fam, cfg in over.items():
        out.setdefault(fam, {}).update(cfg)
    return out


TARGETS: dict[str, dict] = {
    "sm_80": {"arch": 80, "gpu": "A100", "configs": _merge(_BASE, {
        "attention": {"BM": 128, "BN": 64, "num_warps": 8, "num_stages": 3},
        "moe_gemm": {"BM": 64, "BN": 128, "BK": 32, "num_warps": 4, "num_stages": 4}})},
    "sm_89": {"arch": 89, "gpu": "L40S / RTX 4090", "configs": _merge(_BASE, {
        "moe_gemm_q": {"fp8_dot": True},
        "attention": {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 2},
        "moe_gemm": {"BM": 64, "BN": 64, "BK": 64, "num_warps": 4, "num_stages": 3}})},
    # sm_90: decode tiles from sweeps on an H100 (bench/results/*.json)
    "sm_90": {"arch": 90, "gpu": "H100 / H200", "configs": _merge(_BASE, {
        # kda chunk: the best of bench/kda_chunk.py --sweep on an H200 (2026-12-01 03:31, 52bf8c9:
        # 16k 1.95 ms, 64x512 3.78 ms; the previous defaults 2.07 / 4.24 in the same sweep: token-
        # parallel diagonal blocks 8 heads a program on 2 warps, the many-program scan 128 wide)
        # op_chunk False: the model's chunk-kda{chunk-size=64} ran these BT=32 tiles at BT=64 (the
        # 21:26 sweep's BT 64: 3.26 ms at 16k, 7.27 at 64x512 against 2.40 / 4.91; the 27-layer
        # 32x1k prefill's KDA 129.9 -> 89.4 ms at BT=32); the scan in segments of 256 chunks where the
        # sequences average 1024 (32k tokens): 64k 7.530 vs 7.617 ms, the other shapes alike (H200,
        # 2026-12-01 06:18, fcc64ad, kda_chunk_sweep-64k.json; 7.52 vs 7.63 in the 04:17 run); the many-
        # program scan from 4096 programs (was 1024): 8x4k 3.946 vs 4.037 ms, 16k 1.939 vs 1.935 (H200,
        # 2026-12-02 01:08, 580d049, kda_chunk_sweep-ab.json; segments from 128 chunks a sequence
        # gave 8x4k 3.905 but 16k 2.062)
        "kda_chunk": {"BT": 32, "BV": 32, "KH": 128, "BW": 128, "BH": 8, "diag": "token", "diag_unroll": False,
                      "diag_store": "column", "wu": "fused", "num_warps": 4, "num_stages": 4, "prep_warps": 4,
                      "prep_rows": 4, "bkg_fp32": False, "ftz_exp": True, "diag_warps": 2, "intra_warps": 2,
                      "intra_stages": 1, "wu_warps": 2, "wu_stages": 2, "scan_many": 4096, "BV_many": 128,
                      "warps_many": 8, "op_chunk": False, "scan_seg": 256, "scan_seg_min": 1024,
                      "stages_seg": 2, "warps_seg": 2},
        # (the segmented scan on 2 warps, 2 stages: 64k 7.321 vs 7.589 ms, H200 2026-12-02 03:12, afa5b78,
        # kda_chunk_sweep-seg-stages.json; 2 stages alone 8.146, 3 stages 7.574)
        # decode_early_rows 0, prefetch False (router): untimed on a GPU yet, so off here; the step's V
        # columns over 4 programs a head on 4 warps up to 8 sequences: its kernel 0.146 vs 0.209 ms a
        # 27-layer B=1 step, 0.431 vs 0.440 at B=8 (H200 2026-12-02 03:10, afa5b78, decode_step_kda_split.json)
        "kda_recurrent": {"BV": 64, "num_warps": 4, "decode_early_rows": 0, "decode_split": 4,
                          "decode_split_rows": 8, "decode_split_warps": 4},
        "attention": {"BM": 128, "BN": 64, "num_warps": 8, "num_stages": 3},
        # decode projections: bench/gemv.py on an H200 (2026-11-30 23:44, 9f3f49a) won at one row
        # only, and lost where the norm rides on the wide fused projections (left to cuBLAS);
        # the 27-layer B=1 step 3.11 -> 2.92 ms in e2e (2026-12-01 01:16, 825dd84)
        "gemv": {"enabled": True, "max_rows": 1,
                 "cublas_shapes": [[12576, 2304], [6720, 2304], [18432, 2304], [163840, 2304]],
                 "token_tiles": [[1, {"BN": 8, "BK": 512, "num_warps": 4, "programs": 528}]]},
        # bench/mla_decode.py --small on an H200 (2026-11-30): BM 16 at B=1 (32k: 43 vs 54 us),
        # BM 32 at B=32 (32k: 408 vs 492 us, 70% of the copy rate)
        # merge_splits 16: B=1 at 32k 41.3 vs 42.8 us, at 1k even (16.3 / 16.2; H200 2026-12-01,
        # e43d28b, bench/results/mla_decode_merge.json)
        # merge_cols_small 64 and split_keys 256: B=1 at 32k 33.9 vs 41.5 us (132 splits, the merge
        # over 8 column blocks), at 1k 15.3 vs 16.4; B=32 kept whole rows (1k 38.8 vs 49.0 us with
        # 64 columns; H200 2026-12-02 05:05, c3dbe73, bench/results/mla_decode_variants.json)
        "mla_decode": {"BS": 64, "num_warps": 4, "num_stages": 2, "BM": 32, "merge_splits": 16,
                       "split_keys": 256, "merge_cols_small": 64},
        # router: best of bench/moe_dispatch.py's sweep on an H200 (2026-11-30); the packed top-k with
        # the norm inside its launch: the 27-layer B=1 step 2.948 -> 2.911 ms, 311 -> 285 launches
        # (H200, 2026-12-01 03:35, e43d28b, bench/results/decode_step_forms27.json)
        "moe_route": {"BN": 128, "BE": 128, "BR": 1, "select_warps": 2, "select": "packed", "norm_inline": True,
                      "prefetch": False},
        # grouped SwiGLU: the best of bench/moe_swiglu.py --sweep on an H200 (2026-12-01 03:35,
        # f3ac10f): large (16k / 32k tokens) host descriptors, half tiles, down BN 256: 3.695 /
        # 6.784 ms, was 4.047 / 7.491 (547 TFLOP/s at 32k, 0.81x dense cuBLAS); mid (4k) the same
        # with 4 stages: 1.281 ms, was 1.402; mid down BN 256 from the final run's sweep (04:17,
        # 7c42f55): 4k 1.220 ms against 1.328 (16k: 3.714 against 3.729, kept)
        "moe_gemm": {"BM": 128, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3,
                     "BN_small": 64, "BK_small": 64, "BM_mid": 128,
                     "tma": "host", "half": 1, "BN_down": 256, "num_stages_mid": 4, "num_stages_down_mid": 4,
                     "BN_down_mid": 256},
        # quantized: BN_small 64 is the best swept decode tile at 4-16 tokens for int4/int8/fp8
        # (bench/lowbit.py on an H200, 2026-11-30: 1.4-2.1x the 32-row default)
        "moe_gemm_q": {"BM": 128, "BN": 128, "BK": 128, "num_warps": 8, "num_stages": 3, "fp8_dot": True,
                       "BN_small": 64,
                       # per-row word kernels: the best of bench/lowbit.py on an H200 (2026-12-01 01:18,
                       # 825dd84) at 1, 4 and 16 tokens for int4 and int8 (int4 1 token 24.6 us, the
                       # 16 x 512 tiles 37.7 us)
                       "BN_rows": 32, "BK_rows": 256, "BND_rows": 32, "BKD_rows": 256, "warps_rows": 4,
                       # int4 decode with int8 activations by dp4a: bench/lowbit.py on an H200 (2026-12-01
                       # 03:50, 8ef44f4) at 1 / 4 / 16 tokens 13.8 / 40.5 / 122.3 us = 3.73x / 3.29x / 3.01x
                       # our bf16 kernel (the word kernels above: 24.6 / 85.0 / 291.2), 1.6e-2 from weight-only
                       "rows_kernel": "w4a8", "BN_w4a8": 16, "BND_w4a8": 16, "TPS_w4a8": 4,
                       # and up to 256 rows (B=32 at top-8): the 27-layer int4 step at B=32 9.99 ms, was
                       # 19.9 on the small dequant tiles (H200, 2026-12-02 00:53, 7596155, e2e-int4-*.json)
                       "rows_max_int4": 256,
                       # fp8 prefill on the W8A8 kernels (moe_fp8.py): H200 (2026-12-01 04:20, 7c42f55) 8k tokens
                       # 1817 us = 1.12x our bf16 kernel, 511 TFLOP/s, err 4.3e-2 (fp8_dot True: 4990 us)
                       "fp8_dot": "w8a8", "BN_w8a8": 64,
                       # h stored by gate_up and quantized per 128 columns by a pass, so down's K tile is
                       # 128 (H200 2026-12-02 08:02, 56d3b8d, lowbit-fp8-graph.json, CUDA-graph replays):
                       # 8k tokens 1.589 vs 1.664 ms with TMA, down 0.447 vs 0.624 ms
                       "h_pass_w8a8": True,
                       # gate_up on 128-row tiles (8 warps), down on its own 64-row tiles: 8k tokens
                       # 1.623 vs 1.657 ms replayed, kernels 1.572 vs 1.633 (08:23, f634bd1, lowbit-fp8-final.json)
                       "BM_w8a8": 128, "warps_w8a8": 8, "BMD_w8a8": 64,
                       # the GEMMs' operands through host tensor descriptors: 1.664 vs 1.906 ms (same run)
                       "tma_w8a8": True,
                       # prefill-sized int8 / int4 through passes of dequantized experts and the bf16
                       # grouped GEMMs (moe_dequant.py): bench/lowbit.py --int-prefill on an H200
                       # (2026-12-02 03:00, 36815fd, lowbit-int-prefill.json), one MoE layer: int8 4k
                       # tokens 3.05 vs 4.00 ms, 16k 5.37 vs 11.83; int4 16k 17.75 vs 39.2 (4k: 15.5
                       # vs 10.9, so int4 from 16k tokens only); error 3.4-3.8e-3 (the loops: 2.3e-3)
                       "dequant_min_rows": 4096 * 8, "dequant_min_rows_int4": 16384 * 8},
        # direct decode experts: the best of bench/decode_step.py's sweep on an H200 (2026-11-30;
        # one MoE layer at B=1 in 46 us, 65% of the copy rate over the experts read); one or two
        # tokens: the best at B=1 of that sweep (gate_up 25.2 us, was 30.5; down 13.3, was 14.8)
        "moe_decode": {"BN": 16, "BK": 256, "num_warps": 4, "BND": 32, "BKD": 256, "warps_down": 4,
                       "token_tiles": [[2, {"BN": 8, "BK": 512, "num_warps": 4, "BND": 8, "BKD": 1024,
                                            "warps_down": 4}]],
                       # low-bit experts by id: the best of bench/lowbit.py on an H200 (2026-12-01 01:18,
                       # 825dd84) at 1-8 tokens for int4 and int8 (int4 1 token 26.8 us, 16 x 512 38.1 us)
                       # (with their own warps: the float experts' 1-2 token tiles run on 2, which
                       # the int4 tiles were not swept on)
                       "quant_tiles": {"BN": 32, "BK": 512, "BND": 32, "BKD": 512, "num_warps": 4,
                                       "warps_down": 4},
                       # int4 experts take the permuted W4A8 kernels above one token: the 27-layer
                       # step at B=1 / 2 / 8 2.778 / 3.283 / 4.624 ms, by id 3.133 / 3.822 / 7.32 (a8 by
                       # id 2.784 / 3.378 / 6.126; bf16 2.964 / 3.842 / 8.665; same run as rows_max_int4)
                       "quant_direct": ["int8", "fp8"],
                       # one or two tokens: the shared bf16 expert's rows over 4 programs beside low-bit
                       # experts by id, and int4 at one token by id on the dp4a loops: the 27-layer B=1
                       # step's kernels 2.210 ms (replay 2.544) against the permuted 2.404 (2.836); int8
                       # 2.466 against 2.591 ms (B=8 with the split: 7.638 against 7.287, so not above 2
                       # tokens; H200, 2026-12-02 04:44, 9fbba3e, decode_step_int*_shared_split.json)
                       "quant_direct_tokens": {"int4": 1}, "a8": True, "shared_split": 4, "shared_split_tokens": 2,
                       # one token: the shared expert on a side stream beside the router: one layer
                       # 49.9 / 51.0 -> 48.7 / 48.6 us, the 27-layer step 2.640 / 2.631 -> 2.603 / 2.585
                       # ms, bench/e2e.py B=1 1k 2.621 -> 2.577 ms (32k 2.762 -> 2.707); H200,
                       # 2026-12-02 12:00, 9f6ab39, moe_decode_beside.json, decode_step_beside.json
                       "shared_beside": 1}})},
    "interpret": {"arch": None, "gpu": "Triton interpreter (CPU)", "configs": _merge(_BASE, {
        "elementwise": {"BLOCK": 64},
        "conv": {"BT": 8, "BC": 16},
        "norm": {"tile": 128},
        "kda_chunk": {"BT": 32, "BC": 16, "BV": 16, "KH": 16, "BW": 16, "conv_in_prep": True},
        "kda_recurrent": {"BV": 16},
        "mla_decode": {"BS": 16, "split_min": 16},
        "attention": {"BM": 16, "BN": 16},
        "moe_route": {"BN": 64, "BE": 16, "BK": 16, "BN_small": 16, "BE_small": 16, "BK_small": 16,
                      "small_max": 4, "programs": 8, "BR": 32},
        "moe_gemm": {"BM": 16, "BN": 16, "BK": 16, "BM_small": 16, "BN_small": 16, "BK_small": 16, "BM_mid": 16,
                     "fused_min_rows": 24},
        "moe_gemm_q": {"BM": 16, "BN": 16, "BK": 32, "BM_small": 16, "BN_small": 16, "BK_small": 32,
                       "BN_rows": 16, "BK_rows": 32, "BND_rows": 16, "BKD_rows": 16,
                       "BM_w8a8": 16, "BN_w8a8": 16, "BK_w8a8": 32, "BND_w8a8": 16, "QR_w8a8": 8,
                       "BN_w4a8": 16, "BND_w4a8": 16, "BN_dequant": 4, "BC_dequant": 16},
        "moe_permute": {"BLOCK": 64, "SUB": 16, "BD": 32, "SCAN_E": 4, "SCAN_B": 4},
        # max_pairs: the tiny model's decode steps and short chunks read experts by id, its
        # prefills of a few sequences (> 16 token copies) take the grouped kernels
        "gemv": {"max_rows": 4, "BN": 8, "BK": 16, "programs": 8},
        "moe_decode": {"BN": 8, "BK": 16, "BND": 16, "BKD": 8, "max_pairs": 16,
                       "token_tiles": [[2, {"BN": 16, "BK": 32, "BND": 8, "BKD": 16, "num_warps": 2}]]}})},
}

TUNING_ENV = "KIMI_GRAPH_TRITON_TUNING"     # a tuning file written by `write_tuning`


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def parse_targets(spec: str) -> list[str]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in TARGETS or n == "interpret"]
    if not names or bad:
        raise ValueError(f"unknown target(s) {bad or spec!r}; known: "
                         f"{', '.join(t for t in TARGETS if t != 'interpret')}")
    return names


def current_target() -> str:
    """The target of this process: the interpreter, or the GPU's sm_XX (nearest known below)."""
    if interpreting():
        return "interpret"
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError("the triton backend needs a CUDA GPU, or TRITON_INTERPRET=1 on CPU")
    major, minor = torch.cuda.get_device_capability()
    cc = 10 * major + minor
    known = sorted((t["arch"], n) for n, t in TARGETS.items() if t["arch"] is not None)
    below = [n for a, n in known if a <= cc]
    if not below:
        raise RuntimeError(f"GPU compute capability {cc} is older than every target ({known})")
    return f"sm_{cc}" if f"sm_{cc}" in TARGETS else below[-1]


def load_tuning(path: str | Path | None) -> dict:
    """A tuning file's per-family configs ({} when none): {"device", "arch", "configs"}. Parsed
    once per version of the file (config() asks on every launch that sizes a grid)."""
    path = path or os.environ.get(TUNING_ENV)
    if not path:
        return {}
    stat = Path(path).stat()
    return _parsed_tuning(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _parsed_tuning(path: str, mtime_ns: int, size: int) -> dict:
    data = json.loads(Path(path).read_text())
    if "configs" not in data:
        raise ValueError(f"{path}: not a tuning file (no 'configs')")
    return data


def config(family: str, target: str | None = None, tuning: dict | None = None) -> dict:
    """The tile configuration of one kernel family on a target (tuning file applied)."""
    target = target or current_target()
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}")
    cfg = dict(TARGETS[target]["configs"][family])
    tuning = load_tuning(None) if tuning is None else tuning
    if tuning and tuning.get("arch") == TARGETS[target]["arch"]:
        cfg.update(tuning["configs"].get(family, {}))
    return cfg


def write_tuning(path: str | Path, device: str, arch: int, configs: dict, notes: dict | None = None) -> Path:
    """Write a per-device tuning file: {family: {param: value}} measured on `device` (sm_`arch`);
    `kimi-graph compile --tuning FILE` applies it to that arch and ships it."""
    try:
        import triton
        version = triton.__version__
    except ImportError:
        version = None
    unknown = set(configs) - set(_BASE)
    if unknown:
        raise ValueError(f"unknown kernel families {sorted(unknown)}; known: {sorted(_BASE)}")
    path = Path(path)
    path.write_text(json.dumps({"device": device, "arch": arch, "triton_version": version,
                                "configs": configs, "notes": notes or {}}, indent=1))
    return path
