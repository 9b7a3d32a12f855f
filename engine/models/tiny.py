"""A tiny S2V model folder in the real layout, for tests and the demo (nothing is downloaded).

Same classes and folder layout as the diffusers S2V repository (`transformer/`, `vae/`, `text_encoder/`,
`tokenizer/`, `audio_encoder/`, `audio_processor/`, `scheduler/`, `model_index.json`), tiny widths, every
structural feature kept: several blocks, two audio injectors, framepack motion, AdaLN audio, the fp32 paths.
Beside them `dinov2/`, a tiny DINOv2 (transformers Dinov2Model) that crepa.encoder can name in tests.
Weights are deterministic for a seed. The tokenizer comes from a committed fixture so token ids do not depend on
the installed `tokenizers` release.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

# UMT5 and wav2vec2 widths feed the transformer's text_dim / audio_dim.
TINY_TEXT_DIM = 32
TINY_AUDIO_DIM = 32
TINY_AUDIO_LAYERS = 2  # wav2vec2 transformer layers; hidden states = layers + 1

TINY_TRANSFORMER = dict(
    num_attention_heads=2,
    attention_head_dim=24,
    ffn_dim=96,
    num_layers=4,
    text_dim=TINY_TEXT_DIM,
    audio_dim=TINY_AUDIO_DIM,
    num_weighted_avg_layers=TINY_AUDIO_LAYERS + 1,
    audio_inject_layers=(0, 3),
)

_CTC_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|"] + list("abcdefghijklmnopqrstuvwxyz'")


def _tiny_transformer(seed: int):
    from engine.models.s2v_transformer import S2VTransformer3DModel

    torch.manual_seed(seed)
    model = S2VTransformer3DModel(**TINY_TRANSFORMER)
    # Random (not zero) values everywhere, so every path of the forward matters in tests; norm weights near 1.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / (p[0].numel() ** 0.5))
    return model


def _write_tokenizer(out: Path) -> None:
    from transformers import T5TokenizerFast
    from tokenizers import Tokenizer

    raw = resources.files("engine.models").joinpath("data/tiny_tokenizer.json").read_text()
    tok = T5TokenizerFast(tokenizer_object=Tokenizer.from_str(raw), pad_token="<pad>", eos_token="</s>",
                          unk_token="<unk>", extra_ids=0, model_max_length=512)
    tok.save_pretrained(out / "tokenizer")


def _write_text_encoder(out: Path, seed: int, vocab_size: int) -> None:
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed + 1)
    cfg = UMT5Config(vocab_size=vocab_size, d_model=TINY_TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                     feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1)
    UMT5EncoderModel(cfg).save_pretrained(out / "text_encoder")


def _write_audio(out: Path, seed: int) -> None:
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    torch.manual_seed(seed + 2)
    cfg = Wav2Vec2Config(
        vocab_size=len(_CTC_VOCAB), hidden_size=TINY_AUDIO_DIM, num_hidden_layers=TINY_AUDIO_LAYERS,
        num_attention_heads=2, intermediate_size=64, conv_dim=(16,) * 7, num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2, do_stable_layer_norm=True, feat_extract_norm="layer",
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
        layerdrop=0.0, mask_time_prob=0.0, pad_token_id=0,
    )
    Wav2Vec2ForCTC(cfg).save_pretrained(out / "audio_encoder")
    write_audio_processor(out)


def write_audio_processor(out: Path) -> None:
    """`audio_processor/`: the wav2vec2 feature extractor (16 kHz, normalised) and a CTC tokenizer."""
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2Processor

    vocab_file = out / "audio_processor" / "vocab.json"
    vocab_file.parent.mkdir(parents=True, exist_ok=True)
    vocab_file.write_text(json.dumps({c: i for i, c in enumerate(_CTC_VOCAB)}))
    tokenizer = Wav2Vec2CTCTokenizer(str(vocab_file), pad_token="<pad>", unk_token="<unk>", word_delimiter_token="|")
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                         return_attention_mask=True)
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(out / "audio_processor")


def _write_vae(out: Path, seed: int) -> None:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed + 3)
    AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1).save_pretrained(out / "vae")


TINY_DINOV2_DIM = 16


def write_tiny_dinov2(folder: Path, seed: int = 0, hidden_size: int = TINY_DINOV2_DIM) -> Path:
    """A random DINOv2 of tiny widths (patch 14, as the real ones) in the transformers layout."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed + 4)
    cfg = Dinov2Config(hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                       patch_size=14, image_size=28)
    Dinov2Model(cfg).save_pretrained(folder)
    return Path(folder)


def _write_scheduler(out: Path) -> None:
    from diffusers import UniPCMultistepScheduler

    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                            num_train_timesteps=1000).save_pretrained(out / "scheduler")


MODEL_INDEX = {
    "_class_name": "WanSpeechToVideoPipeline",
    "audio_encoder": ["transformers", "Wav2Vec2ForCTC"],
    "audio_processor": ["transformers", "Wav2Vec2Processor"],
    "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"],
    "transformer": ["engine.models", "S2VTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
}


def write_tiny_model(out_dir, seed: int = 0, layout: str = "diffusers") -> Path:
    """Write the whole tiny model folder; `layout` picks the key layout of the transformer weights."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    transformer = _tiny_transformer(seed)
    if layout == "diffusers":
        transformer.save_pretrained(out / "transformer", max_shard_size="200KB")
    elif layout == "native":
        from engine.models.native_io import save_native

        save_native(transformer, out / "transformer", max_shard_bytes=200_000)
    else:
        raise ValueError(f"layout must be 'diffusers' or 'native', not {layout!r}")
    _write_tokenizer(out)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(out / "tokenizer"))
    _write_text_encoder(out, seed, vocab)
    _write_audio(out, seed)
    _write_vae(out, seed)
    _write_scheduler(out)
    write_tiny_dinov2(out / "dinov2", seed)
    (out / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    return out
