"""The dtype names of the config files ("bf16", "fp16", "fp32") as torch dtypes: one map for every module.

Below models, data, train and infer (it needs torch and nothing of the engine), so each of them reads the same map.
"""
from __future__ import annotations

import torch

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# train.mixed_precision -> the autocast dtype; "no" (no autocast) is absent, so `.get` gives None for it.
AUTOCAST_DTYPES = {name: TORCH_DTYPES[name] for name in ("bf16", "fp16")}
