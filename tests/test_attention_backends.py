"""Attention backends: chosen, refused and reported as the config says (memory.attention_backend for training,
validation.attention_backend and `s2v-tui sample --attention` for samples). The device probe,
engine.models.attention._probe_backend, is what these tests replace to make a backend run or fail; the FA4 ops are
checked for tracing (fake kernels, autograd, torch.compile without a graph break) since no GPU is here."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from engine.config import with_value
from engine.config.errors import ConfigError
from engine.config.rules import check_config
from engine.config.schema import ValidationCase
from engine.models import attention as attn
from engine.train.allowed import setting_problems
from s2v_tui.commands.demo import demo_config

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch):
    monkeypatch.setattr(attn, "_PROBED", {})
    monkeypatch.setitem(attn._state, "backend", "auto")


def _config(**values):
    config = demo_config("m", "r")
    for key, value in values.items():
        config = with_value(config, key, value)
    return config


def _with_samples(config, backend):
    v = dataclasses.replace(config.validation, every_steps=10, attention_backend=backend,
                            cases=[ValidationCase(reference="face.png", audio="speech.wav", prompt="hi")])
    return dataclasses.replace(config, validation=v)


def _probe_that(monkeypatch, fails_with: str | None):
    calls = []

    def probe(name, device):
        calls.append((name, str(device)))
        if fails_with:
            raise RuntimeError(fails_with)
    monkeypatch.setattr(attn, "_probe_backend", probe)
    return calls


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="choose one of auto, cudnn, flash, efficient, math, fa4"):
        attn.set_attention_backend("fa5")


def test_fa4_is_refused_on_the_cpu_by_the_real_probe():
    problem = attn.attention_backend_problem("fa4", "cpu")
    assert problem and "CUDA GPUs only" in problem and "cpu" in problem
    problems = setting_problems(_config(**{"memory.attention_backend": "fa4"}), device=torch.device("cpu"))
    assert problems == [f'memory.attention_backend = "fa4": {problem}; set memory.attention_backend = "cudnn"']


def test_a_failing_probe_refuses_the_run_with_its_reason(monkeypatch):
    calls = _probe_that(monkeypatch, "FlashAttention 4 trains on Hopper (9.0) and Blackwell (10.x); this is 8.0")
    config = _config(**{"memory.attention_backend": "fa4"})
    problems = setting_problems(config, device=CUDA)
    assert len(problems) == 1
    assert problems[0].startswith('memory.attention_backend = "fa4": attention backend \'fa4\' cannot run here: ')
    assert "this is 8.0" in problems[0] and problems[0].endswith('set memory.attention_backend = "cudnn"')
    assert setting_problems(config, device=CUDA) == problems and calls == [("fa4", "cuda")]  # probed once


def test_a_passing_probe_lets_fa4_train_and_an_unknown_device_probes_nothing(monkeypatch):
    calls = _probe_that(monkeypatch, None)
    config = _config(**{"memory.attention_backend": "fa4"})
    assert setting_problems(config) == [] and calls == []  # device not known yet: nothing to try
    assert setting_problems(config, device=CUDA) == [] and calls == [("fa4", "cuda")]


@pytest.mark.parametrize("backend", ["auto", "cudnn", "flash", "efficient", "math"])
def test_pytorch_backends_are_never_probed(monkeypatch, backend):
    calls = _probe_that(monkeypatch, "must not be asked")
    assert setting_problems(_config(**{"memory.attention_backend": backend}), device=CUDA) == []
    assert calls == []


def test_the_samples_backend_is_probed_only_when_validation_renders_samples(monkeypatch):
    calls = _probe_that(monkeypatch, "the 'sageattention' package is not installed")
    off = _config(**{"validation.attention_backend": "sage"})  # validation.every_steps = 0: no samples
    assert setting_problems(off, device=CUDA) == [] and calls == []
    problems = setting_problems(_with_samples(off, "sage"), device=CUDA)
    assert len(problems) == 1 and problems[0].startswith('validation.attention_backend = "sage": ')
    assert "not installed" in problems[0] and problems[0].endswith('set validation.attention_backend = "same"')
    assert setting_problems(_with_samples(off, "same"), device=CUDA) == []


def test_sage_cannot_train_and_says_where_it_can_be_used():
    errors = check_config(_config(**{"memory.attention_backend": "sage"}))
    hits = [e for e in errors if e.key == "memory.attention_backend"]
    assert len(hits) == 1 and isinstance(hits[0], ConfigError)
    assert "no backward pass" in str(hits[0]) and 'validation.attention_backend = "sage"' in str(hits[0])
    assert not [e for e in check_config(_with_samples(_config(), "sage")) if "attention_backend" in e.key]


@pytest.mark.parametrize("key", ["memory.attention_backend", "validation.attention_backend"])
def test_fa4_with_an_fp32_model_is_a_conflict(key):
    errors = [e for e in check_config(_config(**{key: "fa4", "model.dtype": "fp32"})) if e.key == key]
    assert len(errors) == 1 and "bf16 or fp16" in str(errors[0]) and 'model.dtype = "bf16"' in str(errors[0])
    assert not [e for e in check_config(_config(**{key: "fa4", "model.dtype": "bf16"})) if e.key == key]


def test_sampling_attention_sets_the_samples_backend_and_puts_training_back():
    attn.set_attention_backend("cudnn")
    with attn.sampling_attention("same"):
        assert attn.get_attention_backend() == "cudnn"
    with pytest.raises(KeyError), attn.sampling_attention("math"):
        assert attn.get_attention_backend() == "math"
        raise KeyError("a sample failed")
    assert attn.get_attention_backend() == "cudnn"


def test_validation_renders_with_the_configured_backend(monkeypatch):
    from engine.train import validation

    seen = []
    v = validation.Validator.__new__(validation.Validator)
    v.vset = validation.ValidationSet(cases=[object()], seeds=[0], parts=type("P", (), {"vae": torch.nn.Linear(1, 1)}))
    v.run_dir, v.device, v.sweep, v.attention = Path("r"), torch.device("cpu"), [], "math"
    v.dist = validation.SINGLE
    v.model = type("M", (), {"disable_adapters": lambda self: None, "enable_adapters": lambda self: None})()
    # The base model's sample (no file under r/ yet) and the LoRA's: both with the samples' backend.
    monkeypatch.setattr(v, "_render", lambda jobs: seen.append((attn.get_attention_backend(), len(jobs))))
    attn.set_attention_backend("cudnn")
    v._samples(step=2, ema=None)
    assert seen == [("math", 1), ("math", 1)] and attn.get_attention_backend() == "cudnn"


def test_sage_refuses_a_backward_pass():
    attn._state["backend"] = "sage"
    q, k, v = (torch.randn(1, 8, 2, 64, requires_grad=True) for _ in range(3))
    with pytest.raises(RuntimeError, match="no backward pass"):
        attn.attention(q, k, v)


def test_fa4_refuses_fp32_tensors_naming_the_keys():
    attn._state["backend"] = "fa4"
    q = torch.randn(1, 8, 2, 64)
    with pytest.raises(TypeError, match='model.dtype = "bf16" or memory.attention_backend = "cudnn"'):
        attn.attention(q, q, q)


def _bf16(*shape, grad=False):
    return torch.randn(*shape, dtype=torch.bfloat16).requires_grad_(grad)


def test_fa4_ops_trace_forward_and_backward_with_their_fake_kernels():
    attn._state["backend"] = "fa4"

    def step(q, k, v):
        out = attn.attention(q, k, v)
        return (out, *torch.autograd.grad(out.float().sum(), (q, k, v)))

    q, k, v = _bf16(1, 16, 2, 128, grad=True), _bf16(1, 24, 2, 128, grad=True), _bf16(1, 24, 2, 128, grad=True)
    graph = make_fx(step, tracing_mode="fake")(q, k, v)
    targets = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert "s2v.fa4_forward.default" in targets and "s2v.fa4_backward.default" in targets
    shapes = [tuple(n.meta["val"].shape) for n in graph.graph.nodes if n.op == "output" for n in n.args[0]]
    assert shapes == [(1, 16, 2, 128), (1, 16, 2, 128), (1, 24, 2, 128), (1, 24, 2, 128)]


def test_fa4_attention_compiles_into_one_graph():
    attn._state["backend"] = "fa4"
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return lambda *args: (torch.zeros(1, 16, 2, 128, dtype=torch.bfloat16),)  # no GPU to run the kernel

    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: attn.attention(q, k, v) * 2, fullgraph=True, backend=capture)
    fn(_bf16(1, 16, 2, 128), _bf16(1, 16, 2, 128), _bf16(1, 16, 2, 128))  # fullgraph: a graph break would raise
    assert len(graphs) == 1
    assert any("fa4_forward" in str(n.target) for n in graphs[0].graph.nodes)


def test_save_attention_keeps_self_attention_of_fa4_and_sdpa_but_not_cross_attention():
    fa4 = torch.ops.s2v.fa4_forward.default
    sdpa = torch.ops.aten._scaled_dot_product_cudnn_attention.default
    video, text = torch.empty(1, 64, 2, 8), torch.empty(1, 5, 2, 8)  # [B, S, H, D]
    assert attn.is_self_attention_kernel(fa4, (video, video))
    assert not attn.is_self_attention_kernel(fa4, (video, text))
    assert attn.is_self_attention_kernel(sdpa, (video.transpose(1, 2), video.transpose(1, 2)))
    assert not attn.is_self_attention_kernel(sdpa, (video.transpose(1, 2), text.transpose(1, 2)))
    assert not attn.is_self_attention_kernel(torch.ops.aten.mm.default, (video, video))


def test_sample_command_refuses_a_backend_that_cannot_run_before_loading(tmp_path, capsys):
    from s2v_tui.commands import sample as sample_cmd

    for name in ("face.png", "speech.wav"):
        (tmp_path / name).write_bytes(b"x")
    code = sample_cmd.main(["--model", str(tmp_path / "no-model"), "--image", str(tmp_path / "face.png"),
                            "--audio", str(tmp_path / "speech.wav"), "--prompt", "hi", "--out",
                            str(tmp_path / "o.mp4"), "--device", "cpu", "--attention", "sage"])
    err = capsys.readouterr().err
    assert code == 2 and "--attention sage" in err and "CUDA GPUs only" in err and "loading" not in err


def test_the_trial_passes_a_right_kernel_and_catches_a_wrong_one(monkeypatch):
    attn._trial("math", torch.device("cpu"))  # SDPA against the math kernel: passes, forward and backward
    assert attn.get_attention_backend() == "auto"  # the trial puts the backend back
    real = attn.attention
    monkeypatch.setattr(attn, "attention", lambda q, k, v, **kw: real(q, k, v, **kw) * 1.1)
    with pytest.raises(RuntimeError, match="its output is off by 0.1"):
        attn._trial("math", torch.device("cpu"))
    monkeypatch.setattr(attn, "attention", lambda q, k, v, **kw: real(q, k.detach(), v, **kw))
    with pytest.raises(RuntimeError, match="its dk is missing"):
        attn._trial("math", torch.device("cpu"))


def test_memory_switches_select_and_report_the_backend_or_refuse_it_before_applying_any(tiny_model_dir):
    from engine.models.s2v_transformer import S2VTransformer3DModel
    from engine.train.switches import UnsupportedSwitch, apply_memory_switches

    cpu = torch.device("cpu")
    model = S2VTransformer3DModel.from_pretrained(tiny_model_dir)
    config = with_value(demo_config(tiny_model_dir, "r"), "memory.attention_backend", "math")
    assert "attention backend math" in apply_memory_switches(model, config, cpu)
    assert attn.get_attention_backend() == "math"
    with pytest.raises(UnsupportedSwitch, match='memory.attention_backend = "fa4": .*CUDA GPUs only'):
        apply_memory_switches(model, with_value(config, "memory.attention_backend", "fa4"), cpu)
    assert attn.get_attention_backend() == "math"  # the refused switch set nothing


def test_fastest_takes_fa4_where_its_probe_passes_and_says_why_not_elsewhere(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    calls = _probe_that(monkeypatch, None)
    assert attn.resolve_attention_backend("fastest", CUDA, "bf16") == ("fa4", "FlashAttention 4 runs on this GPU")
    assert calls == [("fa4", "cuda")]
    assert attn.resolve_attention_backend("fastest", CUDA, "fp32")[0] != "fa4"  # fa4 takes no fp32 tensors
    assert attn.resolve_attention_backend("cudnn", CUDA) == ("cudnn", None)  # any other name means itself
    monkeypatch.setattr(attn, "_PROBED", {})
    _probe_that(monkeypatch, "the 'flash_attn' package is not installed")
    chosen, why = attn.resolve_attention_backend("fastest", CUDA, "bf16")
    assert chosen == "cudnn" and "not installed" in why and why.endswith("cudnn instead")
    assert attn.resolve_attention_backend("fastest", "cpu", "fp32")[0] == "auto"


def test_fastest_in_a_run_reports_its_choice_and_samples_follow_it(tiny_model_dir):
    from engine.models.s2v_transformer import S2VTransformer3DModel
    from engine.train.switches import apply_memory_switches

    cpu = torch.device("cpu")
    model = S2VTransformer3DModel.from_pretrained(tiny_model_dir)
    config = with_value(demo_config(tiny_model_dir, "r"), "memory.attention_backend", "fastest")
    config = with_value(config, "model.dtype", "bf16")
    done = apply_memory_switches(model, config, cpu)  # the real probe: fa4 runs on CUDA GPUs only
    line = next(x for x in done if x.startswith("attention backend"))
    assert line.startswith("attention backend auto (memory.attention_backend = \"fastest\": ") and "CUDA" in line
    assert attn.get_attention_backend() == "auto"
    with attn.sampling_attention("same"):
        assert attn.get_attention_backend() == "auto"


def test_the_80gb_preset_takes_the_fastest_exact_kernel():
    from engine.config import load_config

    config = load_config(Path(__file__).resolve().parents[1] / "presets" / "80gb.toml")
    assert config.memory.attention_backend == "fastest"
