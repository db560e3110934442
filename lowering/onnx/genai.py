"""The onnxruntime-genai model of an export: the stateful prefill graph behind genai's
decoder interface, and its genai_config.json.

genai's decoder contract (model.type "qwen3_5_text", its hybrid linear-attention family; the
`decoder.inputs/outputs` name templates select each state kind):
  input_ids [B, T]; attention_mask [B, past + T] (int64);
  MLA layer i: past_key_values.i.key / .value [B, 1, past, (R+P)/2]: the latent cache and
               the shared key slice side by side (latent ‖ rope_key), split in two halves
               because genai gives keys and values one width (head_size); no byte wasted;
               present.i.key / .value [B, 1, past + T, (R+P)/2]: the caches grow by
               concatenation (genai's past_present_share_buffer = false);
  KDA layer i: past.i.conv [B, 3C, K-1] = the q, k and v conv states stacked on channels,
               past.i.recurrent [B, H, K, V] = the KDA state; present.i.* likewise.
Inside, the wrapper feeds our graph: cache_pos = past (the caches' length), MLA caches of
past + T rows (T zero rows appended, then written at cache_pos, as our graph does).

Padded batches: genai batches prompts of different lengths right-padded with pad_token_id,
attention_mask 0 on the pads, then appends every new token at the same cache row for the
whole batch. The wrapper makes pads inert: hidden as MLA keys; KDA decay and beta 0 on
pads (the state passes them unchanged); conv inputs zeroed on pads and the conv state taken
after each sequence's last real token (NoPE: no position depends on the padding).

States keep their dtypes at genai's boundary (genai reads them from the model): the KDA
state stays fp32 in fp16 exports, as in ours.

What this genai contract cannot express of Kimi Linear:
- a prompt that really ends in pad_token_id: genai reads trailing pad ids as padding;
- genai's shared-buffer and paged KV layouts (past_present_share_buffer, its continuous-
  batching Engine): the export uses the growing-cache contract, so each step copies the
  MLA caches (genai's cost, not a difference in results).
"""
from __future__ import annotations

from onnx import TensorProto, helper

from .emitter import ONNX_DTYPES
from .export import lower

GENAI_TYPE = "qwen3_5_text"


def _layer_of(state: str) -> tuple[int, str]:
    """'%state.l3.conv_q' -> (3, 'conv_q'); '%cache.l1.latent' -> (1, 'latent')."""
    kind, layer, what = state.lstrip("%").split(".")
    return int(layer[1:]), what


class GenaiIO:
    """The adapter `lower` calls for genai's input and output names and layouts."""

    def __init__(self, g):
        self.g = g

    @staticmethod
    def head_size(R: int, P: int) -> int:
        """genai gives keys and values one width: latent ‖ rope_key split in two halves."""
        return (R + P + 1) // 2

    def _group(self, values):
        """state input -> value, grouped per layer: {layer: {what: (value, type)}}."""
        layers: dict[int, dict] = {}
        for s, v in zip(self.g.meta["state_inputs"], values):
            layer, what = _layer_of(s)
            layers.setdefault(layer, {})[what] = (v, self.g.types[s])
        return layers

    def inputs(self, ctx, env):
        em = ctx.em
        B, T = "batch_size", "sequence_length"
        vis = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [B, T]),
               helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [B, "total_sequence_length"])]
        env["%input_ids"] = "input_ids"
        em.dim_sources = {"B": ("input_ids", 0), "T": ("input_ids", 1)}
        past = None
        for layer, st in sorted(self._group(self.g.meta["state_inputs"]).items()):
            if "latent" in st:
                (ls, lt), (rs, rt) = st["latent"], st["rope_key"]
                R, P = lt.shape[2], rt.shape[2]
                half = self.head_size(R, P)
                k, v = f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"
                for name in (k, v):
                    vis.append(helper.make_tensor_value_info(name, ONNX_DTYPES[lt.dtype],
                                                             [B, 1, "past_sequence_length", half]))
                rows = em("Squeeze", em("Concat", k, v, axis=-1), em.ints(1))              # [B, past, 2 half]
                past = past or em("Shape", k, start=2, end=3)
                for s, ty, a, e in ((ls, lt, 0, R), (rs, rt, R, R + P)):
                    zeros = em("ConstantOfShape", em("Concat", em.dim("B"), em.dim("T"), em.ints(e - a), axis=0),
                               value=ctx.zero_tensor(ty.dtype))
                    env[s] = em("Concat", em("Slice", rows, em.ints(a), em.ints(e), em.ints(2)), zeros, axis=1)
                em.dim_sources.setdefault("S", (env[ls], 1))
            if "kda" in st:
                s, ty = st["kda"]
                name = f"past.{layer}.recurrent"
                vis.append(helper.make_tensor_value_info(name, ONNX_DTYPES[ty.dtype], [B] + list(ty.shape[1:])))
                env[s] = name
                convs = [st[f"conv_{n}"] for n in "qkv"]
                C, W = convs[0][1].shape[1], convs[0][1].shape[2]
                name = f"past.{layer}.conv"
                vis.append(helper.make_tensor_value_info(name, ONNX_DTYPES[convs[0][1].dtype], [B, 3 * C, W]))
                for (s, _), part in zip(convs, em.node("Split", [name, em.ints(C, C, C)], 3, axis=1)):
                    env[s] = part
        if past is None:
            past = em("Sub", em("Shape", "attention_mask", start=1, end=2), em.dim("T"))
        env["%cache_pos"] = em("Expand", past, em.dim("B"))
        # genai left-pads batches of prompts of different lengths: pads are hidden as keys and
        # their conv inputs zeroed, so KDA's states stay zero until a sequence's first token
        # (NoPE: no position depends on the padding)
        ctx.key_valid = em("Cast", "attention_mask", to=TensorProto.BOOL)              # [B, past + T]
        ctx.token_valid = em("Slice", ctx.key_valid, em("Neg", em.dim("T")), em.ints(2 ** 62), em.ints(1))
        return vis

    def outputs(self, ctx, env, out_names):
        em, g = ctx.em, self.g
        B = "batch_size"
        logits = g.outputs[0]
        em.node("Identity", [env[logits]], outputs=["logits"])
        vis = [helper.make_tensor_value_info("logits", ONNX_DTYPES[g.types[logits].dtype],
                                             [B, "sequence_length", g.types[logits].shape[-1]])]
        for layer, st in sorted(self._group([env[v] for v in g.outputs[1:]]).items()):
            if "latent" in st:
                (lv, lt), (rv, rt) = st["latent"], st["rope_key"]
                R, P = lt.shape[2], rt.shape[2]
                half = self.head_size(R, P)
                both = em("Unsqueeze", em("Concat", lv, rv, axis=-1), em.ints(1))             # [B,1,S,R+P]
                if 2 * half > R + P:
                    both = em("Pad", both, em.ints(0, 0, 0, 0, 0, 0, 0, 1))
                for name, a, e in ((f"present.{layer}.key", 0, half), (f"present.{layer}.value", half, 2 * half)):
                    em.node("Slice", [both, em.ints(a), em.ints(e), em.ints(3)], outputs=[name])
                    vis.append(helper.make_tensor_value_info(name, ONNX_DTYPES[lt.dtype],
                                                             [B, 1, "total_sequence_length", half]))
            if "kda" in st:
                v, ty = st["kda"]
                name = f"present.{layer}.recurrent"
                em.node("Identity", [v], outputs=[name])
                vis.append(helper.make_tensor_value_info(name, ONNX_DTYPES[ty.dtype], [B] + list(ty.shape[1:])))
                convs = [st[f"conv_{n}"] for n in "qkv"]
                name = f"present.{layer}.conv"
                em.node("Concat", [c for c, _ in convs], outputs=[name], axis=1)
                C, W = convs[0][1].shape[1], convs[0][1].shape[2]
                vis.append(helper.make_tensor_value_info(name, ONNX_DTYPES[convs[0][1].dtype], [B, 3 * C, W]))
        return vis


def genai_model(model, *, ops: str = "ort", opset: int | None = None, sink=None):
    g = model.get_graph("prefill", True)
    return lower(g, model.weights, ops=ops, opset=opset, name="kimi_linear_genai", io=GenaiIO(g), sink=sink)


def genai_config(model, filename: str) -> dict:
    c = model.config
    kinds = c.layer_kinds
    eos = c.eos_ids
    return {
        "model": {
            "bos_token_id": c.bos_token_id, "context_length": c.model_max_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename, "head_size": GenaiIO.head_size(c.kv_lora_rank, c.qk_rope_head_dim), "hidden_size": c.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value",
                           "past_conv_names": "past.%d.conv", "past_recurrent_names": "past.%d.recurrent"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value", "present_conv_names": "present.%d.conv",
                            "present_recurrent_names": "present.%d.recurrent"},
                "num_attention_heads": c.num_attention_heads, "num_hidden_layers": c.num_hidden_layers,
                "num_key_value_heads": 1,
                "layer_types": ["linear_attention" if k == "kda" else "full_attention" for k in kinds],
            },
            "eos_token_id": eos[0] if len(eos) == 1 else eos, "pad_token_id": c.pad_token_id,
            "type": GENAI_TYPE, "vocab_size": c.vocab_size,
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True,
                   "length_penalty": 1.0, "max_length": c.model_max_length, "min_length": 0,
                   "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
                   "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }
