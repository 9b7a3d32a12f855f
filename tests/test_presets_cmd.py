"""`s2v-tui presets` on a machine without a GPU, and planning for a given card."""
import json

from s2v_tui.presets_cmd import main


def test_without_gpu_nothing_is_recommended(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "pass --vram-gb" in out and "recommended" not in out


def test_planning_for_a_24gb_card_recommends_the_24gb_preset(capsys):
    assert main(["--vram-gb", "24", "--host-gb", "128", "--json"]) == 0
    rows = {r["preset"]: r for r in json.loads(capsys.readouterr().out)["presets"]}
    assert rows["24gb"]["recommended"] and rows["24gb"]["fits"]
    assert not rows["80gb"]["fits"] and not rows["48gb"]["fits"]


def test_when_nothing_fits_it_says_which_resource_is_short(capsys):
    # A 24 GB card on a 40 GiB host: the 24gb preset's pinned host buffers need more than the host has.
    assert main(["--vram-gb", "24", "--host-gb", "40"]) == 0
    out = capsys.readouterr().out
    assert "no preset fits: 24gb fits this card" in out and "40.0 GiB are available" in out
    assert "recommended" not in out
    # A card smaller than the smallest preset's need.
    assert main(["--vram-gb", "8", "--host-gb", "256"]) == 0
    out = capsys.readouterr().out
    assert "the smallest, 24gb, needs" in out and "8.0 GiB are free" in out
