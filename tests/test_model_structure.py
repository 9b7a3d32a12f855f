"""The transformer's tensors against the real checkpoint's manifest, and strict loading in both layouts."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.models.keymap import detect_layout, diffusers_to_native, manifest_14b, native_to_diffusers
from engine.models.loading import CheckpointError
from engine.models.native_io import save_native
from engine.models.s2v_transformer import S2VTransformer3DModel


@pytest.fixture(scope="module")
def meta_14b():
    with torch.device("meta"):
        return S2VTransformer3DModel()


def test_default_config_is_the_14b_checkpoint(meta_14b):
    ours = {k: tuple(v.shape) for k, v in meta_14b.state_dict().items()}
    manifest = {diffusers: shape for _, diffusers, shape in manifest_14b()}
    assert len(manifest) == 1260
    assert ours == manifest
    assert sum(p.numel() for p in meta_14b.parameters()) == 16_295_755_609


def test_names_round_trip_through_both_layouts(meta_14b):
    for native, diffusers, _ in manifest_14b():
        assert diffusers_to_native(diffusers) == native
        assert native_to_diffusers(native) == diffusers
    natives = [n for n, _, _ in manifest_14b()]
    assert detect_layout(natives) == "native"
    assert detect_layout(meta_14b.state_dict().keys()) == "diffusers"


def test_unknown_names_are_rejected():
    with pytest.raises(KeyError, match="blocks.0.attn1.to_x"):
        diffusers_to_native("blocks.0.attn1.to_x.weight")
    with pytest.raises(KeyError):
        native_to_diffusers("motioner.blocks.0.self_attn.q.weight")


def test_lora_targets_are_the_368_attention_linears(meta_14b):
    targets = [n for n, m in meta_14b.named_modules()
               if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0")
               and (".to_" in n)]
    assert len(targets) == 368
    assert all(diffusers_to_native(n).rsplit(".", 1)[-1] in ("q", "k", "v", "o") for n in targets)


def test_both_layouts_load_to_identical_weights(tiny_model_dir, tmp_path):
    model = S2VTransformer3DModel.from_pretrained(tiny_model_dir)
    save_native(model, tmp_path / "native", max_shard_bytes=100_000)
    native = S2VTransformer3DModel.from_pretrained(tmp_path / "native")
    a, b = model.state_dict(), native.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert native.config.num_weighted_avg_layers == model.config.num_weighted_avg_layers


def test_load_casts_to_the_requested_dtype(tiny_model_dir):
    model = S2VTransformer3DModel.from_pretrained(tiny_model_dir, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())


def _single_file_copy(src_dir, dst, edit):
    """Copy a transformer folder into one unindexed safetensors file after `edit(state_dict)`."""
    sd = {}
    for f in sorted((src_dir / "transformer").glob("*.safetensors")):
        sd.update(load_file(f))
    edit(sd)
    dst.mkdir()
    save_file(sd, dst / "diffusion_pytorch_model.safetensors")
    (dst / "config.json").write_text((src_dir / "transformer" / "config.json").read_text())
    return dst


def test_missing_tensor_is_named(tiny_model_dir, tmp_path):
    folder = _single_file_copy(tiny_model_dir, tmp_path / "t", lambda sd: sd.pop("blocks.1.attn2.norm_k.weight"))
    with pytest.raises(CheckpointError, match=r"1 missing tensors: blocks\.1\.attn2\.norm_k\.weight"):
        S2VTransformer3DModel.from_pretrained(folder)


def test_unexpected_tensor_is_named(tiny_model_dir, tmp_path):
    def add(sd):
        sd["blocks.0.attn1.extra_bias"] = torch.zeros(3)

    folder = _single_file_copy(tiny_model_dir, tmp_path / "t", add)
    with pytest.raises(CheckpointError, match=r"unexpected tensors: blocks\.0\.attn1\.extra_bias"):
        S2VTransformer3DModel.from_pretrained(folder)


def test_misshaped_tensor_is_named(tiny_model_dir, tmp_path):
    def shrink(sd):
        sd["proj_out.weight"] = sd["proj_out.weight"][:10]

    folder = _single_file_copy(tiny_model_dir, tmp_path / "t", shrink)
    with pytest.raises(CheckpointError, match=r"proj_out\.weight has shape \[10, 48\], the model needs \[64, 48\]"):
        S2VTransformer3DModel.from_pretrained(folder)


def test_official_config_with_another_architecture_is_refused(tiny_model_dir, tmp_path):
    model = S2VTransformer3DModel.from_pretrained(tiny_model_dir)
    folder = save_native(model, tmp_path / "native")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["enable_motioner"] = True
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="enable_motioner=True is not supported"):
        S2VTransformer3DModel.from_pretrained(folder)


def test_hub_id_without_network_fails_fast_with_advice():
    with pytest.raises(FileNotFoundError, match="local folder"):
        S2VTransformer3DModel.from_pretrained("Wan-AI/Wan2.2-S2V-14B")


def test_missing_folder_says_what_to_point_at(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        S2VTransformer3DModel.from_pretrained(tmp_path / "empty")


@pytest.mark.parametrize("source", ["/data/models/wan-s2v", "./models/x"])
def test_missing_local_source_is_said_by_every_loader(source):
    from engine.data.cache_fill import resolve_model_root
    from engine.models import components

    loaders = [lambda: S2VTransformer3DModel.from_pretrained(source), lambda: resolve_model_root(source),
               lambda: components.load_vae(source), lambda: components.load_text_encoder(source),
               lambda: components.load_audio_encoder(source)]
    for load in loaders:  # before: huggingface_hub's "Repo id must be in the form ..." for most of them
        with pytest.raises(FileNotFoundError) as info:
            load()
        text = str(info.value)
        assert f"the folder {source} does not exist" in text and "owner/name" in text and "Repo id" not in text


def _cut(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])


@pytest.mark.parametrize("keep", [lambda n: n // 2, lambda n: n - 1, lambda n: 5, lambda n: 12],
                         ids=["half", "last-byte", "inside-the-length", "inside-the-header"])
def test_truncated_transformer_shard_is_named(tiny_model_dir, tmp_path, keep):
    import shutil

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    shard = sorted((model / "transformer").glob("*.safetensors"))[2]
    _cut(shard, keep)
    with pytest.raises(CheckpointError) as info:
        S2VTransformer3DModel.from_pretrained(model)
    assert str(shard) in str(info.value) and "truncated" in str(info.value) and "download it again" in str(info.value)


@pytest.mark.parametrize(("folder", "load"), [("vae", "load_vae"), ("text_encoder", "load_text_encoder"),
                                              ("audio_encoder", "load_audio_encoder")])
def test_truncated_encoder_weights_are_named(tiny_model_dir, tmp_path, folder, load):
    import shutil

    from engine.models import components

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    weights = next((model / folder).glob("*.safetensors"))
    _cut(weights, lambda n: n * 2 // 3)
    with pytest.raises(CheckpointError) as info:
        getattr(components, load)(model)
    assert str(weights) in str(info.value) and "truncated" in str(info.value)


def test_truncated_lora_file_is_named(tmp_path):
    from engine.models.lora import load_lora

    path = tmp_path / "my_lora.safetensors"
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 8)}, path)
    _cut(path, lambda n: n - 16)
    with pytest.raises(CheckpointError, match="my_lora.safetensors: the weights file is truncated"):
        load_lora(path)


# ---- load hooks (quantised while loading) --------------------------------------------------------------------
def _scattered_copy(src_dir, dst, shards=3, seed=0):
    """The tiny transformer in `shards` indexed shards with every tensor in a random one: a Linear's weight and
    bias often land in different shards, in either order."""
    sd = {}
    for f in sorted((src_dir / "transformer").glob("*.safetensors")):
        sd.update(load_file(f))
    g = torch.Generator().manual_seed(seed)
    where = {k: f"part-{int(torch.randint(shards, (1,), generator=g))}.safetensors" for k in sd}
    dst.mkdir()
    for name in set(where.values()):
        save_file({k: v for k, v in sd.items() if where[k] == name}, dst / name)
    (dst / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": where}))
    (dst / "config.json").write_text((src_dir / "transformer" / "config.json").read_text())
    return dst, where


def test_a_hook_runs_once_when_its_last_tensor_arrives_whatever_the_shard_order(tiny_model_dir, tmp_path):
    from engine.models.loading import load_state_into
    from engine.models.low_bit_linear import LowBitSpec

    folder, where = _scattered_copy(tiny_model_dir, tmp_path / "t")
    split = [n for n in ("blocks.0.attn1.to_q", "blocks.2.ffn.net.0.proj", "blocks.3.attn2.to_out.0")
             if where[f"{n}.weight"] != where[f"{n}.bias"]]
    assert len(split) >= 2  # the seed scatters some Linears over two shards
    with torch.device("meta"):
        model = S2VTransformer3DModel(**S2VTransformer3DModel.from_pretrained(tiny_model_dir).config)
    calls = []

    def hook(model, name):
        module = model.get_submodule(name)
        assert not module.weight.is_meta and not module.bias.is_meta  # both placed before the hook
        calls.append(name)

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    load_state_into(model, folder, None, torch.device("cpu"), {n: hook for n in names})
    assert sorted(calls) == sorted(names)  # each exactly once
    # The low-bit load from the scattered shards equals the one from the single-file folder, tensor for tensor.
    spec = LowBitSpec("fp8")
    a = S2VTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16, low_bit=spec).state_dict()
    b = S2VTransformer3DModel.from_pretrained(tiny_model_dir, torch_dtype=torch.bfloat16, low_bit=spec).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sum(k.endswith(".weight_q") for k in a) == 40


def test_the_native_layout_loads_to_the_same_low_bit_model(tiny_model_dir, tmp_path):
    from engine.models.low_bit_linear import LowBitSpec

    spec = LowBitSpec("int8", ("self_attn", "cross_attn", "ffn", "audio_attn"))
    save_native(S2VTransformer3DModel.from_pretrained(tiny_model_dir), tmp_path / "native", max_shard_bytes=100_000)
    a = S2VTransformer3DModel.from_pretrained(tiny_model_dir, torch_dtype=torch.bfloat16, low_bit=spec).state_dict()
    native = tmp_path / "native"
    b = S2VTransformer3DModel.from_pretrained(native, torch_dtype=torch.bfloat16, low_bit=spec).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sum(k.endswith(".weight_q") for k in a) == 48


@pytest.mark.parametrize("edit,message", [
    (lambda sd: sd.pop("blocks.1.ffn.net.2.weight"), r"1 missing tensors: blocks\.1\.ffn\.net\.2\.weight"),
    (lambda sd: sd.__setitem__("blocks.0.attn1.to_q.weight", sd["blocks.0.attn1.to_q.weight"][:7]),
     r"blocks\.0\.attn1\.to_q\.weight has shape \[7, 48\], the model needs \[48, 48\]"),
    (lambda sd: sd.__setitem__("blocks.0.attn1.to_q.extra", torch.zeros(2)),
     r"unexpected tensors: blocks\.0\.attn1\.to_q\.extra"),
])
def test_a_low_bit_load_stays_strict(tiny_model_dir, tmp_path, edit, message):
    from engine.models.low_bit_linear import LowBitSpec

    folder = _single_file_copy(tiny_model_dir, tmp_path / "t", edit)
    with pytest.raises(CheckpointError, match=message):
        S2VTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16, low_bit=LowBitSpec("int8"))


def test_a_hook_must_name_a_module_with_tensors(tiny_model_dir):
    from engine.models.loading import load_state_into, resolve_transformer_dir

    model = S2VTransformer3DModel.from_pretrained(tiny_model_dir)
    with torch.device("meta"):
        model = S2VTransformer3DModel(**model.config)
    for name in ("blocks.0.attn1.nope", "blocks.0.ffn.net.1"):  # no such module; a module without tensors
        with pytest.raises((ValueError, AttributeError), match="nope|not a module with tensors"):
            load_state_into(model, resolve_transformer_dir(tiny_model_dir), None, torch.device("cpu"),
                            {name: lambda m, n: None})


def _mapped(folder) -> int:
    """How many mappings of `folder`'s shard files this process holds (Linux)."""
    from pathlib import Path

    text = Path("/proc/self/maps").read_text()
    return sum(str(f) in text for f in folder.glob("*.safetensors"))


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="reads /proc/self/maps")
def test_a_low_bit_model_keeps_no_view_of_the_mapped_shards(tiny_model_dir, tmp_path, monkeypatch):
    """The pages of the Linears made low-bit leave the process: the kept bf16 tensors are copies, and each shard
    is mapped afresh every REMAP_BYTES; a bf16 CPU load keeps its views of the files (read when used)."""
    import engine.models.loading as loading
    from engine.models.low_bit_linear import LowBitSpec

    folder, _ = _scattered_copy(tiny_model_dir, tmp_path / "t")
    opened = []
    real_open = loading.safe_open
    monkeypatch.setattr(loading, "safe_open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    monkeypatch.setattr(loading, "REMAP_BYTES", 20_000)
    # No dtype: the tensors are placed as stored (fp32), which without `copy` would be views of the files.
    small = S2VTransformer3DModel.from_pretrained(folder, low_bit=LowBitSpec("int8"))
    assert _mapped(folder) == 0
    assert len(opened) > 2 * 3 + 10  # the key listings, then one handle per 20 kB read instead of one per shard
    plain = S2VTransformer3DModel.from_pretrained(folder)
    assert _mapped(folder) >= 3  # each shard at least once (mapped afresh every 20 kB, the views keep them all)
    del plain
    assert _mapped(folder) == 0
    monkeypatch.undo()
    ref = S2VTransformer3DModel.from_pretrained(tiny_model_dir, low_bit=LowBitSpec("int8")).state_dict()
    got = small.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
