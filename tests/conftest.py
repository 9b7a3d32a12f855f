import os

# No test may reach the network: any hub access must fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The tiny models run several times faster on one thread: their ops are too small to split, and on a
    shared 2-core machine a second thread spin-waits against other jobs (10-50x slower seen)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny S2V model folder (diffusers layout), written once per test session."""
    from engine.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


# -- the app's Pilot tests (tests/test_tui_*.py) ------------------------------------------------------------------

@pytest.fixture
def anyio_backend():
    return "asyncio"  # anyio's pytest plugin runs the async tests (no pytest-asyncio needed)


@pytest.fixture
def presets_dir(tmp_path):
    """A presets folder of the base preset and two small presets told apart by one memory switch each."""
    import shutil
    from pathlib import Path

    folder = tmp_path / "presets"
    folder.mkdir()
    shutil.copy(Path(__file__).resolve().parents[1] / "presets" / "base.toml", folder / "base.toml")
    (folder / "24gb.toml").write_text('extends = "base.toml"\n[memory]\nblock_offload = true\n')
    (folder / "80gb.toml").write_text('extends = "base.toml"\n[memory]\ngradient_checkpointing = false\n')
    return folder
