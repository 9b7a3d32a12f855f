"""Writing the S2V transformer in the native layout (the official `Wan-AI/Wan2.2-S2V-14B` folder format).

The official folder holds a `config.json` with the official constructor fields and safetensors shards named
`diffusion_pytorch_model-0000K-of-0000N.safetensors` with a `.index.json` weight map, tensors under their
native names. Used by the tiny-model generator and by round-trip tests.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from engine.models.keymap import diffusers_to_native


def native_config(config) -> dict:
    heads, head_dim = config.num_attention_heads, config.attention_head_dim
    return {
        "_class_name": "WanModel_S2V",
        "model_type": "s2v",
        "patch_size": list(config.patch_size),
        "text_len": config.text_len,
        "in_dim": config.in_channels,
        "dim": heads * head_dim,
        "ffn_dim": config.ffn_dim,
        "freq_dim": config.freq_dim,
        "text_dim": config.text_dim,
        "out_dim": config.out_channels,
        "num_heads": heads,
        "num_layers": config.num_layers,
        "window_size": [-1, -1],
        "qk_norm": True,
        "cross_attn_norm": True,
        "eps": config.eps,
        "cond_dim": config.pose_dim,
        "audio_dim": config.audio_dim,
        "num_audio_token": config.num_audio_tokens,
        "enable_adain": config.enable_adain,
        "adain_mode": config.adain_mode,
        "audio_inject_layers": list(config.audio_inject_layers),
        "zero_init": True,
        "zero_timestep": config.zero_timestep,
        "enable_motioner": False,
        "add_last_motion": config.add_last_motion,
        "enable_tsm": False,
        "trainable_token_pos_emb": False,
        "motion_token_num": 1024,
        "enable_framepack": True,
        "framepack_drop_mode": config.framepack_drop_mode,
    }


def save_native(model, folder, max_shard_bytes: int = 10 * 2**30) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], {}, 0
    for name, tensor in model.state_dict().items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[diffusers_to_native(name)] = tensor.detach().contiguous().cpu()
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for s in shards for t in s.values())},
             "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(native_config(model.config), indent=2))
    return folder
