"""The exact-size pinned slab, CPU side: layout and sizes."""
import pytest
import torch

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
