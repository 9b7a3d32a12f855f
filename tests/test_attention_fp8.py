"""The cudnn_fp8 attention backend on the CPU: its quantisation and delayed scales through the emulation of the
kernel (engine/models/attention_fp8.py), its custom ops under autograd and torch.compile, and how the config and
the switches select, refuse and report it. The cuDNN kernels themselves run on the GPU only
(bench/attention_backends.py --emulation-check compares them with the emulation)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from engine.config import with_value
from engine.config.rules import check_config
from engine.models import attention as attn
from engine.models import attention_fp8 as f8
from s2v_tui.commands.demo import demo_config


@pytest.fixture(autouse=True)
def _fp8_backend(monkeypatch):
    monkeypatch.setattr(attn, "_PROBED", {})
    monkeypatch.setitem(attn._state, "backend", "cudnn_fp8")  # set directly: the cuDNN frontend is not installed


def _inputs(s=192, h=2, d=64, seed=0, grad=1e-3):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(1, s, h, d, generator=g) * a for a in (1.5, 1.5, 1.0, grad))
    return [t.to(torch.bfloat16) for t in (q, k, v, do)]


def _reference(q, k, v, do):
    ins = [t.float().transpose(1, 2).requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*ins)
    out.backward(do.float().transpose(1, 2))
    return out.detach().transpose(1, 2), [t.grad.transpose(1, 2) for t in ins]


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _fp8_step(q, k, v, do, ratios):
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attn.attention(*ins, self_attention=True, fp8_ratios=ratios)
    out.backward(do)
    return out.detach(), [t.grad for t in ins]


def test_scales_are_powers_of_two_that_fit_the_amax_and_zeros_stay_zero():
    x = torch.tensor([0.3, -7.5, 1e-3], dtype=torch.bfloat16)
    x8, descale, amax = f8.quantize(x)
    scale = 1 / float(descale)
    assert float(amax) == 7.5 and math.log2(scale).is_integer() and 7.5 * scale <= 448 < 2 * 7.5 * scale
    back = x8.float() * descale
    assert torch.allclose(back, x.float(), rtol=2 ** -4)  # e4m3: 3 mantissa bits
    zeros8, zero_descale, _ = f8.quantize(torch.zeros(4, dtype=torch.bfloat16))
    assert torch.isfinite(zero_descale) and not zeros8.float().any()
    assert float(f8.pow2_scale(torch.tensor(7.5), headroom=4.0)) == scale / 4


def test_saturating_cast_never_makes_nan():
    assert torch.isnan(torch.tensor([1000.0]).to(f8.FP8).float()).all()  # torch's own cast: why to_fp8 clamps
    assert f8.to_fp8(torch.tensor([1000.0, -1e9])).float().tolist() == [448.0, -448.0]


def test_fp8_attention_is_close_to_fp32_and_further_than_bf16():
    q, k, v, do = _inputs()
    ref_out, ref_grads = _reference(q, k, v, do)
    out, grads = _fp8_step(q, k, v, do, torch.zeros(4))
    errors = [_rel(out, ref_out)] + [_rel(g, r) for g, r in zip(grads, ref_grads, strict=True)]
    assert all(e < 0.15 for e in errors), errors  # e4m3 rounding: a few per cent
    bf16 = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert _rel(bf16, ref_out) < errors[0] / 3  # and it is not bf16 in disguise


def test_a_layers_first_backward_measures_its_scales_then_each_backward_runs_once(monkeypatch):
    calls = []
    real = f8.emulate_backward
    monkeypatch.setattr(f8, "emulate_backward", lambda *a: calls.append(a[-1]) or real(*a))
    q, k, v, do = _inputs()
    ratios = torch.zeros(4)
    _fp8_step(q, k, v, do, ratios)
    assert len(calls) == 3 and (ratios > 0).all()  # dS measured, then dQ/dK from the scaled dS, then the run
    _fp8_step(q, k, v, do, ratios)
    assert len(calls) == 4


def test_the_delayed_scales_follow_the_attention_not_the_size_of_the_loss():
    q, k, v, do = _inputs()
    ratios = torch.zeros(4)
    _fp8_step(q, k, v, do, ratios)
    measured = ratios.clone()
    _, grads = _fp8_step(q, k, v, do * 1000, ratios)  # the same step with a loss 1000x larger
    assert torch.allclose(ratios, measured, rtol=0.1)
    _, ref_grads = _reference(q, k, v, do * 1000)
    assert all(_rel(g, r) < 0.15 for g, r in zip(grads, ref_grads, strict=True))


def test_a_zero_upstream_gradient_keeps_the_ratios_and_gives_zero_gradients():
    q, k, v, do = _inputs()
    ratios = torch.zeros(4)
    _fp8_step(q, k, v, do, ratios)
    kept = ratios.clone()
    _, grads = _fp8_step(q, k, v, torch.zeros_like(do), ratios)
    assert torch.equal(ratios, kept) and not any(g.float().any() for g in grads)


def test_an_amax_far_past_the_headroom_saturates_instead_of_making_nan():
    q, k, v, do = _inputs()
    ratios = torch.zeros(4)
    _fp8_step(q, k, v, do, ratios)
    ratios /= 64  # the next gradients are 16x past the headroom
    _, grads = _fp8_step(q, k, v, do, ratios)
    assert all(torch.isfinite(g.float()).all() for g in grads)


def test_compiled_fp8_attention_is_one_graph_with_eagers_gradients_and_updates_the_ratios():
    q, k, v, do = _inputs(s=64)

    def loss(a, b, c, r):
        return (attn.attention(a * 1.0, b, c, self_attention=True, fp8_ratios=r).float() * do.float()).sum()
    compiled = torch.compile(loss, fullgraph=True)
    r_compiled, r_eager = torch.zeros(4), torch.zeros(4)
    ins_c, ins_e = ([t.clone().requires_grad_() for t in (q, k, v)] for _ in range(2))
    compiled(*ins_c, r_compiled).backward()
    loss(*ins_e, r_eager).backward()
    assert (r_compiled > 0).all() and torch.equal(r_compiled, r_eager)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ins_c, ins_e, strict=True))


def test_cross_attention_and_unattached_layers_are_handled_as_said():
    q, k, v, _ = _inputs(s=32)
    text = k[:, :5]
    out = attn.attention(q, text, v[:, :5])  # cross-attention: cuDNN bf16 (SDPA on the CPU), no fp8
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), text.transpose(1, 2), v[:, :5].transpose(1, 2))
    assert torch.equal(out, sdpa.transpose(1, 2))
    with torch.no_grad():  # a forward alone (samples) needs no scales
        attn.attention(q, k, v, self_attention=True)
    with pytest.raises(RuntimeError, match="attach_fp8_ratios"):
        attn.attention(q.requires_grad_(), k, v, self_attention=True)
    with pytest.raises(TypeError, match="bf16"):
        attn.attention(q.float(), k.float(), v.float(), self_attention=True, fp8_ratios=torch.zeros(4))


def test_save_attention_keeps_the_fp8_self_attention():
    op = torch.ops.s2v.fp8_attention_forward.default
    video, text = torch.empty(1, 64, 2, 8), torch.empty(1, 5, 2, 8)
    assert attn.is_self_attention_kernel(op, (video, video)) and not attn.is_self_attention_kernel(op, (video, text))


def test_the_probe_refuses_cudnn_fp8_off_cuda_and_an_fp32_model_conflicts():
    problem = attn.attention_backend_problem("cudnn_fp8", "cpu")
    assert problem and "CUDA GPUs only" in problem
    config = with_value(demo_config("m", "r"), "memory.attention_backend", "cudnn_fp8")
    config = with_value(config, "model.dtype", "fp32")
    problems = [str(p) for p in check_config(config)]
    assert any("memory.attention_backend" in p and "bf16" in p for p in problems), problems


def test_switches_attach_the_scales_and_report_fp8(monkeypatch, tiny_model_dir):
    from engine.models.s2v_transformer import S2VTransformer3DModel
    from engine.train.switches import apply_memory_switches

    monkeypatch.setattr(attn, "_probe_backend", lambda name, device: None)
    monkeypatch.setitem(attn._PACKAGES, "cudnn_fp8", "torch")  # the frontend package stands in as installed
    model = S2VTransformer3DModel.from_pretrained(tiny_model_dir)
    config = with_value(demo_config("m", "r"), "memory.attention_backend", "cudnn_fp8")
    done = apply_memory_switches(model, config, torch.device("cpu"))
    assert any("cudnn_fp8" in line and "e4m3" in line for line in done)
    states = [m.fp8_ratios for m in model.modules() if hasattr(type(m), "fp8_ratios")]
    assert states and all(s is not None and not s.any() for s in states)


def test_the_training_curve_bench_runs_both_backends_and_stays_close(tmp_path):
    from bench import attention_curve

    out = tmp_path / "curve.jsonl"
    assert attention_curve.main(["--device", "cpu", "--heads", "2", "--head-dim", "24", "--steps", "30",
                                 "--latent-size", "16", "--latent-frames", "3", "--out", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["backend"] for x in lines] == ["cudnn", "cudnn_fp8"]
    fp8 = lines[1]
    assert all(math.isfinite(x) for x in fp8["losses"]) and fp8["max_rel_gap"] < 0.05
    assert fp8["last10_mean"] < fp8["first_loss"]  # it learns
