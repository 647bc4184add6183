"""The int8 form's smoothing (converters/smoothing.py) changes no fp32 function: a layer
graph built from the smoothed tensors equals the one built from the originals, and a LoRA
update's base (merged - B@A) is scaled exactly as its weight."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from edgerank.runtime import layout
from edgerank.converters.onnx_graphs import TAPS, decoder_layer
from edgerank.converters.smoothing import smooth
from edgerank.runtime.engines import session_options

H, NH, KVH, D, FFN = 64, 4, 2, 16, 128


def _layer(rng) -> dict[str, np.ndarray]:
    w = {"input_layernorm.weight": rng.uniform(0.5, 2, H), "post_attention_layernorm.weight": rng.uniform(0.5, 2, H),
         "self_attn.q_proj.weight": rng.normal(0, 0.2, (NH * D, H)), "self_attn.q_proj.bias": rng.normal(0, 0.1, NH * D),
         "self_attn.k_proj.weight": rng.normal(0, 0.2, (KVH * D, H)), "self_attn.k_proj.bias": rng.normal(0, 0.1, KVH * D),
         "self_attn.v_proj.weight": rng.normal(0, 0.2, (KVH * D, H)), "self_attn.v_proj.bias": rng.normal(0, 0.1, KVH * D),
         "self_attn.o_proj.weight": rng.normal(0, 0.2, (H, NH * D)),
         "mlp.gate_proj.weight": rng.normal(0, 0.2, (FFN, H)), "mlp.up_proj.weight": rng.normal(0, 0.2, (FFN, H)),
         "mlp.down_proj.weight": rng.normal(0, 0.2, (H, FFN))}
    return {k: v.astype(np.float32) for k, v in w.items()}


def _run(w, feeds):
    model = decoder_layer(w, hidden=H, n_heads=NH, n_kv_heads=KVH, head_dim=D, eps=1e-6, qk_norm=False, taps=True)
    sess = ort.InferenceSession(model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


@pytest.mark.core
def test_smoothing_leaves_the_fp32_layer_unchanged_and_flattens_the_outlier_channels():
    rng = np.random.default_rng(0)
    w = _layer(rng)
    B, T, P = 2, 5, 3
    hidden = rng.normal(0, 1, (B, T, H)).astype(np.float32)
    hidden[..., 7] *= 40  # an outlier channel, as decoders have
    t = np.arange(T)
    feeds = {layout.HIDDEN: hidden,
             layout.COS: np.cos(rng.uniform(0, 3, (B, T, D))).astype(np.float32),
             layout.SIN: np.sin(rng.uniform(0, 3, (B, T, D))).astype(np.float32),
             layout.MASK: np.broadcast_to(np.where(t[None] > t[:, None], -1e9, 0).astype(np.float32), (B, 1, 1, T, T)).copy(),
             layout.PAST_KEY: rng.normal(0, 1, (1, KVH, 1, P, D)).astype(np.float32),
             layout.PAST_VALUE: rng.normal(0, 1, (1, KVH, 1, P, D)).astype(np.float32)}
    before = _run(w, feeds)
    maxima = {tap: np.abs(before[tap]).reshape(-1, before[tap].shape[-1]).max(axis=0) for tap in TAPS}
    smoothed = smooth(w, maxima, NH, KVH, D)
    # values come out divided by the o_proj factors, so a past written by the smoothed form is too
    s_kv = (w["self_attn.v_proj.bias"] / smoothed["self_attn.v_proj.bias"]).reshape(1, KVH, 1, 1, D)
    assert not np.allclose(s_kv, 1)
    after = _run(smoothed, {**feeds, layout.PAST_VALUE: feeds[layout.PAST_VALUE] / s_kv})
    for name in (layout.HIDDEN_OUT, layout.KEY):
        np.testing.assert_allclose(after[name], before[name], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(after[layout.VALUE] * s_kv, before[layout.VALUE], rtol=1e-4, atol=1e-4)

    def spread(x):  # largest channel max over the median channel max
        m = np.abs(x).reshape(-1, x.shape[-1]).max(axis=0)
        return m.max() / np.median(m)

    for tap in (TAPS[0], TAPS[2]):  # the norms' outputs carry the outlier channel
        assert spread(after[tap]) < spread(before[tap]) / 3, tap


@pytest.mark.core
def test_a_lora_update_is_scaled_with_its_weight():
    rng = np.random.default_rng(1)
    w = _layer(rng)
    for proj, (out, inp) in {"self_attn.v_proj": (KVH * D, H), "mlp.up_proj": (FFN, H), "mlp.down_proj": (H, FFN),
                             "self_attn.o_proj": (H, NH * D)}.items():
        w[f"{proj}.weight.lora_A"] = rng.normal(0, 0.1, (4, inp)).astype(np.float32)
        w[f"{proj}.weight.lora_B"] = rng.normal(0, 0.1, (out, 4)).astype(np.float32)
    maxima = {TAPS[0]: rng.uniform(0.1, 30, H), TAPS[1]: rng.uniform(0.1, 30, NH * D),
              TAPS[2]: rng.uniform(0.1, 30, H), TAPS[3]: rng.uniform(0.1, 30, FFN)}
    s = smooth(w, maxima, NH, KVH, D)
    for proj in ("self_attn.v_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.o_proj"):
        key = f"{proj}.weight"
        base = w[key].astype(np.float64) - w[key + ".lora_B"].astype(np.float64) @ w[key + ".lora_A"]
        base_s = s[key].astype(np.float64) - s[key + ".lora_B"].astype(np.float64) @ s[key + ".lora_A"]
        factor = s[key].astype(np.float64) / w[key]  # the weight's own scaling, elementwise
        assert not np.allclose(factor, 1)
        np.testing.assert_allclose(base_s, base * factor, rtol=1e-4, atol=1e-6)


@pytest.mark.core
def test_calibration_maxima_ignore_padding_and_match_sequences_run_alone():
    from edgerank.converters.smoothing import CALIBRATION_ROWS, Calibration
    from edgerank.runtime.rope import RopeTable

    rng = np.random.default_rng(2)
    w = _layer(rng)
    model = decoder_layer(w, hidden=H, n_heads=NH, n_kv_heads=KVH, head_dim=D, eps=1e-6, qk_norm=False, taps=True)
    table = rng.normal(0, 1, (50, H)).astype(np.float32)
    table[0] *= 1000  # id 0 pads the short rows: were padding read, it would set every maximum
    seqs = [list(rng.integers(1, 50, n)) for n in rng.integers(2, 12, CALIBRATION_ROWS + 3)]  # two calls
    rope = RopeTable(D, 10000.0)
    together = Calibration(seqs, table, rope)
    got = [together.run(model, KVH, D), together.run(model, KVH, D)]  # two layers: hidden states carried
    alone = [Calibration([s], table, rope) for s in seqs]
    for layer in range(2):
        runs = [c.run(model, KVH, D) for c in alone]
        for tap in TAPS:
            np.testing.assert_allclose(got[layer][tap], np.max([r[tap] for r in runs], axis=0), rtol=1e-4)
