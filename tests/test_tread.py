"""TREAD token routing on the tiny S2V transformer (CPU): exactness at ratio 0, tokens back at their places with
their own RoPE rows, the audio injector per frame, the loss on every token, gradients into the routed LoRA, the
memory switches, and the config keys."""
import pytest
import torch
from peft import LoraConfig

from engine.config import check_config, with_value
from engine.config.schema import Config
from engine.models import tread
from engine.models.s2v_transformer import S2VTransformer3DModel
from engine.models.tread import TokenRoute, draw_kept, resolve_span, routed_rope

B, T, H, W = 1, 5, 8, 12  # 5 latent frames of 4x6 = 24 video tokens each
PER_FRAME = (H // 2) * (W // 2)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture()
def model(tiny_model_dir):
    return S2VTransformer3DModel.from_pretrained(tiny_model_dir)


def _inputs(model, seed=0, frames=T, height=H):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return {
        "hidden_states": torch.randn(B, 16, frames, height, W, generator=g),
        "timestep": torch.tensor([640.0] * B),
        "encoder_hidden_states": torch.randn(B, 9, cfg.text_dim, generator=g),
        "ref_latents": torch.randn(B, 16, 1, height, W, generator=g),
        "audio_features": torch.randn(B, cfg.num_weighted_avg_layers, cfg.audio_dim, 4 * frames, generator=g),
        "motion_latents": torch.randn(B, 16, 19, height, W, generator=g),
    }


def _with_lora(model, dropout=0.1):
    model.requires_grad_(False)
    torch.manual_seed(0)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights="gaussian",
                                 lora_dropout=dropout))
    for n, p in model.named_parameters():
        if ".lora_B" in n:  # non-zero, so that every LoRA gradient depends on the whole backward
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(n)))
    model.train()
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _route(ratio=0.5, start=1, end=2, seed=7):
    return TokenRoute(ratio, start, end, torch.Generator().manual_seed(seed))


def _loss_and_grads(model, batch, params, route=None):
    torch.manual_seed(3)  # LoRA dropout: every compared run draws the same
    kwargs = {} if route is None else {"route": route}
    loss = model(**batch, **kwargs).square().mean()
    loss.backward()
    grads = [p.grad.clone() for _, p in params]
    for _, p in params:
        p.grad = None
    return loss.item(), grads


def _same(a, b):
    return a[0] == b[0] and all(torch.equal(x, y) for x, y in zip(a[1], b[1], strict=True))


# ---- the subset and the span ------------------------------------------------------------------------------------
def test_span_indices_resolve_like_python_and_refuse_an_empty_span():
    assert resolve_span(2, -2, 40) == (2, 38)
    assert resolve_span(-3, -1, 4) == (1, 3)
    for start, end in ((3, 1), (0, 4), (-5, 2), (-1, -2)):
        with pytest.raises(ValueError, match="tread.start_layer_idx"):
            resolve_span(start, end, 4)


def test_kept_tokens_are_the_same_number_in_every_frame_and_differ_between_draws():
    g = torch.Generator().manual_seed(0)
    kept = draw_kept(T, PER_FRAME, 0.5, g)
    assert kept.shape == (T * PER_FRAME // 2,) and torch.equal(kept, kept.sort().values)
    assert kept.unique().numel() == kept.numel()
    assert torch.bincount(kept // PER_FRAME, minlength=T).tolist() == [PER_FRAME // 2] * T
    assert not torch.equal(kept, draw_kept(T, PER_FRAME, 0.5, g))  # the generator moves on
    assert torch.equal(draw_kept(T, PER_FRAME, 0.0, g), torch.arange(T * PER_FRAME))
    assert draw_kept(T, PER_FRAME, 0.25, g).numel() == T * (PER_FRAME - 6)
    with pytest.raises(ValueError, match="tread.selection_ratio"):
        draw_kept(T, 1, 0.5, g)


# ---- exactness and placement --------------------------------------------------------------------------------------
@pytest.mark.parametrize("switch", ["none", "full", "save_attention", "offload"])
def test_ratio_zero_is_bit_identical_to_no_routing(model, switch):
    params = _with_lora(model)
    if switch == "offload":
        model.enable_gradient_checkpointing(offload_inputs=True)
    elif switch != "none":
        model.enable_gradient_checkpointing(policy=switch)
    batch = _inputs(model)
    plain = _loss_and_grads(model, batch, params)
    assert _same(_loss_and_grads(model, batch, params, _route(0.0, 0, -1)), plain)
    assert _same(_loss_and_grads(model, batch, params, _route(0.0, 1, 2)), plain)
    routed = _loss_and_grads(model, batch, params, _route(0.5))
    assert routed[0] != plain[0]  # routing half the tokens is not a no-op


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tokens_keep_their_rope_rows_and_return_to_their_places(model, checkpointing):
    """Blocks replaced by a probe: it checks that each token it gets carries the RoPE row of its own position
    (the input encodes every token's position, the table is made of positions too), that the video count it is
    given is the kept count, and adds 1. Afterwards every token is at its place, with +1 per block it went through:
    all blocks for the reference/motion tokens and the kept ones, the blocks outside the span for the skipped."""
    n_video, n_cond, dim = T * PER_FRAME, 7, 4
    seq = n_video + n_cond
    position = torch.arange(seq, dtype=torch.float64)
    x = (position * 1000)[None, :, None].expand(B, seq, dim).clone().requires_grad_(checkpointing)
    rope = (position[:, None].expand(seq, 3).clone(), -position[:, None].expand(seq, 3).clone())
    route = _route(0.5, 1, 2)
    seen = []

    def probe(i, h, e0, n_vid, rope_rows, *rest):
        ids = torch.div(h[0, :, 0], 1000, rounding_mode="floor")
        assert torch.equal(ids, rope_rows[0][:, 0]) and torch.equal(rope_rows[1][:, 0], -ids)
        seen.append((i, n_vid, h.shape[1]))
        return h + 1

    model._block_and_injector = probe
    model.train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    kept = draw_kept(T, PER_FRAME, 0.5, torch.Generator().manual_seed(7))
    out = model._run_blocks(x, (None, n_video, rope, None, torch.float64, None, None),
                            model._routing(route, (T, H // 2, W // 2), x.device))
    n_kept = kept.numel()
    assert seen == [(0, n_video, seq), (1, n_kept, n_kept + n_cond), (2, n_kept, n_kept + n_cond),
                    (3, n_video, seq)]
    passes = torch.full((seq,), 4.0, dtype=torch.float64)
    passes[:n_video] = 2.0
    passes[kept] = 4.0
    assert torch.equal(out[0, :, 0], position * 1000 + passes)
    if checkpointing:  # every token's input still gets its gradient, through the span or around it
        out.sum().backward()
        assert torch.equal(x.grad, torch.ones_like(x))


def test_identity_blocks_give_the_input_back(model):
    n_video, seq = T * PER_FRAME, T * PER_FRAME + 5
    x = torch.randn(B, seq, 6)
    rope = (torch.randn(seq, 3), torch.randn(seq, 3))
    model._block_and_injector = lambda i, h, *rest: h
    model.train()
    out = model._run_blocks(x, (None, n_video, rope, None, torch.float32, None, None),
                            model._routing(_route(0.75, 0, -1), (T, H // 2, W // 2), x.device))
    assert torch.equal(out, x)


def test_audio_injector_in_the_span_acts_on_each_kept_token_with_its_own_frame(model):
    """The injector cuts the video tokens into equal frames; with a stratified subset, the kept tokens cut the same
    way are each frame's kept tokens, so each gets what it gets in the full sequence."""
    dim = model.inner_dim
    n_video, n_cond = T * PER_FRAME, 9
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, n_video + n_cond, dim, generator=g)
    audio_local = torch.randn(B, T, 5, dim, generator=g)
    audio_global = torch.randn(B, T, 1, dim, generator=g)
    with torch.no_grad():
        full = model.audio_injector(0, x, audio_local, audio_global, n_video)
        kept = draw_kept(T, PER_FRAME, 0.5, torch.Generator().manual_seed(2))
        routed, _ = tread.route_in(x, kept, n_video)
        got = model.audio_injector(0, routed, audio_local, audio_global, kept.numel())
    torch.testing.assert_close(got[:, :kept.numel()], full[:, kept], rtol=1e-5, atol=1e-6)
    assert torch.equal(got[:, kept.numel():], full[:, n_video:])  # reference and motion untouched
    rows = routed_rope((torch.arange(n_video + n_cond)[:, None],) * 2, kept, n_video)[0][:, 0]
    assert torch.equal(rows, torch.cat([kept, torch.arange(n_video, n_video + n_cond)]))


# ---- what the loss and the gradients see ----------------------------------------------------------------------
def test_the_loss_covers_every_token_and_reaches_the_routed_lora(model):
    params = _with_lora(model, dropout=0.0)
    batch = _inputs(model)
    latents = batch["hidden_states"].requires_grad_(True)
    out = model(**batch, route=_route(0.5, 1, 2))
    assert out.shape == latents.shape
    out.square().mean().backward()
    # Every latent pixel's gradient is non-zero: each token, skipped or kept, reaches the loss.
    assert (latents.grad.abs().sum(dim=1) > 0).all()
    names = [n for n, p in params if p.grad is None or not p.grad.abs().sum() > 0]
    assert names == []  # blocks 1-2 (routed), 0 and 3, and both injectors (0 outside the span, 3 too)


def test_injector_inside_the_span_gets_gradients(tiny_model_dir):
    model = S2VTransformer3DModel.from_pretrained(tiny_model_dir)
    params = _with_lora(model, dropout=0.0)
    model(**_inputs(model), route=_route(0.5, 0, -1)).square().mean().backward()  # both injectors routed
    injector = [(n, p) for n, p in params if "audio_injector" in n]
    assert injector and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in injector)


def test_sampling_never_routes(model):
    model.eval()
    with pytest.raises(RuntimeError, match="training only"):
        model(**_inputs(model), route=_route())


# ---- memory switches ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("switch", ["full", "save_attention", "offload", "offload_keep_last", "interval_2"])
def test_routed_step_is_exact_under_checkpointing(model, switch):
    params = _with_lora(model)
    batch = _inputs(model)
    ref = _loss_and_grads(model, batch, params, _route())
    if switch == "interval_2":
        model.enable_gradient_checkpointing(interval=2)
    elif switch.startswith("offload"):
        model.enable_gradient_checkpointing(offload_inputs=True, gpu_saved_inputs=2 if "keep" in switch else 0)
    else:
        model.enable_gradient_checkpointing(policy=switch)
    assert _same(_loss_and_grads(model, batch, params, _route()), ref)
    if switch == "offload":
        # Slot n holds the n-th saved input of a step: the routed blocks' slots are sized by their shorter inputs,
        # and the next steps (another subset, or more tokens skipped) fit in them without a new allocation.
        slots = [slot.capacity for slot in model._host_store._slots]
        assert len(slots) == len(model.blocks) and slots[1] == slots[2] < slots[0] == slots[3]
        _loss_and_grads(model, batch, params, _route(seed=9))
        _loss_and_grads(model, batch, params, _route(0.75))
        assert [slot.capacity for slot in model._host_store._slots] == slots


def test_routed_step_is_exact_with_streamed_blocks(tiny_model_dir):
    model = S2VTransformer3DModel.from_pretrained(tiny_model_dir)
    params = _with_lora(model)
    model.enable_gradient_checkpointing(interval=1)
    batch = _inputs(model)
    ref = _loss_and_grads(model, batch, params, _route())
    streamed = S2VTransformer3DModel.from_pretrained(tiny_model_dir)
    params = _with_lora(streamed)
    streamed.enable_gradient_checkpointing(interval=1, offload_inputs=True)
    streamed.enable_block_streaming(resident=1, device=torch.device("cpu"))
    assert _same(_loss_and_grads(streamed, batch, params, _route()), ref)


def test_routed_step_with_a_low_bit_base(tiny_model_dir):
    from engine.models.low_bit_linear import quantize_base_linears

    model = S2VTransformer3DModel.from_pretrained(tiny_model_dir, torch_dtype=torch.bfloat16)
    params = _with_lora(model)
    quantize_base_linears(model, kind="int8", device=torch.device("cpu"))
    model.enable_gradient_checkpointing(offload_inputs=True)
    batch = {k: v.bfloat16() for k, v in _inputs(model).items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = _loss_and_grads(model, batch, params, _route(0.0))
        loss, grads = _loss_and_grads(model, batch, params, _route(0.5))
    assert loss != plain[0] and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.timeout(300)
def test_compiled_blocks_without_routing_make_a_second_graph_at_the_second_shape_then_none(model):
    """compile_blocks' graph count for a run without TREAD (forwards, as validation runs them): the first bucket
    compiles static graphs, the second one dynamic graph per kind (automatic dynamic shapes), a third nothing."""
    torch._dynamo.reset()
    model.eval()
    model.compile_blocks(backend="aot_eager")
    torch._dynamo.utils.counters.clear()
    counts = []
    with torch.no_grad():
        for frames, height in ((4, 16), (3, 8), (2, 12)):
            model(**_inputs(model, frames=frames, height=height))
            counts.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert 0 < counts[0] < counts[1] == counts[2], counts
    torch._dynamo.reset()


@pytest.mark.timeout(600)
def test_inductor_with_padding_recomputes_a_routed_step_under_the_graph_it_ran(model):
    """The engine's compile under TREAD (routed=True, inductor, save_attention): the first step is routed and an
    injector sits before the span, so a static graph (its buffers padded by inductor, as on CUDA; the CPU pads
    nothing unless told) would run that injector's forward and a dynamic one, made later in the step, its
    recompute; the static backward then meets unpadded saved tensors (the 14B failed so on the H200). Padding is
    forced on here with a low threshold so that the tiny shapes are padded as the 14B's are."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    params = _with_lora(model, dropout=0.0)
    # 4 frames of 8x6 tokens: no size of the first call equals another by chance (dynamo would tie them: "duck
    # sizing"), so the later shapes below reuse the graph.
    batch = _inputs(model, frames=4, height=16)
    model.enable_gradient_checkpointing(policy="save_attention")
    span = (1, len(model.blocks) - 1)  # the tiny model's injectors sit at blocks 0 (before) and 3 (inside)
    assert 0 in model.injector_of_block and span[1] in model.injector_of_block
    ref = _loss_and_grads(model, batch, params, _route(0.25, *span))
    with inductor_config.patch(disable_padding_cpu=False, padding_stride_threshold=8):
        model.compile_blocks(routed=True)
        torch._dynamo.utils.counters.clear()
        loss, grads = _loss_and_grads(model, batch, params, _route(0.25, *span))
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        _loss_and_grads(model, batch, params)
        _loss_and_grads(model, _inputs(model, frames=3, height=8), params, _route(0.5, *span))
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # one graph per kind
    assert abs(loss - ref[0]) <= 1e-4 * abs(ref[0])
    for a, b in zip(grads, ref[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    torch._dynamo.reset()


# ---- config ---------------------------------------------------------------------------------------------------
def test_tread_keys_are_checked():
    base = Config()
    assert base.tread.enabled is False and check_config(base) == []
    bad = with_value(base, "tread.selection_ratio", 1.0)
    assert [e.key for e in check_config(bad)] == ["tread.selection_ratio"]
    empty = with_value(with_value(base, "tread.start_layer_idx", 5), "tread.end_layer_idx", 3)
    assert [e.key for e in check_config(empty)] == ["tread.start_layer_idx"]
    mixed = with_value(base, "tread.start_layer_idx", -3)  # with end -2: resolved against the model
    assert check_config(mixed) == []
    assert with_value(base, "tread.enabled", True).identity_hash() != base.identity_hash()


# ---- the trainer ------------------------------------------------------------------------------------------------
def test_a_resumed_tread_run_equals_an_uninterrupted_one(tiny_model_dir, tmp_path):
    import threading

    from test_train_run import (  # tests/ is on sys.path
        _config,
        _kinds,
        _losses,
        demo_dataset,
        stop_then_resume,
    )

    from engine.models.lora import load_lora
    from engine.runner import run

    config = _config(tiny_model_dir, tmp_path, optim__max_steps=8, checkpoint__every_steps=3,
                     tread__enabled=True, tread__selection_ratio=0.5, tread__start_layer_idx=1)
    plain = _config(tiny_model_dir, tmp_path, optim__max_steps=8, checkpoint__every_steps=3)
    reference = run(config, [], threading.Event(), run_dir=tmp_path / "ref", dataset=demo_dataset(), device="cpu")
    assert reference.status == "completed", reference.reason
    untouched = run(plain, [], threading.Event(), run_dir=tmp_path / "plain", dataset=demo_dataset(), device="cpu")
    first = _losses(tmp_path / "plain")
    assert all(first[s] != v for s, v in _losses(tmp_path / "ref").items())  # routing is really on
    assert untouched.status == "completed"

    stopped, resumed = stop_then_resume(config, tmp_path / "resumed", 5)
    assert stopped.status == "stopped", stopped.reason
    assert resumed.status == "completed", resumed.reason
    assert [e.resumed_from_step for e in _kinds(tmp_path / "resumed", "run_started")] == [0, 5]
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "ref")
    a, _ = load_lora(reference.outputs["peft"])
    b, _ = load_lora(resumed.outputs["peft"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_span_outside_the_model_folder_fails_in_the_check_phase(tiny_model_dir, tmp_path):
    from engine import runner

    config = with_value(with_value(Config(), "model.source", str(tiny_model_dir)), "tread.enabled", True)
    runner._check_model_folder(config)  # 2..-2 of the tiny model's 4 blocks: block 2
    config = with_value(config, "tread.start_layer_idx", -5)
    with pytest.raises(runner.RunFailed, match=r"tread.start_layer_idx = -5 .* 4 blocks.*Nothing was cached"):
        runner._check_model_folder(config)
    runner._check_model_folder(with_value(config, "tread.enabled", False))  # off: the span is not used


def test_a_span_outside_the_model_fails_before_the_first_step(tiny_model_dir, tmp_path):
    import threading

    from test_train_run import _config, _kinds, demo_dataset

    from engine.runner import run

    config = _config(tiny_model_dir, tmp_path, tread__enabled=True, tread__start_layer_idx=1,
                     tread__end_layer_idx=9)
    end = run(config, [], threading.Event(), run_dir=tmp_path / "run", dataset=demo_dataset(), device="cpu")
    assert end.status == "failed" and "tread.end_layer_idx = 9" in end.reason and "4 blocks" in end.reason
    assert _kinds(tmp_path / "run", "step_end") == []


@pytest.mark.timeout(600)
# FSDP: its sharded forward is the one routing could break; DDP runs the one-process forward on each rank.
@pytest.mark.parametrize("strategy", ["fsdp"])
def test_two_processes_route_one_subset_per_global_batch(tiny_model_dir, tmp_path, strategy):
    """2 processes of batch 1 train the LoRA of one process of batch 2, with TREAD on: every rank draws the same
    subset, the one the single process draws for its batch of 2 (the distributed tests' launcher and tolerance)."""
    import threading

    from test_train_distributed import CLIPS, _config, _launch, _lora_matches

    from engine.runner import run
    from engine.train.synthetic import SyntheticLatentDataset

    tread_on = {"tread.enabled": True, "tread.selection_ratio": 0.5, "tread.start_layer_idx": 1}
    single = _config(tiny_model_dir, tmp_path / "runs", **{"optim.batch_size": 2}, **tread_on)
    end = run(single, [], threading.Event(), run_dir=tmp_path / "single", dataset=SyntheticLatentDataset(CLIPS),
              device="cpu")
    assert end.status == "completed", end.reason
    run_dir, _ = _launch(tmp_path, _config(tiny_model_dir, tmp_path / "runs", **{"distributed.strategy": strategy},
                                           **tread_on), strategy)
    _lora_matches(run_dir, tmp_path / "single")


def test_crepa_block_inside_the_routed_span_is_refused_before_anything_runs(tiny_model_dir, tmp_path):
    """CREPA reads one block's output per latent frame: inside the span it holds only the kept tokens, so the
    check phase refuses it (a model folder) and so does the trainer (a hub id or a caller's dataset)."""
    import threading

    from test_train_run import _config, _kinds, demo_dataset

    from engine import runner

    config = with_value(with_value(Config(), "model.source", str(tiny_model_dir)), "tread.enabled", True)
    config = with_value(with_value(config, "crepa.enabled", True), "crepa.encoder", str(tiny_model_dir / "dinov2"))
    config = with_value(with_value(config, "tread.start_layer_idx", 0), "tread.end_layer_idx", 2)
    for block in (0, 1):  # inside 0..2 (block 2 hands back every token)
        with pytest.raises(runner.RunFailed, match=rf"crepa.block_index = {block} lies inside the TREAD span"):
            runner._check_model_folder(with_value(config, "crepa.block_index", block))
    runner._check_model_folder(with_value(config, "crepa.block_index", 2))
    runner._check_model_folder(with_value(config, "crepa.block_index", 3))

    run_config = _config(tiny_model_dir, tmp_path, tread__enabled=True, tread__start_layer_idx=1,
                         tread__end_layer_idx=3, crepa__enabled=True, crepa__block_index=1,
                         crepa__encoder=str(tiny_model_dir / "dinov2"))
    end = runner.run(run_config, [], threading.Event(), run_dir=tmp_path / "run", dataset=demo_dataset(),
                     device="cpu")
    assert end.status == "failed" and "crepa.block_index = 1 lies inside the TREAD span" in end.reason
    assert _kinds(tmp_path / "run", "step_end") == []


def test_the_model_refuses_to_keep_a_routed_block_for_crepa():
    from engine.models.tread import check_capture_outside

    check_capture_outside(1, 3, 0)
    check_capture_outside(1, 3, 3)
    with pytest.raises(ValueError, match="crepa.block_index = 2 lies inside"):
        check_capture_outside(1, 3, 2)
