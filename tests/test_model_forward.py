"""Forward and backward of the tiny S2V transformer on CPU: modes, switches and their exactness."""
import pytest
import torch
from peft import LoraConfig

from engine.models.rope import sequence_positions
from engine.models.s2v_transformer import S2VTransformer3DModel

B, T, H, W = 1, 5, 8, 12
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture()
def model(tiny_model_dir):
    return S2VTransformer3DModel.from_pretrained(tiny_model_dir)


def _inputs(model, motion=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    batch = dict(
        hidden_states=torch.randn(B, 16, T, H, W, generator=g),
        timestep=torch.tensor([640.0] * B),
        encoder_hidden_states=torch.randn(B, 9, cfg.text_dim, generator=g),
        ref_latents=torch.randn(B, 16, 1, H, W, generator=g),
        audio_features=torch.randn(B, cfg.num_weighted_avg_layers, cfg.audio_dim, 4 * T, generator=g),
    )
    if motion:
        batch["motion_latents"] = torch.randn(B, 16, 19, H, W, generator=g)
    else:
        batch["drop_motion_frames"] = True
    return batch


def _with_lora(model, dropout=0.0):
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights="gaussian",
                                 lora_dropout=dropout))
    model.train()
    return [p for p in model.parameters() if p.requires_grad]


def _loss_and_grads(model, batch, params, seed=3):
    torch.manual_seed(seed)
    loss = model(**batch).square().mean()
    loss.backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return loss.item(), grads


@pytest.mark.parametrize("motion", [False, True], ids=["first-clip", "continuation"])
def test_forward_backward_both_modes(model, motion):
    batch = _inputs(model, motion)
    out = model(**batch)
    assert out.shape == (B, 16, T, H, W) and out.dtype == torch.float32
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.frame_packer.proj_4x.weight.grad is not None if motion else model.frame_packer.proj.weight.grad is None


def test_motion_and_reference_change_the_prediction(model):
    batch = _inputs(model, motion=True)
    with torch.no_grad():
        base = model(**batch)
        dropped = model(**{**batch, "drop_motion_frames": True})
        other_ref = model(**{**batch, "ref_latents": batch["ref_latents"] + 1})
    assert (base - dropped).abs().max() > 1e-3
    assert (base - other_ref).abs().max() > 1e-3


def test_pose_none_equals_zero_pose(model):
    batch = _inputs(model)
    with torch.no_grad():
        a = model(**batch)
        b = model(**batch, pose_latents=torch.zeros_like(batch["hidden_states"]))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("offload", [False, True], ids=["checkpoint", "checkpoint+host-offload"])
def test_checkpointing_gives_identical_loss_and_lora_grads(model, offload):
    """Exact (bitwise) on CPU: the recompute replays the same ops, RNG (LoRA dropout) and autocast state."""
    params = _with_lora(model, dropout=0.1)
    batch = _inputs(model)
    ref_loss, ref_grads = _loss_and_grads(model, batch, params)
    model.enable_gradient_checkpointing(interval=1, offload_inputs=offload)
    loss, grads = _loss_and_grads(model, batch, params)
    assert loss == ref_loss
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


def test_selective_checkpointing_is_exact(model):
    """Keeping the self-attention outputs instead of recomputing them changes nothing numerically."""
    params = _with_lora(model, dropout=0.1)
    batch = _inputs(model)
    ref = _loss_and_grads(model, batch, params)
    model.enable_gradient_checkpointing(policy="save_attention")
    got = _loss_and_grads(model, batch, params)
    assert got[0] == ref[0] and all(torch.equal(a, b) for a, b in zip(got[1], ref[1]))
    with pytest.raises(ValueError, match="does not combine"):
        model.enable_gradient_checkpointing(policy="save_attention", offload_inputs=True)


def test_checkpoint_interval_two_is_exact(model):
    params = _with_lora(model)
    batch = _inputs(model)
    ref = _loss_and_grads(model, batch, params)
    model.enable_gradient_checkpointing(interval=2)
    got = _loss_and_grads(model, batch, params)
    assert got[0] == ref[0] and all(torch.equal(a, b) for a, b in zip(got[1], ref[1]))


def test_chunked_ffn_matches_whole_sequence(model):
    batch = _inputs(model)
    with torch.no_grad():
        ref = model(**batch)
        model.set_ffn_chunk_size(37)
        got = model(**batch)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_bf16_agrees_with_fp32(model):
    """Tolerance: relative L2 error under 2% (bf16 has an 8-bit mantissa; the residual stays fp32)."""
    batch = _inputs(model)
    with torch.no_grad():
        ref = model(**batch)
        model.to(torch.bfloat16)
        got = model(**{k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v
                       for k, v in batch.items()})
    rel = (got.float() - ref).norm() / ref.norm()
    assert got.dtype == torch.float32 and rel < 2e-2


def test_bf16_residual_option_stays_close(model):
    batch = _inputs(model)
    with torch.no_grad():
        model.to(torch.bfloat16)
        ref = model(**batch)
        model.residual_fp32 = False
        got = model(**batch)
    assert (got - ref).norm() / ref.norm() < 2e-2


def test_audio_length_must_match_latent_frames(model):
    batch = _inputs(model)
    batch["audio_features"] = batch["audio_features"][..., :-4]
    with pytest.raises(ValueError, match="one wav2vec2 vector per pixel frame"):
        model(**batch)


def test_token_counts_of_the_14b_sequence_at_832x480():
    """Spec 11.2: 21 latents x 1,560 + 1,560 reference = 34,320; framepack motion adds 1,560 + 390 + 364."""
    first = sequence_positions((21, 30, 52), (30, 52), None)
    cont = sequence_positions((21, 30, 52), (30, 52), (60, 104))
    assert len(first) == 34_320 and len(cont) == 36_634
    motion_times = sorted(set(cont[34_320:, 0].astype(int)))
    assert motion_times == [-19, -14, -9, -4, -3, -1]
    assert set(first[32_760:, 0]) == {30.0}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("offload", [False, True], ids=["save_attention", "full+host-offload"])
def test_compiled_blocks_match_eager_with_checkpointing(model, offload):
    """compile_blocks (inductor, as the presets run it; here on the CPU) with per-block checkpointing (the 80gb
    preset's selective policy, or the 32/48gb presets' host-offloaded re-entrant recompute): the same loss and LoRA
    gradients as eager up to fp32 summation order (inductor fuses and reorders the element-wise work)."""
    torch._dynamo.reset()
    params = _with_lora(model)
    batch = _inputs(model)
    if offload:
        model.enable_gradient_checkpointing(offload_inputs=True)
    else:
        model.enable_gradient_checkpointing(policy="save_attention")
    ref_loss, ref_grads = _loss_and_grads(model, batch, params)
    model.compile_blocks()
    torch._dynamo.utils.counters.clear()
    loss, grads = _loss_and_grads(model, batch, params)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # blocks and injectors really compiled
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
