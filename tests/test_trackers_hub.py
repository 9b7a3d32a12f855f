"""Upload to the Hugging Face Hub (`output.push_to_hub`, `s2v-tui push`) with the real huggingface_hub against a
Hub the test serves on 127.0.0.1 (HF_ENDPOINT): the three calls an upload of small files makes are implemented,
create_repo (POST /api/repos/create), preupload (POST /api/models/OWNER/NAME/preupload/main, answered "regular" for
every file, so the bytes come inline in the commit and neither LFS nor xet is involved), the check of a README's
metadata (POST /api/validate-yaml) and the commit (POST /api/models/OWNER/NAME/commit/main, NDJSON with base64
content). The test asserts on the files received."""
from __future__ import annotations

import base64
import io
import json
import threading

import numpy as np
import pytest
from local_http import serve

from engine.config import BadValueError, check_config, with_value
from engine.events import CheckpointSaved, RunWarning, TrackerStatus
from engine.runner import run
from engine.train import hub_push
from engine.train.synthetic import SyntheticLatentDataset
from s2v_tui.commands import push as push_cmd
from s2v_tui.commands.demo import demo_config

REPO = "me/voice-lora"


class FakeHub:
    """The Hub's side of create_repo, preupload and commit; `fail` answers every commit with a 500 while set."""

    def __init__(self) -> None:
        self.created: list[dict] = []
        self.validated: list[str] = []  # README.md texts whose metadata the library had checked
        self.commits: list[dict] = []  # {"repo", "summary", "files": {path: bytes}}
        self.fail = False
        self.url = ""

    def __call__(self, request):
        path = request.path.split("?")[0]
        if request.method == "POST" and path == "/api/repos/create":
            body = request.json()
            self.created.append(body)
            return 200, {"url": f"{self.url}/{body['organization']}/{body['name']}"}
        if request.method == "POST" and path == "/api/validate-yaml":
            self.validated.append(request.json()["content"])
            return 200, {}
        parts = path.split("/")  # "", "api", "models", owner, name, action, revision
        if request.method == "POST" and parts[:3] == ["", "api", "models"] and len(parts) == 7:
            repo, action = f"{parts[3]}/{parts[4]}", parts[5]
            if action == "preupload":
                files = request.json()["files"]
                return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                       for f in files]}
            if action == "commit":
                if self.fail:
                    return 500, {"error": "the test's Hub is down"}
                lines = [json.loads(line) for line in request.body.decode().splitlines() if line.strip()]
                files = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                         for line in lines if line["key"] == "file"}
                header = next(line["value"] for line in lines if line["key"] == "header")
                self.commits.append({"repo": repo, "summary": header["summary"], "files": files})
                oid = f"{len(self.commits):040x}"
                return 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid}
        return 404, {"error": f"not served by the test: {request.method} {path}"}


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants

    fake = FakeHub()
    with serve(fake) as server:
        fake.url = server.url
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", "dummy")
        # conftest keeps every test off the network with HF_HUB_OFFLINE; this one talks to its own server only.
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub_push, "RETRY_WAIT_S", 0.01)
        yield fake


def _config(model_dir, tmp_path, **settings):
    config = with_value(demo_config(model_dir, tmp_path / "runs"), "optim.warmup_steps", 0)
    settings = {"optim.max_steps": 4, "checkpoint.every_steps": 2, "logging.tensorboard": False,
                "output.push_to_hub": REPO, **settings}
    for key, value in settings.items():
        config = with_value(config, key, value)
    return config


def _write_checkpoint_lora(event):
    """Stands in for the per-checkpoint LoRA files (checkpoints/step-N_LAYOUT.safetensors) the loop will write."""
    if isinstance(event, CheckpointSaved):
        import torch
        from safetensors.torch import save_file

        for layout in ("peft", "native"):
            save_file({"w": torch.full((2,), float(event.step))},
                      event.path.replace(".pt", f"_{layout}.safetensors"), metadata={"steps": str(event.step)})


def _run(config, run_dir, extra=()):
    events = []
    end = run(config, [*extra, events.append], threading.Event(), run_dir=run_dir,
              dataset=SyntheticLatentDataset(2), device="cpu")
    return end, events


def test_a_run_uploads_each_checkpoint_then_the_lora_card_and_stills(tiny_model_dir, tmp_path, hub):
    from PIL import Image

    from engine.data.synth import speech_audio, write_audio_file

    Image.fromarray((np.random.RandomState(1).rand(64, 64, 3) * 255).astype(np.uint8)).save(tmp_path / "face.png")
    write_audio_file(tmp_path / "speech.wav", speech_audio(2.0), 16000)
    case = {"reference": str(tmp_path / "face.png"), "audio": str(tmp_path / "speech.wav"),
            "prompt": "a person talks", "seed": 3}
    config = _config(tiny_model_dir, tmp_path, **{
        "output.push_checkpoints": True, "validation.every_steps": 4, "validation.steps": 2,
        "validation.cases": [case]})
    run_dir = tmp_path / "run"
    end, events = _run(config, run_dir, [_write_checkpoint_lora])
    assert end.status == "completed", end.reason
    assert hub.created and all(c == {"name": "voice-lora", "organization": "me", "visibility": "private"}
                               for c in hub.created)
    assert [c["repo"] for c in hub.commits] == [REPO] * 3
    ckpt = run_dir / "checkpoints"
    for commit, step in zip(hub.commits[:2], (2, 4), strict=True):
        assert commit["files"] == {f"checkpoints/step-{step:08d}_{layout}.safetensors":
                                   (ckpt / f"step-{step:08d}_{layout}.safetensors").read_bytes()
                                   for layout in ("peft", "native")}
    final = hub.commits[2]["files"]
    assert sorted(final) == ["README.md", "demo-lora_native.safetensors", "demo-lora_peft.safetensors",
                             "samples/base/case-00.png", "samples/step-00004/case-00.png"]
    for name in ("demo-lora_peft.safetensors", "demo-lora_native.safetensors"):
        assert final[name] == (run_dir / name).read_bytes()  # the bytes, and the local file is still there
    with Image.open(io.BytesIO(final["samples/step-00004/case-00.png"])) as still:
        assert still.format == "PNG" and still.size[0] > 0
    card = final["README.md"].decode()
    assert hub.validated == [card]
    assert card.startswith("---\nlibrary_name: diffusers\n") and "# demo-lora" in card
    assert "trained 4 steps with s2v-tui" in card and "| LoRA rank / alpha | 8 / 8 |" in card
    assert "| LoRA kind | lora |" in card
    assert "![samples/step-00004/case-00.png](samples/step-00004/case-00.png)" in card
    assert "*samples/step-00004/case-00.png*: a person talks" in card
    assert "Base model: the local folder `model`" in card  # a folder, so no base_model in the card's header
    assert "The training captions were not available" in card  # the run trained on in-memory windows
    status = [e for e in events if isinstance(e, TrackerStatus) and e.tracker == "hub"]
    assert status[-1].state == "done" and status[-1].detail.startswith(f"{REPO}: {hub.url}/{REPO}/commit/")
    assert not [e for e in events if isinstance(e, RunWarning) and e.code.startswith("hub")]


def test_each_checkpoints_lora_files_go_up_as_written_and_the_end_still_does(tiny_model_dir, tmp_path, hub):
    """Every checkpoint now writes its LoRA files (checkpoints/step-N_<layout>.safetensors) before its
    CheckpointSaved event: with push_checkpoints each goes up as one commit, then the final files and card."""
    config = _config(tiny_model_dir, tmp_path, **{"output.push_checkpoints": True, "output.hub_private": False})
    end, _ = _run(config, tmp_path / "run")
    assert end.status == "completed", end.reason
    steps = sorted(int(p.name[5:13]) for p in (tmp_path / "run" / "checkpoints").glob("step-*.pt"))
    assert [sorted(c["files"]) for c in hub.commits] == [
        [f"checkpoints/step-{step:08d}_native.safetensors", f"checkpoints/step-{step:08d}_peft.safetensors"]
        for step in steps] + [["README.md", "demo-lora_native.safetensors", "demo-lora_peft.safetensors"]]
    assert hub.created[0]["visibility"] == "public"
    card = hub.commits[-1]["files"]["README.md"].decode()
    assert "## Samples" not in card  # no validation, no stills


def test_a_failed_upload_warns_with_the_command_that_retries_it(tiny_model_dir, tmp_path, hub, monkeypatch, capsys):
    monkeypatch.setattr(hub_push, "RETRY_ATTEMPTS", 2)
    hub.fail = True
    run_dir = tmp_path / "run"
    end, events = _run(_config(tiny_model_dir, tmp_path), run_dir)
    assert end.status == "completed", end.reason  # the training is what counts: it is done and kept
    [warning] = [e for e in events if isinstance(e, RunWarning) and e.code == "hub_upload_failed"]
    assert f"upload of the final LoRA and model card to {REPO} failed" in warning.message
    assert "500" in warning.message and f"retry with s2v-tui push {run_dir}" in warning.message
    status = [e for e in events if isinstance(e, TrackerStatus) and e.tracker == "hub"]
    assert status[-1].state == "failed" and status[-1].detail.endswith(f"retry: s2v-tui push {run_dir}")
    assert f"retry with s2v-tui push {run_dir}" in (run_dir / "train.log").read_text()
    assert hub.commits == [] and (run_dir / "demo-lora_peft.safetensors").is_file()

    hub.fail = False
    assert push_cmd.main([str(run_dir)]) == 0
    assert f"uploaded: {hub.url}/{REPO}/commit/" in capsys.readouterr().out
    assert sorted(hub.commits[0]["files"]) == ["README.md", "demo-lora_native.safetensors",
                                               "demo-lora_peft.safetensors"]
    assert push_cmd.main([str(run_dir), "--repo", "me/other"]) == 0
    assert hub.commits[1]["repo"] == "me/other"

    hub.fail = True
    assert push_cmd.main([str(run_dir)]) == 1
    assert "run the same command again to retry" in capsys.readouterr().err


def test_push_refuses_what_it_cannot_do(tmp_path, hub, capsys):
    assert push_cmd.main([str(tmp_path / "nowhere")]) == 2
    assert "not a readable run folder" in capsys.readouterr().err
    from engine.config import write_frozen_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_frozen_config(demo_config(tmp_path, tmp_path), run_dir)
    assert push_cmd.main([str(run_dir)]) == 2
    assert "has no output.push_to_hub: give the repo, e.g. --repo your-name/demo-lora" in capsys.readouterr().err
    assert push_cmd.main([str(run_dir), "--repo", "me/x"]) == 2
    assert "holds no exported LoRA to upload" in capsys.readouterr().err
    assert hub.created == [] and hub.commits == []


def test_hub_keys_rules_and_a_missing_token_warns(tmp_path, monkeypatch):
    from engine.train.trackers import preflight

    config = demo_config(tmp_path, tmp_path)
    with pytest.raises(BadValueError, match="output.push_to_hub: 'voice-lora' is not a Hugging Face repo id"):
        with_value(config, "output.push_to_hub", "voice-lora")
    errors = check_config(with_value(config, "output.push_checkpoints", True))
    assert [e.key for e in errors] == ["output.push_checkpoints"]
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no saved token there
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "tokens"))
    errors, warnings = preflight(with_value(config, "output.push_to_hub", REPO))
    assert errors == [] and [w.code for w in warnings] == ["hub_token_missing"]
    assert "s2v-tui push" in warnings[0].message


def test_the_card_names_a_hub_base_model_and_shows_the_captions(tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    for stem, caption in (("a", "ohwx talks about trains"), ("b", "ohwx laughs | loudly")):
        (clips / f"{stem}.mp4").write_bytes(b"")  # discovery pairs by name; it does not decode
        (clips / f"{stem}.txt").write_text(caption)
    config = with_value(demo_config(tmp_path, tmp_path), "data.datasets", [{"path": str(clips)}])
    config = with_value(config, "model.source", "Wan-AI/Wan2.2-S2V-14B")
    card = hub_push.model_card(config, tmp_path, [("demo-lora_native.safetensors", tmp_path / "missing")], [])
    assert "\nbase_model: Wan-AI/Wan2.2-S2V-14B\n---\n" in card
    assert "A LoRA for [Wan-AI/Wan2.2-S2V-14B](https://huggingface.co/Wan-AI/Wan2.2-S2V-14B)" in card
    assert "2 captioned clips; the first 2:\n\n- ohwx talks about trains\n- ohwx laughs | loudly" in card
    assert "| `demo-lora_native.safetensors` | native (ComfyUI) |" in card
    assert "--model Wan-AI/Wan2.2-S2V-14B --lora demo-lora_native.safetensors" in card
