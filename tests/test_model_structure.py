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
    from engine.train.lora import load_lora

    path = tmp_path / "my_lora.safetensors"
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 8)}, path)
    _cut(path, lambda n: n - 16)
    with pytest.raises(CheckpointError, match="my_lora.safetensors: the weights file is truncated"):
        load_lora(path)
