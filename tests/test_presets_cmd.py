"""`s2v-tui presets` on a machine without a GPU, and planning for a given card and host."""
import json

import pytest

from engine.memory import GIB, estimate
from engine.presets import card_class_gib, choose_preset, shipped_presets
from s2v_tui.commands.presets import main


def _plan(capsys, vram_gib: float, host_gib: float) -> dict:
    assert main(["--vram-gb", str(vram_gib), "--host-gb", str(host_gib), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_without_gpu_nothing_is_recommended(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "pass --vram-gb" in out and "recommended" not in out


def test_base_toml_is_not_a_preset(capsys):
    names = [r["preset"] for r in _plan(capsys, 80, 256)["presets"]]
    assert "base" not in names and {"24gb", "24gb-lowram", "32gb", "48gb", "80gb"} <= set(names)


@pytest.mark.parametrize("host_gib", [32, 64, 128])
def test_a_24gb_card_on_hosts_of_32_64_and_128_gib(capsys, host_gib):
    """Holds for whatever presets ship: what is recommended fits both, nothing of a larger card class fits, and
    when nothing fits the answer names the resource that is short, the preset and by how much."""
    plan = _plan(capsys, 24, host_gib)
    needs = {n: estimate(c) for n, c in shipped_presets().items()}
    fitting = [n for n, e in needs.items() if e.vram_need_bytes <= 24 * GIB and e.host_bytes <= host_gib * GIB]
    if fitting:
        best = plan["recommended"]
        assert best in fitting and plan["nothing_fits"] is None
        top = max(card_class_gib(n, needs[n].vram_need_bytes) for n in fitting)
        assert card_class_gib(best, needs[best].vram_need_bytes) == top
    else:
        assert plan["recommended"] is None
        short = plan["nothing_fits"]
        assert short["short"] == "host"  # every host here is too small for the 24 GB presets, not the card
        need = needs[short["preset"]]
        assert need.vram_need_bytes <= 24 * GIB
        assert short["short_gib"] == pytest.approx((need.host_bytes - host_gib * GIB) / GIB, abs=0.051)
        assert "host RAM is short" in short["message"] and f"{host_gib:.1f} GiB are available" in short["message"]


@pytest.fixture()
def quantising_loader(monkeypatch):
    """The loader that makes low-bit Linears as it reads them (wt-lowbit's), whatever this build has."""
    import engine.memory

    monkeypatch.setattr(engine.memory, "loader_quantises_while_loading", lambda: True)


def test_the_lowram_preset_is_picked_on_a_32_gib_host_and_24gb_on_a_128_gib_one(capsys, quantising_loader):
    plan = _plan(capsys, 24, 32)
    assert plan["recommended"] == "24gb-lowram" and plan["nothing_fits"] is None
    rows = {r["preset"]: r for r in plan["presets"]}
    assert rows["24gb-lowram"]["fits"] and not rows["24gb"]["fits_host"] and rows["24gb"]["fits_gpu"]
    assert _plan(capsys, 24, 64)["recommended"] == "24gb"  # 47 GiB predicted: the bf16 base fits there
    plan = _plan(capsys, 24, 128)
    assert plan["recommended"] == "24gb"
    rows = {r["preset"]: r for r in plan["presets"]}
    assert rows["24gb"]["fits"] and rows["24gb-lowram"]["fits"]
    assert not rows["80gb"]["fits"] and not rows["48gb"]["fits_gpu"]


def test_with_a_loader_that_holds_the_bf16_model_a_32_gib_host_is_told_how_short(capsys, monkeypatch):
    import engine.memory

    monkeypatch.setattr(engine.memory, "loader_quantises_while_loading", lambda: False)
    assert _plan(capsys, 24, 128)["recommended"] == "24gb"
    plan = _plan(capsys, 24, 32)
    need = estimate(shipped_presets()["24gb-lowram"]).host_bytes / GIB
    assert plan["recommended"] is None and round(need, 1) == 34.2  # the bf16 model once, while loading
    assert plan["nothing_fits"]["preset"] == "24gb-lowram"
    assert f"{need - 32:.1f} GiB short" in plan["nothing_fits"]["message"]


def test_when_nothing_fits_the_text_says_which_resource_is_short(capsys):
    # A 24 GB card on a 20 GiB host: even the low-RAM preset's pinned host buffers need more than the host has.
    assert main(["--vram-gb", "24", "--host-gb", "20"]) == 0
    out = capsys.readouterr().out
    assert "no preset fits: host RAM is short. 24gb-lowram fits this card" in out and "20.0 GiB are available" in out
    assert "recommended" not in out and "no (host RAM)" in out
    # A card smaller than the smallest preset's need.
    assert main(["--vram-gb", "8", "--host-gb", "256"]) == 0
    out = capsys.readouterr().out
    assert "GPU memory is short. The smallest, 24gb, needs" in out and "8.0 GiB are free" in out


def test_sizes_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        main(["--host-gb", "-4"])
    assert "not a positive number" in capsys.readouterr().err


# ---- the rule itself, over predicted needs (a preset for 32 GiB hosts included) --------------------------------
NEEDS = [("24gb", 15.2, 68.4), ("24gb-lowram", 22.0, 28.0), ("32gb", 30.9, 34.2), ("48gb", 45.2, 23.8),
         ("80gb", 70.1, 5.6)]


@pytest.mark.parametrize(("vram", "host", "best"), [
    (24, 32, "24gb-lowram"),  # the main 24 GB preset needs more host RAM than there is
    (24, 64, "24gb-lowram"),
    (24, 128, "24gb"),  # both fit: the one that needs the most host RAM is the unconstrained one
    (32, 64, "32gb"),
    (80, 16, "80gb"),
    (48, 24, "48gb"),
    (48, 16, None),
])
def test_choose_preset_takes_the_largest_card_class_that_fits_both(vram, host, best):
    needs = [(n, int(g * GIB), int(h * GIB)) for n, g, h in NEEDS]
    choice = choose_preset(needs, vram * GIB, host * GIB)
    assert choice.best == best
    if best is None:  # the card holds four presets; of those, 48gb needs the least host RAM
        assert (choice.short, choice.short_preset) == ("host", "48gb")
        assert choice.short_bytes == int(23.8 * GIB) - 16 * GIB and "7.8 GiB short" in choice.why_none


def test_choose_preset_without_the_card_size_recommends_nothing():
    choice = choose_preset([("24gb", 15 * GIB, 68 * GIB)], None, 128 * GIB)
    assert choice.best is None and choice.rows[0].fits_gpu is None and choice.rows[0].fits is None
