"""Run config: strict loading, `extends`, every error class naming file/key/fix, saving, freezing, hashing."""
from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from engine import config as cf
from engine.config.schema import flatten

REPO = Path(__file__).resolve().parents[1]
BASE_PRESET = REPO / "presets" / "base.toml"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def assert_names_file_key_fix(err: cf.ConfigError, file: Path, key: str) -> None:
    text = str(err)
    assert "\n" not in text
    assert err.file == str(file) and str(file) in text
    assert err.key == key and key in text
    assert err.fix and f"fix: {err.fix}" in text


# --- defaults and the base preset ------------------------------------------------------------------------


def test_defaults_are_valid_and_base_preset_is_every_default():
    assert cf.check_config(cf.Config()) == []
    assert cf.load_config(BASE_PRESET) == cf.Config()
    written = set(flatten(tomllib.loads(BASE_PRESET.read_text())))
    expected = set(flatten(cf.resolved_dict(cf.Config())))
    # Empty arrays of tables are shown as commented examples; every other key is written out.
    assert expected - written == {"data.datasets", "validation.cases", "validation.eval_loss.datasets"}
    assert "[[data.datasets]]" in BASE_PRESET.read_text()
    assert "[[validation.eval_loss.datasets]]" in BASE_PRESET.read_text()


def test_every_schema_key_has_help():
    fields = cf.schema_fields()
    assert {f.key for f in fields} == set(flatten(cf.resolved_dict(cf.Config())))
    assert all(f.help for f in fields)
    optimizer = next(f for f in fields if f.key == "optim.optimizer")
    assert optimizer.choices == ("adamw", "adamw8bit", "lion8bit", "paged_adamw8bit", "paged_lion8bit", "lion",
                                "prodigy", "schedulefree")


def test_defaults_follow_the_brief():
    c = cf.Config()
    assert (c.data.frames, c.data.motion_frames, c.train.flow_shift) == (80, 73, 3.0)
    assert (c.validation.steps, c.validation.cfg_scale, c.validation.solver) == (40, 4.5, "unipc")
    assert len(c.lora.targets) == 3 and all("to_q" in t for t in c.lora.targets)
    # Nested defaults are fresh objects per instance.
    a, b = cf.Config(), cf.Config()
    a.validation.cases.append(cf.ValidationCase(reference="r.png", audio="a.wav"))
    assert b.validation.cases == []


# --- extends ---------------------------------------------------------------------------------------------


def test_extends_chain_merges_tables_and_replaces_arrays(tmp_path):
    write(tmp_path / "presets/root.toml", '[lora]\nrank = 8\nalpha = 4.0\n[output]\nformats = ["peft", "native"]\n')
    write(tmp_path / "presets/mid.toml", 'extends = "root.toml"\n[lora]\nalpha = 8.0\n')
    leaf = write(
        tmp_path / "runs/leaf.toml",
        'extends = "../presets/mid.toml"\n[output]\nformats = ["native"]\n'
        '[[data.datasets]]\npath = "clips"\nrepeats = 2\n',
    )
    c = cf.load_config(leaf)
    assert (c.lora.rank, c.lora.alpha) == (8, 8.0)
    assert c.output.formats == ["native"]
    assert c.data.datasets == [cf.DatasetEntry(path="clips", repeats=2)]


def test_extends_cycle_is_an_error(tmp_path):
    a = write(tmp_path / "a.toml", 'extends = "b.toml"\n')
    b = write(tmp_path / "b.toml", 'extends = "a.toml"\n')
    with pytest.raises(cf.ExtendsError) as info:
        cf.load_config(a)
    assert_names_file_key_fix(info.value, b, "extends")
    assert "a.toml -> b.toml -> a.toml" in str(info.value)


def test_extends_missing_file_names_the_extending_file(tmp_path):
    a = write(tmp_path / "a.toml", 'extends = "nope.toml"\n')
    with pytest.raises(cf.ExtendsError) as info:
        cf.load_config(a)
    assert_names_file_key_fix(info.value, a, "extends")


def test_config_path_that_is_a_folder(tmp_path):
    with pytest.raises(cf.ConfigError) as info:
        cf.load_config(tmp_path)
    assert_names_file_key_fix(info.value, tmp_path, "(file)")
    assert "is a folder" in str(info.value) and ".toml" in info.value.fix


def test_extends_a_folder_names_the_extending_file(tmp_path):
    (tmp_path / "presets").mkdir()
    a = write(tmp_path / "a.toml", 'extends = "presets"\n')
    with pytest.raises(cf.ExtendsError) as info:
        cf.load_config(a)
    assert_names_file_key_fix(info.value, a, "extends")
    assert "is a folder" in str(info.value)


def test_config_that_is_not_utf8_gives_the_byte_offset(tmp_path):
    base = tmp_path / "base.toml"
    base.write_bytes("[lora]\nrank = 8  # caf\u00e9\n".encode("latin-1"))
    a = write(tmp_path / "a.toml", 'extends = "base.toml"\n')
    for path in (base, a):  # directly, and through extends: the error names the file that is not UTF-8
        with pytest.raises(cf.ConfigError) as info:
            cf.load_config(path)
        assert_names_file_key_fix(info.value, base, "(file)")
        assert "offset 22" in str(info.value) and "save it as UTF-8" in info.value.fix


def test_unreadable_config_names_the_file(tmp_path, monkeypatch):
    path = write(tmp_path / "run.toml", "")
    real = Path.read_bytes

    def denied(self):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)  # chmod 000 does not stop root, who runs the CI
    with pytest.raises(cf.ConfigError) as info:
        cf.load_config(path)
    assert_names_file_key_fix(info.value, path, "(file)")
    assert "permission denied" in str(info.value) and "chmod" in info.value.fix


def test_headless_unreadable_config_exits_2(tmp_path, capsys):
    from s2v_tui.commands.headless import EXIT_CONFIG, run_headless

    bad = tmp_path / "latin.toml"
    bad.write_bytes(b"[lora]\nrank = 8  # caf\xe9\n")
    for path in (tmp_path, bad):  # an exception other than ConfigError would escape here as a traceback
        assert run_headless(str(path)) == EXIT_CONFIG
        assert str(path) in capsys.readouterr().err


def test_extends_must_be_a_string(tmp_path):
    a = write(tmp_path / "a.toml", "extends = 3\n")
    with pytest.raises(cf.WrongTypeError) as info:
        cf.load_config(a)
    assert_names_file_key_fix(info.value, a, "extends")


def test_toml_syntax_error(tmp_path):
    a = write(tmp_path / "a.toml", "[lora]\nrank = = 3\n")
    with pytest.raises(cf.TomlSyntaxError) as info:
        cf.load_config(a)
    assert_names_file_key_fix(info.value, a, "(syntax)")
    assert "line 2" in str(info.value)


# --- unknown keys and types ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "hint"),
    [
        ("[lora]\nrnak = 8\n", "lora.rnak", "did you mean 'lora.rank'?"),
        ("[optimizer]\nlr = 1.0\n", "optimizer", "did you mean 'optim'?"),
        ("[lora]\nlr = 1e-4\n", "lora.lr", "'optim.lr'"),
        ("[optim.ema]\ndecy = 0.9\n", "optim.ema.decy", "did you mean 'optim.ema.decay'?"),
        ('[[data.datasets]]\npath = "x"\nrepeat = 2\n', "data.datasets[0].repeat", "'data.datasets[0].repeats'"),
        ("[memory]\nqwerty = 1\n", "memory.qwerty", "valid keys here"),
        ('extend = "base.toml"\n', "extend", "did you mean 'extends'?"),
    ],
)
def test_unknown_key_names_file_key_and_closest(tmp_path, text, key, hint):
    path = write(tmp_path / "run.toml", text)
    with pytest.raises(cf.UnknownKeyError) as info:
        cf.load_config(path)
    assert_names_file_key_fix(info.value, path, key)
    assert hint in info.value.fix


def test_error_names_the_file_that_set_the_key(tmp_path):
    base = write(tmp_path / "base.toml", "[lora]\nrnak = 8\n")
    leaf = write(tmp_path / "leaf.toml", 'extends = "base.toml"\n[lora]\nrank = 4\n')
    with pytest.raises(cf.UnknownKeyError) as info:
        cf.load_config(leaf)
    assert_names_file_key_fix(info.value, base, "lora.rnak")
    write(tmp_path / "base.toml", "[optim]\ngrad_accum = 0\n")
    with pytest.raises(cf.BadValueError) as info:
        cf.load_config(leaf)
    assert_names_file_key_fix(info.value, base, "optim.grad_accum")


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ('[lora]\nrank = "16"\n', "lora.rank", "expected integer"),
        ("[lora]\nrank = true\n", "lora.rank", "expected integer"),
        ("[lora]\nrank = 16.5\n", "lora.rank", "expected integer"),
        ('[optim]\nlr = "1e-4"\n', "optim.lr", "expected number"),
        ("[memory]\ngradient_checkpointing = 1\n", "memory.gradient_checkpointing", "expected boolean"),
        ("[data]\nresolution = [832]\n", "data.resolution", "array of 2"),
        ('[lora]\ntargets = "to_q"\n', "lora.targets", "expected array of string"),
        ("[output]\nformats = [1]\n", "output.formats[0]", "expected 'peft' | 'native'"),
        ("lora = 3\n", "lora", "expected table"),
        ("[data]\ndatasets = [1]\n", "data.datasets[0]", "expected table"),
    ],
)
def test_wrong_type_names_expected_type(tmp_path, text, key, expected):
    path = write(tmp_path / "run.toml", text)
    with pytest.raises(cf.WrongTypeError) as info:
        cf.load_config(path)
    assert_names_file_key_fix(info.value, path, key)
    assert expected in info.value.message


def test_wrong_type_fix_shows_an_example(tmp_path):
    path = write(tmp_path / "run.toml", '[lora]\nrank = "16"\n')
    with pytest.raises(cf.WrongTypeError) as info:
        cf.load_config(path)
    assert "rank = 16" in info.value.fix


def test_integer_is_accepted_where_a_number_is_expected(tmp_path):
    c = cf.load_config(write(tmp_path / "run.toml", "[lora]\nalpha = 8\n"))
    assert c.lora.alpha == 8.0 and isinstance(c.lora.alpha, float)


def test_choice_outside_the_set_suggests_the_closest(tmp_path):
    path = write(tmp_path / "run.toml", '[optim]\noptimizer = "adamw_8bit"\n')
    with pytest.raises(cf.BadValueError) as info:
        cf.load_config(path)
    assert_names_file_key_fix(info.value, path, "optim.optimizer")
    assert "adamw8bit" in info.value.fix


# --- value rules and impossible combinations -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "error", "key"),
    [
        ("[data]\nframes = 81\n", cf.BadValueError, "data.frames"),
        ("[data]\nframes = 83\nmotion_frames = 0\n", cf.BadValueError, "data.frames"),
        ("[data]\nmotion_frames = 70\n", cf.BadValueError, "data.motion_frames"),
        ("[data]\nmotion_frames = 77\n", cf.BadValueError, "data.motion_frames"),
        ("[data]\nresolution = [830, 480]\n", cf.BadValueError, "data.resolution"),
        ("[data]\nmotion_drop_prob = 1.5\n", cf.BadValueError, "data.motion_drop_prob"),
        ('[[data.datasets]]\npath = "x"\nrepeats = 0\n', cf.BadValueError, "data.datasets[0].repeats"),
        ('[[data.datasets]]\npath = ""\n', cf.BadValueError, "data.datasets[0].path"),
        ("[lora]\nalpha = 0\n", cf.BadValueError, "lora.alpha"),
        ("[lora]\nrank = 0\n", cf.BadValueError, "lora.rank"),
        ("[lora]\ndropout = 1.0\n", cf.BadValueError, "lora.dropout"),
        ("[lora]\ntargets = []\n", cf.BadValueError, "lora.targets"),
        ("[lora]\ntargets = ['attn1.(to_q']\n", cf.BadValueError, "lora.targets[0]"),
        ("[optim]\ngrad_accum = 0\n", cf.BadValueError, "optim.grad_accum"),
        ("[optim]\nbetas = [0.9, 1.0]\n", cf.BadValueError, "optim.betas[1]"),
        ("[optim]\nwarmup_steps = 100\nmax_steps = 100\n", cf.ConflictError, "optim.warmup_steps"),
        ('[optim]\noptimizer = "schedulefree"\nschedule = "cosine"\n', cf.ConflictError, "optim.schedule"),
        ('[optim]\noptimizer = "prodigy"\nlr = 1e-4\n', cf.ConflictError, "optim.lr"),
        ("[optim.ema]\ndecay = 1.0\n", cf.BadValueError, "optim.ema.decay"),
        ("[train]\nflow_shift = 0\n", cf.BadValueError, "train.flow_shift"),
        ("[train]\nnonfinite_max_in_a_row = 0\n", cf.BadValueError, "train.nonfinite_max_in_a_row"),
        ("[checkpoint]\nkeep_last = 0\n", cf.BadValueError, "checkpoint.keep_last"),
        ("[validation]\nevery_steps = 100\n", cf.ConflictError, "validation.every_steps"),
        ('[[validation.cases]]\nreference = "r.png"\n', cf.BadValueError, "validation.cases[0].audio"),
        (
            "[memory]\ngradient_checkpointing = false\noffload_checkpoint_inputs = true\n",
            cf.ConflictError,
            "memory.offload_checkpoint_inputs",
        ),
        ('[memory]\nbase_weights = "int8"\n[model]\ndtype = "fp32"\n', cf.ConflictError, "memory.base_weights"),
        ('[output]\nformats = ["peft", "peft"]\n', cf.BadValueError, "output.formats"),
        ("[logging]\nevery_steps = 0\n", cf.BadValueError, "logging.every_steps"),
    ],
)
def test_rule_errors_name_file_key_and_fix(tmp_path, text, error, key):
    path = write(tmp_path / "run.toml", text)
    with pytest.raises(error) as info:
        cf.load_config(path)
    assert type(info.value) is error
    assert_names_file_key_fix(info.value, path, key)


@pytest.mark.parametrize(("text", "key"), [
    ("[optim]\nlr = inf\n", "optim.lr"),
    ("[optim]\nlr = -inf\n", "optim.lr"),
    ("[optim]\nweight_decay = nan\n", "optim.weight_decay"),
    ("[train]\nlogit_mean = inf\n", "train.logit_mean"),
    ("[optim]\nbetas = [0.9, nan]\n", "optim.betas[1]"),
    ('[[data.datasets]]\npath = "x"\nweight = inf\n', "data.datasets[0].weight"),
    ("[memory]\nvram_budget_gb = inf\n", "memory.vram_budget_gb"),
])
def test_no_float_key_takes_nan_or_inf(tmp_path, text, key):
    path = write(tmp_path / "run.toml", text)
    with pytest.raises(cf.BadValueError) as info:
        cf.load_config(path)
    assert_names_file_key_fix(info.value, path, key)
    assert "finite" in str(info.value)


def test_non_finite_values_are_refused_from_the_command_line_and_in_code():
    with pytest.raises(cf.BadValueError) as info:
        cf.with_value(cf.Config(), *cf.parse_override("optim.lr=inf"))
    assert info.value.key == "optim.lr"
    c = cf.Config()
    c.optim.lr = float("inf")
    c.optim.betas = (float("nan"), 0.999)
    assert [e.key for e in cf.check_config(c)] == ["optim.lr", "optim.betas[0]"]  # one error per key, not two


def test_a_key_may_allow_non_finite_values(monkeypatch):
    from engine.config import schema

    monkeypatch.setattr(schema, "_NONFINITE", {"optim.max_grad_norm"})
    c = cf.with_value(cf.Config(), "optim.max_grad_norm", float("inf"))
    assert [e.key for e in cf.check_config(c)] == []


@pytest.mark.parametrize("name", ["", " ", "../x", "a/b", ".", "..", "/abs/run", "..\\x"])
def test_output_name_must_be_one_folder_name(tmp_path, name):
    path = write(tmp_path / "run.toml", f"[output]\nname = '{name}'\n")
    with pytest.raises(cf.BadValueError) as info:
        cf.load_config(path)
    assert_names_file_key_fix(info.value, path, "output.name")
    assert "one folder name" in info.value.fix
    # The command line and the form are refused at once: the runner makes the run folder before its checks.
    with pytest.raises(cf.BadValueError) as info:
        cf.with_value(cf.Config(), "output.name", name, file="<command line>")
    assert info.value.key == "output.name"


def test_model_source_must_not_be_empty(tmp_path):
    path = write(tmp_path / "run.toml", '[model]\nsource = ""\n')
    with pytest.raises(cf.BadValueError) as info:
        cf.load_config(path)
    assert_names_file_key_fix(info.value, path, "model.source")
    with pytest.raises(cf.BadValueError):
        cf.with_value(cf.Config(), *cf.parse_override('model.source=""'))


@pytest.mark.parametrize("source", ["/data/models/wan-s2v", "./models/x", "../x", "~/no-such-model-here",
                                    "models/wan/s2v"])
def test_missing_model_folder_is_said_before_a_run(tmp_path, source):
    path = write(tmp_path / "run.toml", f'[model]\nsource = "{source}"\n[[data.datasets]]\npath = "clips"\n')
    assert cf.load_config(path).model.source == source  # editing a preset for another machine stays possible
    cf.load_config(path, require_data=True, require_model=False)  # `s2v-tui check` reads the data only
    with pytest.raises(cf.BadValueError) as info:
        cf.load_config(path, require_data=True)  # a run or a cache fill
    assert_names_file_key_fix(info.value, path, "model.source")
    assert "does not exist" in info.value.message and "owner/name" in info.value.message


def test_model_source_forms_that_pass_the_check(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "x").mkdir(parents=True)
    for source in ("Wan-AI/Wan2.2-S2V-14B", "./models/x", str(tmp_path / "models" / "x"), "models/x"):
        c = cf.with_value(cf.Config(), "model.source", source)
        assert cf.check_config(c, require_model=True) == [], source
    c = cf.with_value(cf.Config(), "model.source", "not a hub id")
    assert [e.key for e in cf.check_config(c, require_model=True)] == ["model.source"]


def test_frame_forms_that_are_allowed(tmp_path):
    for text in ("[data]\nframes = 84\n", "[data]\nframes = 80\nmotion_frames = 0\n", "[data]\nmotion_frames = 9\n"):
        cf.load_config(write(tmp_path / "ok.toml", text))


@pytest.mark.parametrize("frames", [1, 5, 81])
def test_frames_the_dataset_code_refuses_are_refused_by_the_config(tmp_path, frames):
    from engine.data.cache_plan import doctor_settings

    path = write(tmp_path / "run.toml", f"[data]\nframes = {frames}\nmotion_frames = 0\n")
    with pytest.raises(cf.BadValueError) as info:
        cf.load_config(path)
    assert_names_file_key_fix(info.value, path, "data.frames")
    assert "valid values are 4, 8, 12" in info.value.message
    c = cf.Config()
    c.data.frames, c.data.motion_frames = frames, 0
    with pytest.raises(ValueError) as data_error:  # the dataset code says the same: one rule, two callers
        doctor_settings(c)
    assert info.value.message in str(data_error.value)
    c.data.frames = 8
    for mf in (0, 1, 5, 73):
        c.data.motion_frames = mf
        assert cf.check_config(c) == []
        doctor_settings(c)


def test_batch_larger_than_the_dataset(tmp_path):
    path = write(tmp_path / "run.toml", "[optim]\nbatch_size = 4\n")
    cf.load_config(path, dataset_size=4)
    with pytest.raises(cf.ConflictError) as info:
        cf.load_config(path, dataset_size=3)
    assert_names_file_key_fix(info.value, path, "optim.batch_size")


def test_require_data(tmp_path):
    path = write(tmp_path / "run.toml", "")
    cf.load_config(path)
    with pytest.raises(cf.BadValueError) as info:
        cf.load_config(path, require_data=True)
    assert_names_file_key_fix(info.value, path, "data.datasets")


def test_check_returns_every_problem_for_the_form():
    c = cf.Config()
    c.lora.rank = 0
    c.optim.grad_accum = 0
    c.data.frames = 81
    keys = [e.key for e in cf.check_config(c, "form")]
    assert keys == ["data.frames", "lora.rank", "optim.grad_accum"]


def test_config_error_pickles():
    err = cf.ConflictError("f.toml", "optim.lr", "bad", "fix it")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cf.ConflictError and str(back) == str(err)


# --- hash, diff, save, freeze ----------------------------------------------------------------------------


def test_hash_is_stable_across_processes_and_key_order(tmp_path):
    a = cf.load_config(write(tmp_path / "a.toml", "[lora]\nrank = 8\nalpha = 4.0\n[optim]\nlr = 2e-4\n"))
    b = cf.load_config(write(tmp_path / "b.toml", "[optim]\nlr = 2e-4\n[lora]\nalpha = 4\nrank = 8\n"))
    assert a.config_hash() == b.config_hash() == cf.config_hash(a)
    code = f"from engine.config import load_config; print(load_config({str(tmp_path / 'a.toml')!r}).config_hash())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == a.config_hash()
    assert dataclasses.replace(a, lora=dataclasses.replace(a.lora, rank=9)).config_hash() != a.config_hash()


def test_diff_lists_changed_keys_in_schema_order():
    a, b = cf.Config(), cf.Config()
    b.optim.lr = 3e-4
    b.lora.rank = 32
    b.data.datasets.append(cf.DatasetEntry(path="clips"))
    changes = cf.diff(a, b)
    assert [c.key for c in changes] == ["data.datasets", "lora.rank", "optim.lr"]
    assert changes[1] == cf.ConfigChange("lora.rank", 16, 32)
    assert cf.diff(a, a) == []


def test_save_keeps_comments_and_writes_only_what_differs(tmp_path):
    write(tmp_path / "base.toml", "[lora]\nrank = 8\n")
    path = write(
        tmp_path / "mine.toml",
        '# my run\nextends = "base.toml"\n\n[lora]\n# keep this note\nalpha = 8.0  # why 8\n',
    )
    c = cf.load_config(path)
    c.lora.alpha = 4.0
    c.optim.lr = 5e-5
    c.data.datasets = [cf.DatasetEntry(path="clips", repeats=3)]
    cf.save_config(c, path)
    text = path.read_text()
    for kept in ("# my run", "# keep this note", "alpha = 4.0  # why 8", 'extends = "base.toml"'):
        assert kept in text
    assert "rank" not in text  # inherited unchanged from base.toml
    assert "[[data.datasets]]" in text and "lr = 5e-05" in text
    assert cf.load_config(path) == c


def test_save_adds_extends_and_full_writes_everything(tmp_path):
    write(tmp_path / "base.toml", "[lora]\nrank = 8\n")
    c = cf.load_config(tmp_path / "base.toml")
    c.lora.targets = [r"blocks\.\d+\.attn1\.to_q"]
    new = cf.save_config(c, tmp_path / "new.toml", extends="base.toml")
    assert new.read_text().startswith('extends = "base.toml"')
    assert cf.load_config(new) == c
    full = cf.save_config(c, tmp_path / "full.toml", full=True)
    assert set(flatten(tomllib.loads(full.read_text()))) >= {"lora.rank", "memory.chunked_ffn"}
    assert cf.load_config(full) == c


def test_frozen_copy_round_trips_and_refuses_extends(tmp_path):
    c = cf.Config()
    c.data.datasets = [cf.DatasetEntry(path="clips", audio_dir="wav", weight=2.0)]
    c.validation.cases = [cf.ValidationCase(reference="r.png", audio="a.wav", prompt="hi")]
    c.validation.every_steps = 50
    path = cf.write_frozen_config(c, tmp_path / "run")
    assert path.name == cf.FROZEN_FILENAME
    assert c.config_hash() in path.read_text()
    back = cf.read_frozen_config(tmp_path / "run")
    assert back == c and back.config_hash() == c.config_hash()
    write(path, 'extends = "x.toml"\n' + path.read_text())
    with pytest.raises(cf.ExtendsError) as info:
        cf.read_frozen_config(tmp_path / "run")
    assert_names_file_key_fix(info.value, path, "extends")


def test_default_lora_targets_hit_the_368_linears_of_the_14b_checkpoint():
    # spec/S2V_MODEL.md §2.3: q, k, v, o of self-attn and text cross-attn in 40 blocks, plus 12 audio injectors.
    import re
    from importlib import resources

    rows = resources.files("engine.models").joinpath("data/s2v14b_checkpoint_keys.tsv").read_text().splitlines()
    diffusers_keys = [line.split("\t")[1] for line in rows[1:]]
    modules = {key.removesuffix(".weight") for key in diffusers_keys if key.endswith(".weight")}
    hits = {m for m in modules if any(re.fullmatch(p, m) for p in cf.DEFAULT_LORA_TARGETS)}
    assert len(hits) == 40 * 8 + 12 * 4
    assert all(m.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or m.endswith("to_out.0") for m in hits)


def test_with_value_converts_and_checks_like_a_file():
    c = cf.Config()
    new = cf.with_value(c, *cf.parse_override("optim.lr=2e-4"))
    assert new.optim.lr == 2e-4 and c.optim.lr == 1e-4  # a copy; the original is untouched
    assert cf.with_value(c, *cf.parse_override('output.name="a b"')).output.name == "a b"
    assert cf.with_value(c, *cf.parse_override("model.source=org/model")).model.source == "org/model"
    assert cf.with_value(c, "data.resolution", [640, 384]).data.resolution == (640, 384)
    with pytest.raises(cf.WrongTypeError) as info:
        cf.with_value(c, "lora.rank", "x", file="form")
    assert_names_file_key_fix(info.value, Path("form"), "lora.rank")
    with pytest.raises(cf.UnknownKeyError) as info:
        cf.with_value(c, "optim.lrr", 1.0, file="form")
    assert_names_file_key_fix(info.value, Path("form"), "optim.lrr")
    assert "optim.lr" in info.value.fix
    with pytest.raises(cf.ConfigError) as info:
        cf.parse_override("optim.lr")
    assert_names_file_key_fix(info.value, Path("<command line>"), "optim.lr")


def test_run_and_cache_paths():
    c = cf.Config()
    assert c.run_path() == Path("runs/s2v-lora") and c.cache_path() == Path("runs/cache")
    c.data.cache_dir = "/fast/cache"
    assert c.cache_path() == Path("/fast/cache")


def test_tracking_and_upload_keys_leave_the_run_identity_alone():
    """wandb, webhooks and the Hub upload report a run; no tensor depends on them, so a resume may change them."""
    base = cf.Config()
    changed = base
    for key, value in (("logging.wandb_project", "p"), ("logging.webhooks", ["https://example.org/h"]),
                       ("logging.webhook_format", "slack"), ("logging.webhook_timeout_s", 3.0),
                       ("output.push_to_hub", "me/lora"), ("output.push_checkpoints", True),
                       ("output.hub_private", False)):
        assert key in cf.REPORTING_KEYS
        changed = cf.with_value(changed, key, value)
    assert changed.config_hash() != base.config_hash()
    assert changed.identity_hash() == base.identity_hash()


def test_save_keeps_the_comments_of_an_array_of_tables_and_the_default_file_mode(tmp_path):
    import os

    from engine.config import load_config, save_config, with_value

    (tmp_path / "base.toml").write_text((REPO / "presets" / "base.toml").read_text())
    path = tmp_path / "mine.toml"
    path.write_text('extends = "base.toml"\n\n# my clips\n[[data.datasets]]\n# the main folder\npath = "clips"  # 64x64\n'
                    'repeats = 2\n')
    config = with_value(load_config(path), "data.datasets", [{"path": "clips", "repeats": 3}, {"path": "more"}])
    save_config(config, path)
    text = path.read_text()
    assert "# my clips" in text and "# the main folder" in text and 'path = "clips"  # 64x64' in text
    assert "repeats = 3" in text and 'path = "more"' in text
    assert "weight" not in text and "audio_dir" not in text  # defaults are not spelled out
    assert [d.path for d in load_config(path).data.datasets] == ["clips", "more"]
    config = with_value(config, "data.datasets", [{"path": "clips", "repeats": 3}])
    save_config(config, path)
    assert 'path = "more"' not in path.read_text() and "# the main folder" in path.read_text()
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
