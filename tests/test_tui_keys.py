"""The keyboard at 80x24: screen keys work when a screen opens, never fire while a path is typed, Esc leaves a
text box (and the footer says so), and focus shows without colour."""
from __future__ import annotations

import pytest
from test_tui_screens import SIZE, make_app

pytestmark = pytest.mark.anyio


def footer_keys(app) -> dict[str, str]:
    """The bindings the footer shows now: key -> description."""
    return {key: b.binding.description for key, b in app.screen.active_bindings.items()
            if b.binding.show and b.enabled}


async def test_number_keys_work_when_the_dataset_screen_opens_with_an_empty_folder(tmp_path, presets_dir):
    app = make_app(tmp_path, presets_dir, datasets=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert app.screen.query_one("#folder").value == ""
        await pilot.press("2")
        await pilot.pause()
        assert app.current_mode == "presets"
        await pilot.press("3")  # the Presets screen does not open in its host RAM box either
        await pilot.pause()
        assert app.current_mode == "config"


async def test_a_path_typed_outside_the_folder_box_goes_into_it(tmp_path, presets_dir):
    """The box holds the config's folder, the table has the focus: "2" and "5" of the path switched screens."""
    app = make_app(tmp_path, presets_dir)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press(*"/data/clips256")
        await pilot.pause()
        assert app.current_mode == "dataset" and not app.training_active()
        assert app.screen.query_one("#folder").value == "/data/clips256"


async def test_keys_typed_into_a_text_box_stay_text(tmp_path, presets_dir):
    """A guard (this held before too): the text box takes the screen keys, the new "n" included, as text."""
    app = make_app(tmp_path, presets_dir, start_mode="config")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        box = app.screen.query_one("#save-path")
        box.focus()
        box.value = ""
        await pilot.press(*"runs/s5n2.toml")
        await pilot.pause()
        assert app.current_mode == "config" and box.value == "runs/s5n2.toml"
        assert not app.training_active() and len(app.screen_stack) == 1  # "n" opened no dialog


async def test_escape_leaves_the_box_and_the_footer_says_so(tmp_path, presets_dir):
    app = make_app(tmp_path, presets_dir)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert "escape" not in footer_keys(app)  # nothing to leave
        app.screen.query_one("#folder").focus()
        await pilot.pause()
        assert footer_keys(app).get("escape") == "Leave field"
        await pilot.press("escape")
        await pilot.pause()
        assert app.focused is None and "escape" not in footer_keys(app)
        await pilot.press("4")
        await pilot.pause()
        assert app.current_mode == "run"


async def test_focus_changes_the_border_glyphs_not_only_the_colour(tmp_path, presets_dir):
    app = make_app(tmp_path, presets_dir)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        folder = app.screen.query_one("#folder")
        unfocused = folder.styles.border.top[0]
        folder.focus()
        await pilot.pause()
        assert folder.styles.border.top[0] != unfocused  # a line style, which NO_COLOR keeps
        await pilot.press("3")  # the box has focus: "3" is text
        assert app.current_mode == "dataset"
        await pilot.press("escape", "3")
        await pilot.pause()
        lr = app.screen.query_one("#f-optim--lr")
        field = lr.parent
        assert field.styles.border_left[0] == "blank"
        app.screen.query_one("#topics").active = "topic-optimisation"
        await pilot.pause()
        lr.focus()
        await pilot.pause()
        assert field.styles.border_left[0] == "outer"  # the bar at the left of the field being edited
