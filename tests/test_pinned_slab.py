"""The exact-size pinned slab (CPU side: layout and sizes) and its two users, block streaming's weight packing and
the host store of saved block inputs, on the tiny model."""
import pytest
import torch

from engine.models.block_stream import pack_into_slab
from engine.models.offload_checkpoint import HostActivationStore
from engine.models.pinned_slab import PAGE, PinnedSlab, aligned, slab_bytes, tensor_bytes, views_bytes

ODD = [((3,), torch.bfloat16), ((5, 7), torch.float32), ((1,), torch.uint8), ((4096,), torch.float16),
       ((2, 3, 5), torch.float64), ((0,), torch.float32), ((1025,), torch.bfloat16)]


@pytest.mark.parametrize("align", [512, 4096])
def test_views_are_contiguous_aligned_disjoint_and_sized_exactly(align):
    sizes = [tensor_bytes(shape, dtype) for shape, dtype in ODD]
    total = views_bytes(sizes, align)
    assert total == sum(-(-n // align) * align for n in sizes)
    slab = PinnedSlab(total, align=align, pin=False)
    views = [slab.view(shape, dtype) for shape, dtype in ODD]
    spans = []
    for (shape, dtype), v in zip(ODD, views):
        assert v.shape == shape and v.dtype == dtype and v.is_contiguous() and not v.is_pinned()
        assert v.data_ptr() % align == 0
        spans.append((v.data_ptr(), v.data_ptr() + v.numel() * v.element_size()))
    nonempty = sorted(s for s in spans if s[1] > s[0])
    assert all(a[1] <= b[0] for a, b in zip(nonempty, nonempty[1:]))
    # Every view lies inside the slab, whose own start is page-aligned; the host holds its aligned sizes + 1 page.
    base = slab._base.data_ptr()
    assert base % PAGE == 0 and all(base <= a and b <= base + slab.capacity for a, b in nonempty)
    assert slab.used <= total <= slab.capacity < total + PAGE
    assert slab.nbytes == slab_bytes(total, align) == aligned(total, PAGE) + PAGE
    # Writing one view leaves the others alone.
    for v in views:
        v.fill_(0)
    views[1].fill_(1.5)
    assert all(not v.any() for i, v in enumerate(views) if i != 1) and bool((views[1] == 1.5).all())


def test_a_full_slab_refuses_and_reset_reuses_the_memory():
    slab = PinnedSlab(8192, pin=False)
    first = slab.view((2048,), torch.float32)
    with pytest.raises(RuntimeError, match="full"):
        slab.view((1,), torch.uint8)
    slab.reset()
    again = slab.view((4, 4), torch.bfloat16)
    assert again.data_ptr() == first.data_ptr()
    first.fill_(2.0)
    slab.release()
    assert slab.nbytes == 0
    with pytest.raises(RuntimeError, match="released"):
        slab.view((1,), torch.uint8)
    assert bool((first == 2.0).all())  # a view keeps its memory after the release, as ordinary memory


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_pinning_without_cuda_is_refused_not_faked():
    with pytest.raises(RuntimeError, match="needs CUDA"):
        PinnedSlab(4096, pin=True)


def _frozen_unit_params(model):
    """The tensors block streaming moves: the frozen ones of the blocks and the audio injectors."""
    return [p for mod in (model.blocks, model.audio_injector) for p in mod.parameters() if not p.requires_grad]


def test_packed_weights_train_the_tiny_model_exactly_as_before(tiny_model_dir):
    """The weights block streaming keeps in the slab are the same numbers: same loss and LoRA gradients, bitwise,
    with the saved inputs in the host store over two window sizes (a bucket change)."""
    from test_model_forward import _inputs, _loss_and_grads, _with_lora

    from engine.models.s2v_transformer import S2VTransformer3DModel

    model = S2VTransformer3DModel.from_pretrained(tiny_model_dir)
    params = _with_lora(model, dropout=0.1)
    model.enable_gradient_checkpointing(interval=1, offload_inputs=True)
    batch = _inputs(model)
    short = {**batch, "hidden_states": batch["hidden_states"][:, :, :3],
             "audio_features": batch["audio_features"][..., :12]}
    store = model._host_store
    saved_sizes = []
    real_save = store.save
    store.save = lambda x: saved_sizes.append(tensor_bytes(x.shape, x.dtype)) or real_save(x)
    reference = [_loss_and_grads(model, b, params) for b in (short, batch, short)]

    frozen = _frozen_unit_params(model)
    slab = pack_into_slab(frozen, pin=False)
    assert slab.nbytes == slab_bytes(views_bytes(tensor_bytes(p.shape, p.dtype) for p in frozen))
    lo, hi = slab._base.data_ptr(), slab._base.data_ptr() + slab.capacity
    assert all(lo <= p.data_ptr() < hi for p in frozen)
    for (ref_loss, ref_grads), b in zip(reference, (short, batch, short)):
        loss, grads = _loss_and_grads(model, b, params)
        assert loss == ref_loss
        assert all(torch.equal(a, g) for a, g in zip(grads, ref_grads))
    # One host slot per checkpointed block, sized for the largest window trained so far, reused by the short one.
    assert len(store._slots) == len(model.blocks) and len(set(saved_sizes)) == 2
    assert all(slot.capacity == aligned(max(saved_sizes), PAGE) for slot in store._slots)
    assert store.host_bytes() == len(model.blocks) * slab_bytes(max(saved_sizes))


def test_host_store_slots_follow_the_largest_window_not_every_shape():
    store = HostActivationStore(offload=True)

    def step(tokens):
        store.begin_step()
        x = torch.randn(1, tokens, 16)
        for _ in range(3):
            store.save(x)
        assert torch.equal(store.load(2), x) and torch.equal(store.load(1), x) and torch.equal(store.load(0), x)

    step(100)
    small = store.host_bytes()
    assert small == 3 * slab_bytes(100 * 16 * 4)
    step(1000)  # a larger bucket replaces each slot once
    large = store.host_bytes()
    assert large == 3 * slab_bytes(1000 * 16 * 4) > small
    step(100)  # and a smaller one fits in the slots already there
    step(640)
    assert store.host_bytes() == large


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the lead's GPU machine)")


@cuda
def test_a_pinned_slab_round_trips_through_the_gpu_and_releases():
    slab = PinnedSlab(3 * 4096 + 10)
    assert slab.pinned
    a, b = slab.view((1000,), torch.float32), slab.view((1000,), torch.float32)
    a.copy_(torch.arange(1000.0))
    gpu = a.to("cuda", non_blocking=True)
    b.copy_(gpu * 2, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(b, torch.arange(1000.0) * 2)
    slab.release()
    assert not slab.pinned and slab.nbytes == 0


@cuda
def test_streamed_blocks_and_host_inputs_train_like_the_resident_model_on_cuda(tiny_model_dir):
    """The engine's 24gb switches with slabs (one resident unit, the rest streamed, inputs in host slots) against the
    same LoRA model kept on the GPU, over a bucket change: the same losses, gradients to fp32 rounding (the GPU's
    kernels are not bitwise reproducible between the two; the code before the slabs differed by the same 2e-8)."""
    from peft import LoraConfig
    from test_model_forward import LORA_TARGETS, _inputs

    from engine.models.s2v_transformer import S2VTransformer3DModel

    device = torch.device("cuda")

    def build(stream):
        model = S2VTransformer3DModel.from_pretrained(tiny_model_dir)
        model.requires_grad_(False)
        torch.manual_seed(0)  # the same LoRA initialisation in both models
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights="gaussian"))
        model.train()
        model.enable_gradient_checkpointing(interval=1, offload_inputs=True)
        if stream:
            model.enable_block_streaming(resident=1, device=device)
        else:
            model.to(device)
        return model, [p for p in model.parameters() if p.requires_grad]

    cpu_batch = _inputs(S2VTransformer3DModel.from_pretrained(tiny_model_dir))
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in cpu_batch.items()}
    short = {**batch, "hidden_states": batch["hidden_states"][:, :, :3],
             "audio_features": batch["audio_features"][..., :12]}
    runs = {}
    for stream in (False, True):
        model, params = build(stream)
        rows = []
        for b in (short, batch, short):
            loss = model(**b).square().mean()
            loss.backward()
            rows.append((loss.item(), [p.grad.clone() for p in params]))
            for p in params:
                p.grad = None
        runs[stream] = rows
    assert model._streamer.slab.pinned and all(slot.pinned for slot in model._host_store._slots)
    for (ref_loss, ref_grads), (loss, grads) in zip(runs[False], runs[True]):
        assert loss == ref_loss
        assert all(torch.allclose(a, g, rtol=0, atol=1e-6) for a, g in zip(ref_grads, grads))
