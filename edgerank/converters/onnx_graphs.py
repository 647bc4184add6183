"""ONNX graphs of one transformer layer, built node by node with ``onnx.helper``.

Each layer is its own graph, so the runtime can run candidates layer by layer, keep their
hidden states between layers, feed a shared attention prefix and drop candidates.

Decoder layer (Llama / Qwen2 / Qwen3, pre-norm, rotary, grouped-query attention)::

    inputs   hidden [B,T,H]  cos, sin [B,T,D]  mask [B,1,1,T,T] (additive, causal+padding)
             past_key, past_value [1,KVH,1,P,D]   (the shared prefix, already rotated)
    outputs  hidden_out [B,T,H]   key, value [B,KVH,1,T,D]   (this call's own keys/values)

Every candidate attends to the prefix keys (shared, not copied per candidate) and to its
own earlier tokens; one softmax spans both, so the result equals a full forward of
prefix + candidate. ``P`` may be 0 (the prefix pass itself, or no shared prefix).

Encoder layer (BERT / XLM-R, post-norm)::

    inputs   hidden [B,T,H]  mask [B,1,1,T] (additive, padding)
    outputs  hidden_out [B,T,H]

Each weight projection has one of three forms (``bits(name)`` picks it):

- ``4`` / ``8``: ``MatMulNBits`` (com.microsoft) with int4/int8 block codes
  (``converters.quantize``): the least memory; ORT's kernels unpack the codes per block;
- ``INT8`` (``"i8"``): per-channel int8 weights (7-bit codes) and activations quantized to
  uint8 **per token** (one scale per row: its absolute maximum / 127), multiplied by
  ``MatMulIntegerToFloat`` on int8 dot-product kernels (VNNI, AMX): the fastest form where compute
  binds (RESULTS §18). A token's codes depend on that token alone, so a candidate's score
  never moves with the other rows of its chunk (issue 45; one scale per call did, by up to
  0.036 on DL19). Projections that read one input (q/k/v; gate/up) share its codes;
- ``None``: a plain fp32 ``MatMul`` (fp32 artifacts).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgerank.converters.quantize import quantize_blocks, quantize_channels
from edgerank.runtime.layout import COS, HIDDEN, HIDDEN_OUT, KEY, MASK, PAST_KEY, PAST_MASK, PAST_VALUE, SIN, VALUE

OPSET = 17
ACCURACY_LEVEL = 4  # int8 activations x int4 weights: ORT's fast CPU kernels
INT8 = "i8"  # the projection form multiplied in int8: per-channel weights, dynamic activations
# decoder layer outputs with ``taps=True``: the inputs of the attention projections, o_proj,
# the MLP's gate/up and down_proj
TAPS = ("tap_attn_in", "tap_o_in", "tap_mlp_in", "tap_down_in")


class _Graph:
    """A small node builder: ``g.op("MatMul", a, b)`` returns the output's name."""

    def __init__(self, name: str, bits=None, block: int = 32, lora: dict | None = None) -> None:
        self.name = name
        self.lora = lora or {}  # projection name -> (A [r,in], B [out,r] already scaled)
        self.bits = bits or (lambda _name: None)  # weight name -> 4, 8, INT8 or None (fp32)
        self.block = block
        self.quantized: dict[str, int] = {}
        self._codes: dict[str, tuple[str, str, str]] = {}  # input -> its per-token uint8 codes, scales, shape
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def _fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, n_out: int = 1, **attrs):
        outs = [out] if out else [self._fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self._fresh("n_" + op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    def linear(self, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None = None) -> str:
        """``x @ weight.T (+ bias)`` with an HF ``[out, in]`` weight: ``MatMulNBits`` codes
        when ``bits(name)`` asks for them, else an fp32 ``[in, out]`` MatMul."""
        bits = self.bits(name)
        lora = self.lora.get(name) if bits is not None else None
        if bits is None:  # fp32: the merged weight is exact as it is
            y = self.op("MatMul", x, self.const(name + ".weight", weight.T.astype(np.float32)))
        else:
            if lora is not None:
                # A LoRA delta is far smaller than a 4-bit step: quantizing the merged weight
                # would round it away. Quantize the base (merged - B@A, back on its grid) and
                # run the low-rank update beside it in fp32.
                a, b = lora
                weight = (weight.astype(np.float64) - b.astype(np.float64) @ a.astype(np.float64)).astype(np.float32)
            if bits == INT8:
                y = self._int8_product(x, name, weight)
            else:
                codes, scales, zeros = quantize_blocks(weight, bits, self.block)
                y = self.op("MatMulNBits", x, self.const(name + ".qweight", codes),
                            self.const(name + ".scales", scales), self.const(name + ".zeros", zeros),
                            domain="com.microsoft", K=weight.shape[1], N=weight.shape[0], bits=bits,
                            block_size=self.block, accuracy_level=ACCURACY_LEVEL)
            self.quantized[name] = bits
            if lora is not None:
                low = self.op("MatMul", x, self.const(name + ".lora_A", lora[0].T.astype(np.float32)))
                y = self.op("Add", y, self.op("MatMul", low, self.const(name + ".lora_B", lora[1].T.astype(np.float32))))
        if bias is not None:  # after the int8 product's Reshape: ORT folds an Add of a constant that
            # follows MatMulIntegerToFloat into the kernel's bias, then scales it per row too (§18.11)
            y = self.op("Add", y, self.const(name + ".bias", bias.astype(np.float32)))
        return y

    def _int8_product(self, x: str, name: str, weight: np.ndarray) -> str:
        """``x @ weight.T`` in int8: ``x``'s per-token codes (shared by every projection of
        ``x``) times 7-bit per-channel weight codes, rescaled per token and per channel by
        ``MatMulIntegerToFloat`` (one kernel: the int32 sums never reach memory)."""
        codes, scales = quantize_channels(weight)  # [in, out] int8, [out]
        q, row_scale, shape = self._token_codes(x, weight.shape[1])
        y = self.op("MatMulIntegerToFloat", q, self.const(name + ".qweight", codes), row_scale,
                    self.const(name + ".scales", scales.astype(np.float32)),
                    self.const(name + ".azero", np.array(128, np.uint8)), domain="com.microsoft")
        out_shape = self.op("Concat", shape, self.shape_const("n", [weight.shape[0]]), axis=0)
        return self.op("Reshape", y, out_shape)

    def _token_codes(self, x: str, width: int) -> tuple[str, str, str]:
        """``x`` [..., width] as uint8 codes [N, width] with one scale per token (N = the
        leading dims' product): its absolute maximum over 127, zero point 128; the scales
        [N, 1] and ``x``'s leading shape. Built once per input."""
        if x not in self._codes:
            flat = self.op("Reshape", x, self.shape_const("s", [-1, width]))
            # |x|'s row maximum from the row's max and min: two reads, no |x| written out
            amax = self.op("Max", self.op("ReduceMax", flat, axes=[1], keepdims=1),
                           self.op("Neg", self.op("ReduceMin", flat, axes=[1], keepdims=1)))  # [N,1]
            scale = self.op("Max", self.op("Mul", amax, self.const(self._fresh("inv127"), np.array(1 / 127, np.float32))),
                            self.const(self._fresh("tiny"), np.array(1e-12, np.float32)))
            per_row = self.op("Reshape", scale, self.shape_const("s", [-1]))
            zero = self.op("Expand", self.const(self._fresh("zp"), np.array([128], np.uint8)), self.op("Shape", per_row))
            codes = self.op("QuantizeLinear", flat, per_row, zero, axis=0)
            lead = self.op("Slice", self.op("Shape", x), self.shape_const("s", [0]), self.shape_const("e", [-1]))
            self._codes[x] = (codes, scale, lead)
        return self._codes[x]

    def rms_norm(self, x: str, name: str, weight: np.ndarray, eps: float) -> str:
        # Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul: the pattern ORT fuses into
        # SimplifiedLayerNormalization.
        two = self.const(self._fresh("two"), np.array(2.0, np.float32))
        ms = self.op("ReduceMean", self.op("Pow", x, two), axes=[-1], keepdims=1)
        rms = self.op("Sqrt", self.op("Add", ms, self.const(self._fresh("eps"), np.array(eps, np.float32))))
        return self.op("Mul", self.op("Div", x, rms), self.const(name + ".weight", weight.astype(np.float32)))

    def layer_norm(self, x: str, name: str, weight: np.ndarray, bias: np.ndarray, eps: float) -> str:
        return self.op("LayerNormalization", x, self.const(name + ".weight", weight.astype(np.float32)),
                       self.const(name + ".bias", bias.astype(np.float32)), axis=-1, epsilon=float(eps))

    def shape_const(self, name: str, values: list[int]) -> str:
        return self.const(self._fresh(name), np.array(values, dtype=np.int64))

    def model(self, inputs, outputs) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, inputs, outputs, self.inits)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
        m = helper.make_model(graph, opset_imports=opsets, producer_name="edgerank")
        m.ir_version = 8
        return m


def _lora(w: dict[str, np.ndarray]) -> dict:
    suffix = ".weight.lora_A"
    return {n[: -len(suffix)]: (w[n], w[n[:-1] + "B"]) for n in w if n.endswith(suffix)}


def _f32(name: str, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def decoder_layer(w: dict[str, np.ndarray], *, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int,
                  eps: float, qk_norm: bool, name: str = "layer", bits=None, block: int = 32,
                  taps: bool = False) -> onnx.ModelProto:
    """One Llama/Qwen2/Qwen3 decoder layer. ``w`` holds the layer's HF tensors without the
    ``model.layers.N.`` prefix (``self_attn.q_proj.weight``, ``mlp.up_proj.weight``, ...).
    ``bits(proj_name)`` picks each projection's form (4, 8, INT8, or None for fp32).
    ``PROJ.weight.lora_A`` / ``.lora_B`` entries (B scaled) mark a merged LoRA adapter.
    ``taps`` also outputs the four projection inputs (``TAPS``: attention, o_proj, MLP,
    down_proj), for the int8 form's smoothing statistics (``converters/smoothing.py``)."""
    g = _Graph(name, bits, block, _lora(w))
    x = g.rms_norm(HIDDEN, "input_layernorm", w["input_layernorm.weight"], eps)
    ctx = _decoder_attention(g, x, w, n_heads, n_kv_heads, head_dim, eps, qk_norm)
    attn = g.linear(ctx, "self_attn.o_proj", w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"))
    h = g.op("Add", HIDDEN, attn)
    x2 = g.rms_norm(h, "post_attention_layernorm", w["post_attention_layernorm.weight"], eps)
    gate = g.linear(x2, "mlp.gate_proj", w["mlp.gate_proj.weight"])
    up = g.linear(x2, "mlp.up_proj", w["mlp.up_proj.weight"])
    act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)  # SiLU(gate) * up
    down = g.linear(act, "mlp.down_proj", w["mlp.down_proj.weight"])
    g.op("Add", h, down, out=HIDDEN_OUT)
    kv = ["PB", n_kv_heads, 1, "P", head_dim]  # PB: 1 (one past shared by every row) or B
    tapped = []
    if taps:
        for tap, t, width in zip(TAPS, (x, ctx, x2, act), (hidden, n_heads * head_dim, hidden, w["mlp.down_proj.weight"].shape[1])):
            g.op("Identity", t, out=tap)
            tapped.append(_f32(tap, ["B", "T", width]))
    return g.model(
        [_f32(HIDDEN, ["B", "T", hidden]), _f32(COS, ["B", "T", head_dim]), _f32(SIN, ["B", "T", head_dim]),
         _f32(MASK, ["B", 1, 1, "T", "T"]), _f32(PAST_KEY, kv), _f32(PAST_VALUE, kv),
         _f32(PAST_MASK, ["PMB", 1, 1, 1, "PM"])],
        [_f32(HIDDEN_OUT, ["B", "T", hidden]), _f32(KEY, ["B", n_kv_heads, 1, "T", head_dim]),
         _f32(VALUE, ["B", n_kv_heads, 1, "T", head_dim]), *tapped],
    )


def _decoder_attention(g: _Graph, x: str, w: dict[str, np.ndarray], n_heads: int, n_kv_heads: int, head_dim: int,
                       eps: float, qk_norm: bool) -> str:
    """Grouped-query attention of the normed hidden states ``x`` over the past (the shared
    prefix's keys and values) and the rows' own causal keys, rotary positions from COS/SIN;
    outputs KEY and VALUE and returns the heads' context [B,T,n_heads*D] (before o_proj)."""
    def heads(proj: str, n: int) -> str:  # [B,T,n*D] -> [B,KVH,n/KVH,T,D]
        y = g.linear(x, f"self_attn.{proj}", w[f"self_attn.{proj}.weight"], w.get(f"self_attn.{proj}.bias"))
        y = g.op("Reshape", y, g.shape_const("shape", [0, 0, n, head_dim]))
        if qk_norm and proj in ("q_proj", "k_proj"):
            norm = "q_norm" if proj == "q_proj" else "k_norm"
            y = g.rms_norm(y, f"self_attn.{norm}", w[f"self_attn.{norm}.weight"], eps)
        y = g.op("Transpose", y, perm=[0, 2, 1, 3])  # [B,n,T,D]
        return g.op("Reshape", y, g.shape_const("shape", [0, n_kv_heads, n // n_kv_heads, -1, head_dim]))

    cos = g.op("Unsqueeze", COS, g.shape_const("axes", [1, 2]))  # [B,1,1,T,D]
    sin = g.op("Unsqueeze", SIN, g.shape_const("axes", [1, 2]))
    half = head_dim // 2

    def rope(t: str) -> str:  # t*cos + rotate_half(t)*sin, HF's layout
        first = g.op("Slice", t, g.shape_const("s", [0]), g.shape_const("e", [half]), g.shape_const("a", [-1]))
        second = g.op("Slice", t, g.shape_const("s", [half]), g.shape_const("e", [head_dim]), g.shape_const("a", [-1]))
        rotated = g.op("Concat", g.op("Neg", second), first, axis=-1)
        return g.op("Add", g.op("Mul", t, cos), g.op("Mul", rotated, sin))

    q = rope(heads("q_proj", n_heads))  # [B,KVH,G,T,D]
    k = g.op("Identity", rope(heads("k_proj", n_kv_heads)), out=KEY)  # [B,KVH,1,T,D]
    v = g.op("Identity", heads("v_proj", n_kv_heads), out=VALUE)
    scale = g.const("attn_scale", np.array(1.0 / np.sqrt(head_dim), np.float32))
    q = g.op("Mul", q, scale)
    # past: [1 or B, KVH, 1, P, D]; PAST_MASK is an input with a default (an initializer of
    # the same name): zeros [1,1,1,1,1], every past position visible. Batched decoding feeds
    # [B,1,1,1,P] to hide each row's padding.
    past_mask = g.const(PAST_MASK, np.zeros((1, 1, 1, 1, 1), np.float32))
    s_prefix = g.op("Add", g.op("MatMul", q, g.op("Transpose", PAST_KEY, perm=[0, 1, 2, 4, 3])), past_mask)  # [B,KVH,G,T,P]
    s_own = g.op("Add", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 2, 4, 3])), MASK)  # [B,KVH,G,T,T]
    probs = g.op("Softmax", g.op("Concat", s_prefix, s_own, axis=-1), axis=-1)
    p_len = g.op("Slice", g.op("Shape", PAST_KEY), g.shape_const("s", [3]), g.shape_const("e", [4]))
    big = g.shape_const("e", [np.iinfo(np.int64).max])
    last = g.shape_const("a", [-1])
    a_prefix = g.op("Slice", probs, g.shape_const("s", [0]), p_len, last)
    a_own = g.op("Slice", probs, p_len, big, last)
    ctx = g.op("Add", g.op("MatMul", a_prefix, PAST_VALUE), g.op("MatMul", a_own, v))  # [B,KVH,G,T,D]
    ctx = g.op("Reshape", ctx, g.shape_const("shape", [0, n_heads, -1, head_dim]))
    ctx = g.op("Reshape", g.op("Transpose", ctx, perm=[0, 2, 1, 3]), g.shape_const("shape", [0, 0, n_heads * head_dim]))
    return ctx


def encoder_layer(w: dict[str, np.ndarray], *, hidden: int, n_heads: int, eps: float,
                  name: str = "layer", bits=None, block: int = 32) -> onnx.ModelProto:
    """One BERT/XLM-R encoder layer. ``w`` holds the layer's HF tensors without the
    ``encoder.layer.N.`` prefix (``attention.self.query.weight``, ...)."""
    g = _Graph(name, bits, block, _lora(w))
    head_dim = hidden // n_heads

    def heads(proj: str) -> str:  # [B,T,H] -> [B,h,T,d]
        y = g.linear(HIDDEN, f"attention.self.{proj}", w[f"attention.self.{proj}.weight"],
                     w[f"attention.self.{proj}.bias"])
        return g.op("Transpose", g.op("Reshape", y, g.shape_const("shape", [0, 0, n_heads, head_dim])),
                    perm=[0, 2, 1, 3])

    q = g.op("Mul", heads("query"), g.const("attn_scale", np.array(1.0 / np.sqrt(head_dim), np.float32)))
    k, v = heads("key"), heads("value")
    scores = g.op("Add", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), MASK)
    ctx = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)
    ctx = g.op("Reshape", g.op("Transpose", ctx, perm=[0, 2, 1, 3]), g.shape_const("shape", [0, 0, hidden]))
    attn = g.linear(ctx, "attention.output.dense", w["attention.output.dense.weight"],
                    w["attention.output.dense.bias"])
    h = g.layer_norm(g.op("Add", attn, HIDDEN), "attention.output.LayerNorm",
                     w["attention.output.LayerNorm.weight"], w["attention.output.LayerNorm.bias"], eps)
    inter = g.linear(h, "intermediate.dense", w["intermediate.dense.weight"], w["intermediate.dense.bias"])
    # exact (erf) GELU, as BERT's "gelu"
    gelu = g.op("Mul", g.op("Mul", inter, g.const("half", np.array(0.5, np.float32))),
                g.op("Add", g.op("Erf", g.op("Div", inter, g.const("sqrt2", np.array(np.sqrt(2.0), np.float32)))),
                     g.const("one", np.array(1.0, np.float32))))
    out = g.linear(gelu, "output.dense", w["output.dense.weight"], w["output.dense.bias"])
    g.layer_norm(g.op("Add", out, h), "output.LayerNorm", w["output.LayerNorm.weight"], w["output.LayerNorm.bias"],
                 eps)
    g.nodes[-1].output[0] = HIDDEN_OUT
    return g.model([_f32(HIDDEN, ["B", "T", hidden]), _f32(MASK, ["B", 1, 1, "T"])],
                   [_f32(HIDDEN_OUT, ["B", "T", hidden])])
