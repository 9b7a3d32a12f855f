"""Time filling the feature cache (`engine.data.cache_fill.fill_cache`) with full-size encoders at 832x480.

Next session, on the H100 (one call, from the repository root, `carry: [".whl"]`, timeout_s 600). The ignored
.whl folder must hold diffusers 0.42.1, importlib_metadata, zipp and tomlkit 0.15.2 (see bench/engine_step.py) and,
for this script, av 18.1.0 (PyAV: synth.py writes the clips and media.py decodes them with it; the GPU image has no
`av`). All five were fetched into /work/main/.whl on 2026-11-25 (the av wheel is 35 MB of the 64 MiB a call may
carry); the device README's `pip download` line refetches any that is missing. Then:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; export PYTHONUNBUFFERED=1; python3 bench/cache_speed.py --clips 8 --seconds 11 --json $OUT/cache_speed.jsonl

What it does: writes a model folder with random weights and the real architectures (fill_cache needs no
transformer/): vae/ AutoencoderKLWan() (default config = the Wan 2.1 VAE the S2V model uses), audio_encoder/
wav2vec2-large-xlsr (1024 wide, 24 layers), audio_processor/ and tokenizer/ (engine.models.tiny's fixtures),
text_encoder/ UMT5-XXL encoder (4096 wide, 24 layers, 64 heads, 5.7 B parameters) built on the meta device and
materialised on the GPU in bf16 (never in fp32 on the host: 23 GB). Then N synthetic talking clips at 832x480
(25 fps, N x S seconds; 11 s gives two windows per clip at 16 fps, the second with 73 motion frames), and fills the
cache on the GPU with the engine's default CacheSettings. Reports seconds per phase (plan = dataset check +
hashing the model folders, then one pass per encoder, each including its model's load), peak GPU memory of each
pass, clips/min and windows/min over the encoder passes and over the whole fill. Prints one JSON line and appends
it to --json. Everything is written to a hidden scratch folder in the repository root (on the machine's disk;
/tmp may be memory-backed), removed at the end.

`--tiny` runs the same path with tiny encoders and 64x64 clips on the CPU (a test of this script).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import emit_result, peak_host_rss_gib  # noqa: E402
from engine.config import Config, with_value  # noqa: E402
from engine.data import cache_fill  # noqa: E402

FULL_SIZE = (832, 480)
TINY_SIZE = (64, 64)  # 8x8 latents: the smallest the motion framepack takes (as the demo)

# wav2vec2-large-xlsr-53 (the S2V audio encoder's architecture); dropouts off as at inference.
WAV2VEC2_LARGE = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
    conv_dim=(512,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2),
    num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, do_stable_layer_norm=True,
    feat_extract_norm="layer", hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    feat_proj_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0,
)
# UMT5-XXL (google/umt5-xxl), the encoder half.
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=False)


# ---- the model folder ----------------------------------------------------------------------------------------
def _write_audio(out: Path, tiny: bool) -> None:
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    from engine.models import tiny as tiny_mod

    vocab = tiny_mod._CTC_VOCAB
    if tiny:
        tiny_mod._write_audio(out, seed=0)
        return
    torch.manual_seed(2)
    # 315 M parameters: small enough to initialise on the host in fp32, the dtype it is stored and run in.
    cfg = Wav2Vec2Config(vocab_size=len(vocab), pad_token_id=0, **WAV2VEC2_LARGE)
    Wav2Vec2ForCTC(cfg).save_pretrained(out / "audio_encoder")
    tiny_mod.write_audio_processor(out)


def _write_text_encoder(out: Path, tiny: bool, device: torch.device) -> int:
    """UMT5 encoder with random bf16 weights, materialised on `device`; returns its parameter count."""
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    if tiny:
        vocab = len(AutoTokenizer.from_pretrained(out / "tokenizer"))
        cfg = UMT5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                         relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                         feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    else:
        cfg = UMT5Config(**UMT5_XXL)
    cfg.pad_token_id, cfg.eos_token_id = 0, 1
    with torch.device("meta"):
        model = UMT5EncoderModel(cfg)
    model = model.to(torch.bfloat16).to_empty(device=device)
    # to_empty gives the embedding and encoder.embed_tokens separate storage; tie them again so the folder
    # holds one 2 GB embedding, as the real checkpoint does.
    model.tie_weights()
    gen = torch.Generator(device=device).manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # T5 layer norms (scale only)
                p.fill_(1.0)
            else:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=gen)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out / "text_encoder", max_shard_size="5GB")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return n


def write_encoders(out: Path, tiny: bool, device: torch.device) -> dict:
    from diffusers import AutoencoderKLWan

    from engine.models import tiny as tiny_mod

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.manual_seed(3)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1) if tiny else AutoencoderKLWan()
    vae.save_pretrained(out / "vae")
    vae_params = sum(p.numel() for p in vae.parameters())
    del vae
    _write_audio(out, tiny)
    tiny_mod._write_tokenizer(out)  # the committed fixture: caption token counts as in the tests
    text_params = _write_text_encoder(out, tiny, device)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"write_encoders_s": round(time.perf_counter() - t0, 1), "vae_params": vae_params,
            "text_params": text_params, "encoder_folder_gb": round(size / 1e9, 2)}


# ---- the clips and the config --------------------------------------------------------------------------------
def write_clips(folder: Path, count: int, seconds: float, size: tuple[int, int]) -> float:
    from engine.data.synth import make_talking_clip

    t0 = time.perf_counter()
    for i in range(count):
        # espeak-ng off: the GPU image may lack it, and the numpy speech gives the same amount of audio work.
        make_talking_clip(folder, f"talk_{i:03d}", fps=25, size=size, duration_s=seconds, seed=i, use_espeak=False,
                          caption=f"Speaker {i} looks into the camera and talks about the weather, plain background.")
    return time.perf_counter() - t0


def make_config(model_dir: Path, clips_dir: Path, cache_dir: Path, size: tuple[int, int]) -> Config:
    config = Config()
    settings = {"model.source": str(model_dir), "data.datasets": [{"path": str(clips_dir)}],
                "data.resolution": list(size), "data.bucket": "fixed", "data.cache_dir": str(cache_dir)}
    for key, value in settings.items():
        config = with_value(config, key, value, file="<cache_speed>")
    return config


# ---- timing ----------------------------------------------------------------------------------------------------
class PassClock:
    """Per-phase wall time and peak GPU memory of fill_cache.

    fill_cache calls `_release(device)` after each encoder pass (its model already out of scope) and `plan_cache`
    before the first: wrapping those two gives exact pass boundaries, where progress events alone would put each
    encoder's load (before its first event) into the previous phase.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.phase = "check"
        self.marks: list[tuple[str, float, int | None, int | None]] = []  # (phase, end time, peak alloc, reserved)
        self.counts: dict[str, int] = {}
        self.start = time.perf_counter()

    def progress(self, p) -> None:
        self.phase = p.phase
        self.counts[p.phase] = p.total

    def _mark(self, phase: str) -> None:
        alloc = reserved = None
        if self.device.type == "cuda":
            alloc, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
            torch.cuda.reset_peak_memory_stats()
        self.marks.append((phase, time.perf_counter(), alloc, reserved))

    def install(self):
        plan, release = cache_fill.plan_cache, cache_fill._release

        def timed_plan(*a, **k):
            out = plan(*a, **k)
            self._mark("plan")
            return out

        def timed_release(device):
            release(device)  # first: the reserved peak is what the pass held, not what empty_cache kept
            self._mark(self.phase)

        cache_fill.plan_cache, cache_fill._release = timed_plan, timed_release

        def restore():
            cache_fill.plan_cache, cache_fill._release = plan, release

        return restore

    def phases(self) -> dict:
        out, prev = {}, self.start
        for phase, t, alloc, reserved in self.marks:
            out[phase] = {"s": round(t - prev, 2), "items": self.counts.get(phase if phase != "plan" else "check")}
            if alloc is not None:
                out[phase] |= {"peak_alloc_gib": round(alloc / 2**30, 2), "peak_reserved_gib": round(reserved / 2**30, 2)}
            prev = t
        return out


def per_min(n: int, seconds: float) -> float | None:
    return round(60 * n / seconds, 2) if seconds > 0 else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=None, help="synthetic clips (default: 8; 2 with --tiny)")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per clip (default: 11; 10.5 with --tiny)")
    ap.add_argument("--scratch", help="folder for the encoders, clips and cache (removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--json", help="append the result as one JSON line to this file")
    ap.add_argument("--tiny", action="store_true", help="tiny encoders and 64x64 clips on the CPU (tests this script)")
    args = ap.parse_args(argv)
    clips = args.clips or (2 if args.tiny else 8)
    seconds = args.seconds or (10.5 if args.tiny else 11.0)
    if not args.tiny and not torch.cuda.is_available():
        ap.error("the full-size encoders need a CUDA GPU; use --tiny on a CPU machine")
    device = torch.device("cpu" if args.tiny else "cuda")
    size = TINY_SIZE if args.tiny else FULL_SIZE

    parent = args.scratch or (None if args.tiny else str(REPO))
    scratch = Path(tempfile.mkdtemp(prefix=".cache-speed-", dir=parent))
    restore = None
    try:
        built = write_encoders(scratch / "model", args.tiny, device)
        clips_s = write_clips(scratch / "clips", clips, seconds, size)
        config = make_config(scratch / "model", scratch / "clips", scratch / "cache", size)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        clock = PassClock(device)
        restore = clock.install()
        t0 = time.perf_counter()
        plan = cache_fill.fill_cache(config, clock.progress, device)
        fill_s = time.perf_counter() - t0
        restore()
        restore = None
        phases = clock.phases()
        encode_s = sum(v["s"] for k, v in phases.items() if k != "plan")
        windows = len(plan.records)
        result = {
            "bench": "cache_speed", "tiny": args.tiny, "size": f"{size[0]}x{size[1]}",
            "frames": config.data.frames, "motion_frames": config.data.motion_frames,
            "clips": clips, "clip_seconds": seconds, "windows": windows,
            "windows_with_motion": sum(r.window.has_motion for r in plan.records),
            "skipped": len(plan.skipped), "complete": plan.complete,
            "fill_s": round(fill_s, 1), "encode_s": round(encode_s, 1), "phases": phases,
            # Over the encoder passes (a real run hashes the model folders once; the hashes are memoised).
            "clips_per_min": per_min(clips, encode_s), "windows_per_min": per_min(windows, encode_s),
            # Over the whole fill, the dataset check and model hashing included.
            "clips_per_min_all": per_min(clips, fill_s), "windows_per_min_all": per_min(windows, fill_s),
            "cache_gb": round(sum(p.stat().st_size for p in (scratch / "cache").rglob("*") if p.is_file()) / 1e9, 3),
            "write_clips_s": round(clips_s, 1), **built,
            "peak_host_rss_gib": peak_host_rss_gib(),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
        }
    finally:
        if restore:
            restore()
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    emit_result(result, args.json)
    return 0 if plan.complete and windows and not plan.skipped else 1


if __name__ == "__main__":
    sys.exit(main())
