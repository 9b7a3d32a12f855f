"""Datasets in the app: one source of check settings with `s2v-tui check`, folders added without a check, the
[[data.datasets]] and [[validation.cases]] entries edited in dialogs, and saved keeping the file's comments."""
from __future__ import annotations

from pathlib import Path

import pytest
from test_tui_screens import SIZE, make_app, settle

from engine.config import load_config, save_config, with_value
from s2v_tui.screens.dataset import dataset_spec
from s2v_tui.screens.entries import EntryDialog, EntryListDialog
from s2v_tui.testing.fakes import fixed_doctor

pytestmark = pytest.mark.anyio


def notes(app) -> list[str]:
    return [n.message for n in app._notifications]


async def test_the_screen_and_s2v_tui_check_agree_on_64px_clips(tmp_path, presets_dir, capsys, monkeypatch):
    """data.resolution = [64, 64] with a fixed bucket: the screen built its own doctor settings (no min_side,
    stride, seed) and blocked every clip as tiny-resolution, while `s2v-tui check` passed them."""
    from engine.data.synth import make_talking_clip
    from s2v_tui.commands import check as check_cmd

    clips = tmp_path / "clips"
    for i in range(3):
        make_talking_clip(clips, f"talk_{i}", size=(64, 64), duration_s=5.5, seed=i, use_espeak=False)
    app = make_app(tmp_path, presets_dir)
    for key, value in {"data.resolution": [64, 64], "data.bucket": "fixed"}.items():
        app.session.config = with_value(app.session.config, key, value)
    preset = save_config(app.session.config, tmp_path / "my-run.toml", full=True)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+r")
        await settle(app, pilot)
        summary = str(app.screen.query_one("#summary").render())
        assert "3 clips, 3 usable" in summary and "0 blocking" in summary, summary
        assert not app.screen.query_one("#train").disabled
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    assert check_cmd.main([str(preset)]) == 0
    out = capsys.readouterr().out
    assert "3 clips, 3 usable" in out and "0 blocking" in out, out


async def test_the_screen_checks_a_folder_with_its_entrys_caption_keys(tmp_path, presets_dir, capsys, monkeypatch):
    """caption_prefix, caption_separator and default_caption of the folder's [[data.datasets]] entry: the clip
    without a caption file gets the default (a warning, not the blocking caption-missing), every caption the
    prefix, as `s2v-tui check` of the same config says."""
    from engine.data.synth import make_talking_clip
    from s2v_tui.commands import check as check_cmd

    clips = tmp_path / "clips"
    make_talking_clip(clips, "talk_0", size=(64, 64), duration_s=5.5, seed=0, use_espeak=False, caption="hello")
    make_talking_clip(clips, "talk_1", size=(64, 64), duration_s=5.5, seed=1, use_espeak=False, caption=None)
    app = make_app(tmp_path, presets_dir, datasets=False)
    entry = {"path": str(clips), "caption_prefix": "sks person", "caption_separator": ": ",
             "default_caption": "a person talking"}
    for key, value in {"data.resolution": [64, 64], "data.bucket": "fixed", "data.datasets": [entry]}.items():
        app.session.config = with_value(app.session.config, key, value)
    preset = save_config(app.session.config, tmp_path / "my-run.toml", full=True)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press(*str(clips))
        await pilot.press("ctrl+r")
        await settle(app, pilot)
        summary = str(app.screen.query_one("#summary").render())
        assert "2 clips, 2 usable" in summary and "0 blocking" in summary, summary
        assert "caption-default" in str(app.screen.query_one("#problems").render())
        captions = sorted(c.clip.caption for c in app.session.report.clips)
        assert captions == ["sks person: a person talking", "sks person: hello"]
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    assert check_cmd.main([str(preset)]) == check_cmd.EXIT_OK
    out = capsys.readouterr().out
    assert "2 clips, 2 usable" in out and "0 blocking" in out, out


async def test_the_caption_keys_of_a_dataset_are_edited_in_its_dialog(tmp_path, presets_dir):
    app = make_app(tmp_path, presets_dir)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("e")
        await pilot.pause()
        await pilot.press("e")  # the highlighted (only) entry
        await pilot.pause()
        entry = app.screen
        assert isinstance(entry, EntryDialog)
        entry.query_one("#entry-caption_prefix").value = " sks"
        await pilot.pause()
        assert "whitespace" in str(entry.query_one("#error-caption_prefix").render())  # the engine's rule
        entry.query_one("#entry-caption_prefix").value = "sks"
        entry.query_one("#entry-caption_separator").value = " - "
        entry.query_one("#entry-default_caption").value = "a person talking"
        await pilot.press("ctrl+s")
        await pilot.pause()
        await pilot.press("ctrl+s")
        await pilot.pause()
        (only,) = app.session.config.data.datasets
        assert (only.caption_prefix, only.caption_separator, only.default_caption) == ("sks", " - ",
                                                                                      "a person talking")
        spec = dataset_spec(app.session.config, only.path)
        assert (spec.caption_prefix, spec.caption_separator, spec.default_caption) == ("sks", " - ",
                                                                                      "a person talking")


async def test_a_folder_goes_into_the_config_without_a_check_with_a_warning(tmp_path, presets_dir):
    app = make_app(tmp_path, presets_dir)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press(*"/data/more-clips")
        await pilot.press("escape", "a")
        await pilot.pause()
        assert [d.path for d in app.session.config.data.datasets] == [str(tmp_path / "clips"), "/data/more-clips"]
        assert any("without a check" in n for n in notes(app))
        assert "/data/more-clips" in str(app.screen.query_one("#in-config").render())


async def test_a_blocked_folder_can_be_added_and_ctrl_t_says_why_it_does_not_train(tmp_path, presets_dir):
    app = make_app(tmp_path, presets_dir, datasets=False, doctor=fixed_doctor(blocking=True))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press(*"/data/clips")
        await pilot.press("ctrl+r")
        await settle(app, pilot)
        await pilot.press("ctrl+t")
        await pilot.pause()
        assert not app.training_active() and app.current_mode == "dataset"
        assert any("1 blocking problem" in n and "fix those clips" in n for n in notes(app))
        await pilot.press("escape", "a")
        await pilot.pause()
        assert [d.path for d in app.session.config.data.datasets] == ["/data/clips"]
        assert any("Added /data/clips, but" in n for n in notes(app))


async def test_datasets_are_added_edited_and_removed_in_a_dialog(tmp_path, presets_dir):
    app = make_app(tmp_path, presets_dir)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("e")
        await pilot.pause()
        assert isinstance(app.screen, EntryListDialog)
        await pilot.press("a")
        await pilot.pause()
        entry = app.screen
        assert isinstance(entry, EntryDialog)
        entry.query_one("#entry-path").value = str(tmp_path / "more")
        entry.query_one("#entry-repeats").value = "0"
        await pilot.pause()
        # the engine's rule, under its key
        assert "must be at least 1" in str(entry.query_one("#error-repeats").render())
        assert "does not exist" in str(entry.query_one("#note-path").render())  # a word, not a refusal
        await pilot.press("ctrl+s")
        assert app.screen is entry  # not saved while invalid
        entry.query_one("#entry-repeats").value = "3"
        entry.query_one("#entry-weight").value = "0.5"
        await pilot.press("ctrl+s")
        await pilot.pause()
        listing = app.screen
        assert isinstance(listing, EntryListDialog) and listing.query_one("#entries").row_count == 2
        assert app.session.config.data.datasets[-1].path == str(tmp_path / "clips")  # nothing applied yet
        listing.query_one("#entries").move_cursor(row=0)
        await pilot.press("delete", "ctrl+s")
        await pilot.pause()
        (only,) = app.session.config.data.datasets
        assert (only.path, only.repeats, only.weight) == (str(tmp_path / "more"), 3, 0.5)
        assert "more (repeats 3, weight 0.5)" in str(app.screen.query_one("#in-config").render())


async def test_validation_cases_are_edited_from_the_config_screen(tmp_path, presets_dir):
    app = make_app(tmp_path, presets_dir, start_mode="config")
    async with app.run_test(size=SIZE) as pilot:
        app.screen.query_one("#topics").active = "topic-validation"
        await pilot.pause()
        await pilot.click("#edit-f-validation--cases")
        await pilot.pause()
        await pilot.press("a")
        await pilot.pause()
        entry = app.screen
        entry.query_one("#entry-reference").value = "ref.png"
        entry.query_one("#entry-prompt").value = "a person talks"
        await pilot.pause()
        assert "is empty" in str(entry.query_one("#error-audio").render())
        entry.query_one("#entry-audio").value = "speech.wav"
        entry.query_one("#entry-seed").value = "7"
        await pilot.press("ctrl+s")
        await pilot.pause()
        await pilot.press("ctrl+s")
        await pilot.pause()
        (case,) = app.session.config.validation.cases
        assert (case.reference, case.audio, case.prompt, case.seed) == ("ref.png", "speech.wav", "a person talks", 7)
        assert "1: ref.png" in str(app.screen.query_one("#f-validation--cases").render())


async def test_saving_keeps_the_datasets_comment_and_extends_the_preset_by_an_absolute_path(tmp_path, presets_dir):
    mine = tmp_path / "mine.toml"
    mine.write_text(f'extends = "presets/base.toml"\n\n# the clips of the shoot\n[[data.datasets]]\n'
                    f'path = "{tmp_path / "clips"}"  # 64x64\n')
    app = make_app(tmp_path, presets_dir, start_mode="config")
    app.session.config = load_config(mine)
    app.session.config_path = mine
    async with app.run_test(size=SIZE) as pilot:
        app.session.config = with_value(app.session.config, "data.datasets",
                                        [{"path": str(tmp_path / "clips"), "repeats": 2}])
        await pilot.press("ctrl+s")
        await pilot.pause()
        text = mine.read_text()
        assert "# the clips of the shoot" in text and "# 64x64" in text and "repeats = 2" in text
        elsewhere = tmp_path / "elsewhere" / "new.toml"
        app.screen.query_one("#save-path").value = str(elsewhere)
        await pilot.press("ctrl+s")
        await pilot.pause()
    first = elsewhere.read_text().splitlines()[0]
    assert first == f'extends = "{(presets_dir / "base.toml").resolve()}"'  # not ../presets/base.toml
    assert load_config(elsewhere).data.datasets[0].repeats == 2


async def test_switches_say_on_or_off_in_words(tmp_path, presets_dir):
    app = make_app(tmp_path, presets_dir, start_mode="config")
    async with app.run_test(size=SIZE) as pilot:
        app.screen.query_one("#topics").active = "topic-memory"
        await pilot.pause()
        state = app.screen.query_one("#state-f-memory--gradient_checkpointing")
        assert str(state.render()) == "on"
        app.screen.query_one("#f-memory--gradient_checkpointing").toggle()
        await pilot.pause()
        assert str(state.render()) == "off" and not app.session.config.memory.gradient_checkpointing


def test_relative_extends_only_inside_the_files_folder(tmp_path):
    from s2v_tui.screens.config_form import extends_path

    assert extends_path(tmp_path / "presets" / "24gb.toml", tmp_path) == "presets/24gb.toml"
    preset = tmp_path / "presets" / "24gb.toml"
    assert extends_path(preset, tmp_path / "runs") == str(preset)
    assert Path(extends_path(Path("presets/x.toml"), Path("."))) == Path("presets/x.toml")
