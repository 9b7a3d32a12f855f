"""The memory model against the measured 14B steps, and the pre-flight refusal."""
import pytest

from engine.config import Config
from engine.memory import CALIBRATION, GIB, calibration_errors, estimate, estimate_parts, sequence_tokens
from engine.presets import PreflightError, preflight, recommend


def test_predictions_within_ten_percent_of_every_measured_peak():
    rows = calibration_errors()
    assert len(rows) == len(CALIBRATION) >= 4
    for label, predicted, measured in rows:
        assert abs(predicted - measured) / measured <= 0.10, label


def test_token_arithmetic_matches_the_spec():
    assert sequence_tokens(832, 480, 81, motion=False) == 34_320
    assert sequence_tokens(832, 480, 80, motion=True) == 35_074
    assert sequence_tokens(832, 480, 80, motion=False) == 32_760


def test_each_switch_moves_memory_the_right_way():
    base = estimate_parts(35_074)
    offloaded = estimate_parts(35_074, offload_inputs=True)
    streamed = estimate_parts(35_074, offload_inputs=True, stream_resident=0)
    some_resident = estimate_parts(35_074, offload_inputs=True, stream_resident=10)
    assert base.vram_bytes > offloaded.vram_bytes > some_resident.vram_bytes > streamed.vram_bytes
    assert streamed.host_bytes > offloaded.host_bytes > base.host_bytes
    # Streaming keeps the non-block weights plus two units in flight: under 3 GiB of the 30 GiB of weights.
    assert streamed.parts["weights"] < 3 * GIB < 30 * GIB < base.parts["weights"]


def test_preflight_refuses_with_the_preset_to_pick():
    big = Config()
    small = Config()
    small.memory.offload_checkpoint_inputs = True
    small.memory.block_offload = True
    presets = {"80gb": big, "24gb": small}
    free = 24 * GIB
    assert recommend(presets, free, 96 * GIB) == "24gb"
    assert recommend(presets, 80 * GIB, 96 * GIB) == "80gb"
    with pytest.raises(PreflightError, match=r"GiB of GPU memory, 24\.0 GiB are free\. Pick the preset '24gb'"):
        preflight(big, free, 96 * GIB, presets)
    assert preflight(small, free, 96 * GIB, presets).vram_need_bytes < free


def test_preflight_checks_host_ram_too():
    cfg = Config()
    cfg.memory.offload_checkpoint_inputs = True
    cfg.memory.block_offload = True
    with pytest.raises(PreflightError, match="host RAM"):
        preflight(cfg, 80 * GIB, 8 * GIB)
    assert estimate(cfg).host_bytes > 8 * GIB


def test_host_ram_predictions_match_the_measured_runs():
    """The earlier runs kept their pinned buffers in torch's host allocator, which rounds each up to a power of two:
    the model reproduces them with that rounding (pinned="torch"); the user's-path rows ran with the slabs."""
    from engine.memory import HOST_CALIBRATION, host_calibration_errors, pinned_bytes

    rows = host_calibration_errors()
    assert len(rows) == len(HOST_CALIBRATION) >= 8 and {c.pinned for c in HOST_CALIBRATION} == {"torch", "slab"}
    assert sum(c.label.startswith("real path") for c in HOST_CALIBRATION) >= 2
    for label, predicted, measured in rows:
        assert abs(predicted - measured) / measured <= 0.10, (label, predicted, measured)
    assert pinned_bytes(351_436_800) == 2**29 and pinned_bytes(2**20) == 2**20


def test_shipped_presets_fit_their_cards_with_five_percent_spare():
    from pathlib import Path

    from engine.config import load_config
    from engine.memory import estimate

    presets = Path(__file__).resolve().parents[1] / "presets"
    for name, card_gib in (("24gb", 24), ("24gb-lowram", 24), ("32gb", 32), ("48gb", 48), ("80gb", 80)):
        est = estimate(load_config(presets / f"{name}.toml"))
        assert est.vram_bytes <= 0.95 * card_gib * GIB, name


def test_preflight_says_what_is_short_when_no_preset_fits():
    from engine.presets import shipped_presets

    small = shipped_presets()["24gb"]
    with pytest.raises(PreflightError,
                       match=r"No preset fits: host RAM is short\. 24gb-lowram fits this card .* GiB short"):
        preflight(small, 24 * GIB, 20 * GIB, shipped_presets())


def test_preflight_on_a_32_gib_host_names_the_lowram_preset(monkeypatch):
    import engine.memory
    from engine.presets import shipped_presets

    monkeypatch.setattr(engine.memory, "loader_quantises_while_loading", lambda: True)
    with pytest.raises(PreflightError, match=r"GiB of host RAM, 32\.0 GiB are available\. Pick the preset "
                                             r"'24gb-lowram' instead"):
        preflight(shipped_presets()["24gb"], 24 * GIB, 32 * GIB, shipped_presets())


def test_less_host_ram_preset_fits_the_card_it_is_asked_for():
    from engine.memory import predict
    from engine.presets import less_host_ram_preset, shipped_presets

    presets = shipped_presets()
    fp8 = presets["32gb"]
    name, host = less_host_ram_preset(fp8, presets, 80 * GIB)
    assert host < predict(fp8)[1] and predict(presets[name])[0] <= 80 * GIB
    assert host == min(predict(c)[1] for c in presets.values() if predict(c)[0] <= 80 * GIB)
    # Without the card's size: only presets needing no more GPU memory than this config itself.
    assert less_host_ram_preset(presets["24gb"], presets) is None


def test_preset_files_leave_out_base_toml(tmp_path):
    from engine.presets import preset_files

    for name in ("base.toml", "24gb.toml", "24gb-lowram.toml", "notes.txt"):
        (tmp_path / name).write_text("")
    assert [p.name for p in preset_files(tmp_path)] == ["24gb-lowram.toml", "24gb.toml"]


def test_exact_size_slabs_cut_the_24gb_presets_host_prediction_by_the_rounding():
    """The engine's pinned slabs hold the tensors' own bytes (+4 KiB alignment); torch's pinned allocator, which the
    measured host rows ran with, rounded each buffer up to a power of two. The prediction drops by that rounding."""
    from pathlib import Path

    from engine.config import load_config
    from engine.memory import LAYERS, _unit_params

    cfg = load_config(Path(__file__).resolve().parents[1] / "presets" / "24gb.toml")
    assert cfg.memory.block_offload and cfg.memory.offload_checkpoint_inputs and cfg.memory.blocks_resident == 0
    slab, torch_pinned = estimate(cfg), estimate(cfg, pinned="torch")
    tokens = slab.tokens
    assert tokens == 35_074  # 832x480, 80 frames, motion frames on

    weights = sum(_unit_params(i) for i in range(LAYERS)) * 2  # every frozen block/injector tensor, bf16
    one_input = tokens * 5120 * 2
    # Exact sizes: each of the 1,224 streamed tensors and 40 saved inputs at most 4 KiB over, plus a page a slab.
    over_weights = slab.parts["host_pinned_weights"] - weights
    over_inputs = slab.parts["host_pinned_inputs"] - LAYERS * one_input
    assert 0 <= over_weights <= 1300 * 4096 and 0 <= over_inputs <= LAYERS * 2 * 4096
    # The rounding the old figures carried: 44.5 GiB for the 29.7 GiB of weights, 40 x 0.5 GiB for 40 x 0.33 GiB.
    assert round(torch_pinned.parts["host_pinned_weights"] / GIB, 2) == 44.51
    assert round(weights / GIB, 2) == 29.70
    assert torch_pinned.parts["host_pinned_inputs"] == LAYERS * 2**29
    drop = torch_pinned.host_bytes - slab.host_bytes
    assert drop == (torch_pinned.parts["host_pinned_weights"] - slab.parts["host_pinned_weights"]
                    + torch_pinned.parts["host_pinned_inputs"] - slab.parts["host_pinned_inputs"])
    assert round(torch_pinned.host_bytes / GIB, 1) == 68.4 and round(slab.host_bytes / GIB, 1) == 46.9
    assert round(drop / GIB, 1) == 21.4
    # The GPU side does not depend on how the host holds its buffers.
    assert slab.vram_bytes == torch_pinned.vram_bytes


# ---- low-bit streamed weights and saved inputs partly on the GPU (the 24gb-lowram preset) ----------------------
def _lowram(monkeypatch, quantising: bool = True):
    from pathlib import Path

    import engine.memory
    from engine.config import load_config

    monkeypatch.setattr(engine.memory, "loader_quantises_while_loading", lambda: quantising)
    return load_config(Path(__file__).resolve().parents[1] / "presets" / "24gb-lowram.toml")


def test_the_lowram_presets_predicted_figures(monkeypatch):
    """The figures its header gives, and each term from the sizes it is made of."""
    from engine.memory import (DIM, ENGINE_HOST_EXTRA_BYTES, HOST_BASELINE_BYTES, INT8_DEQUANT_BYTES, LAYERS,
                               PARAMS_TOTAL, _unit_params, low_bit_params, unit_bytes, unit_tensor_shapes_named)
    from engine.models.pinned_slab import slab_bytes

    cfg = _lowram(monkeypatch)
    m = cfg.memory
    assert (m.base_weights, m.block_offload, m.blocks_resident, m.offload_checkpoint_inputs) == ("int8", True, 0, True)
    est = estimate(cfg)
    assert est.tokens == 35_074
    assert (round(est.vram_bytes / GIB, 1), round(est.vram_need_bytes / GIB, 1), round(est.host_bytes / GIB, 1)) == \
        (21.4, 22.5, 26.8)
    # Host: the streamed units in int8 (1 byte a weight + fp32 row scales; injectors and norms bf16), in one slab.
    families = tuple(m.low_bit_families)
    units_bf16 = sum(_unit_params(i) for i in range(LAYERS)) * 2
    rows = sum(shape[0] for i in range(LAYERS) for name, shape in unit_tensor_shapes_named(i)
               if name.endswith(".weight") and len(shape) == 2 and "audio_injector" not in name
               and ".norm" not in name)
    int8_bytes = units_bf16 - low_bit_params(families) + 4 * rows
    over = est.parts["host_pinned_weights"] - int8_bytes
    assert 0 <= over <= 1300 * 4096 and round(est.parts["host_pinned_weights"] / GIB, 1) == 16.6
    one_input = 35_074 * DIM * 2
    kept = m.gpu_saved_inputs
    assert est.parts["host_pinned_inputs"] == (LAYERS - kept) * slab_bytes(one_input)
    assert est.host_bytes == (est.parts["host_pinned_weights"] + est.parts["host_pinned_inputs"]
                              + HOST_BASELINE_BYTES + ENGINE_HOST_EXTRA_BYTES)
    # GPU: the non-block weights in bf16 + the two largest units in flight, at their low-bit bytes (a block with
    # an injector: 0.62 GiB against 0.95 in bf16); the kept inputs + two in flight; int8's dequantised copy.
    rest = (PARAMS_TOTAL - sum(_unit_params(i) for i in range(LAYERS))) * 2
    assert est.parts["weights"] == rest + 2 * max(unit_bytes(i, 2.0, families) for i in range(LAYERS))
    assert est.parts["saved_inputs"] == (kept + 2) * one_input
    assert est.parts["low_bit_dequant"] == INT8_DEQUANT_BYTES
    # Loading with a quantising loader stays under the training figure; one that holds the bf16 model first
    # needs the bf16 model once.
    assert "host_load" not in est.parts
    held = estimate(_lowram(monkeypatch, quantising=False))
    assert held.host_bytes == held.parts["host_load"] == int(PARAMS_TOTAL * 2 + HOST_BASELINE_BYTES
                                                             + ENGINE_HOST_EXTRA_BYTES)
    assert round(held.host_bytes / GIB, 1) == 34.2 and held.vram_bytes == est.vram_bytes


def test_each_saved_input_kept_on_the_gpu_moves_one_input_from_host_to_gpu(monkeypatch):
    from engine.config import with_value
    from engine.memory import DIM, LAYERS
    from engine.models.pinned_slab import slab_bytes

    cfg = _lowram(monkeypatch)
    one_input = 35_074 * DIM * 2
    by_n = {n: estimate(with_value(cfg, "memory.gpu_saved_inputs", n)) for n in (0, 1, 2, 21, 30, LAYERS + 5)}
    for a, b in ((0, 1), (1, 2), (2, 21), (21, 30)):
        moved = b - a
        assert by_n[b].vram_bytes - by_n[a].vram_bytes == pytest.approx(moved * one_input, abs=2)
        assert (by_n[a].parts["host_pinned_inputs"] - by_n[b].parts["host_pinned_inputs"]
                == moved * slab_bytes(one_input))
    # All of them kept: no host slots, and the two "in flight" are gone with the offloaded ones.
    every = by_n[LAYERS + 5]
    assert every.parts["host_pinned_inputs"] == 0 and every.parts["saved_inputs"] == LAYERS * one_input


def test_low_bit_streaming_needs_less_than_bf16_streaming_on_both_sides(monkeypatch):
    from engine.config import with_value

    lowram = _lowram(monkeypatch)
    same_inputs = with_value(lowram, "memory.gpu_saved_inputs", 0)
    bf16 = with_value(same_inputs, "memory.base_weights", "bf16")
    a, b = estimate(same_inputs), estimate(bf16)
    assert a.parts["host_pinned_weights"] < 0.6 * b.parts["host_pinned_weights"]
    assert a.parts["weights"] < b.parts["weights"] and a.host_bytes < b.host_bytes
    # fp8 holds the same bytes and dequantises nothing in its forward.
    fp8 = estimate(with_value(same_inputs, "memory.base_weights", "fp8"))
    assert fp8.parts["host_pinned_weights"] == a.parts["host_pinned_weights"]
    assert a.vram_bytes - fp8.vram_bytes == a.parts["low_bit_dequant"] > 0


def test_the_loader_is_asked_whether_it_quantises_while_loading():
    import inspect

    from engine.memory import loader_quantises_while_loading
    from engine.models.loading import load_transformer

    assert loader_quantises_while_loading() == ("low_bit" in inspect.signature(load_transformer).parameters)


def test_a_low_bit_base_loaded_to_the_gpu_adds_nothing_to_the_host_prediction():
    """The runner quantises each Linear on the GPU as it is read (engine.models.loading): the host no longer holds
    the bf16 model, so the 32gb preset plans what training needs, as with a bf16 base (34.2 GiB before)."""
    from dataclasses import replace
    from pathlib import Path

    from engine.config import load_config
    from engine.memory import ENGINE_LOAD_HOST_BYTES, loader_quantises_while_loading, low_bit_load_host_bytes

    assert loader_quantises_while_loading()
    cfg = load_config(Path(__file__).resolve().parents[1] / "presets" / "32gb.toml")
    assert cfg.memory.base_weights == "fp8" and not cfg.memory.block_offload
    assert low_bit_load_host_bytes(cfg) == ENGINE_LOAD_HOST_BYTES
    est = estimate(cfg)
    bf16 = estimate(replace(cfg, memory=replace(cfg.memory, base_weights="bf16", fp8_input_grad=False)))
    assert "host_load" not in est.parts and est.host_bytes == bf16.host_bytes < 26 * GIB
    assert est.vram_bytes < bf16.vram_bytes - 12 * GIB  # the low-bit weights still count on the GPU
