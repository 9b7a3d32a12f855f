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
