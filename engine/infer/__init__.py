"""S2V inference with our transformer, as the official pipeline runs it (spec/S2V_MODEL.md §8).

schedule.py  sigmas, timesteps, UniPC / Euler solvers, CFG        reference.py  the reference image's size and fit
audio.py     driving audio -> per-frame features, chunk count     sampler.py    the chunked, guided sampling loop
pipeline.py  load a model folder, prepare conditions, render      video_io.py   the mp4 with the driving audio
"""
from engine.infer.pipeline import NEGATIVE_PROMPT, FrozenParts, S2VPipeline, parse_size
from engine.infer.sampler import Conditioning, SampleOptions, SamplingStopped
from engine.infer.video_io import write_sample_mp4

__all__ = ["NEGATIVE_PROMPT", "Conditioning", "FrozenParts", "S2VPipeline", "SampleOptions", "SamplingStopped",
           "parse_size", "write_sample_mp4"]
