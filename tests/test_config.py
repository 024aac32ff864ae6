"""The study file: every refusal is one line naming the field and what is allowed, in the library and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest

from hpsearch.config import ConfigError, ModelSection, StudyConfig, parse_study, read_study_file
from hpsearch.model._build import check_model_config

REPO = Path(__file__).resolve().parents[1]
STUDY_FILES = sorted((REPO / "studies").glob("*.toml"))


def refusal(load: Callable[[], Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load()
    return info.value


def assert_names(err: ConfigError, field: str, *allowed: str) -> None:
    """One line; the field is named (as err.field and in the text); the text says what is allowed."""
    text = str(err)
    assert "\n" not in text, text
    assert err.field == field or err.field.startswith(field + "."), (err.field, text)
    assert f"{field}" in text, text
    for word in allowed:
        assert word in text, (word, text)


# ------------------------------------------------------------------------------------- the parser


REFUSALS: list[tuple[str, dict[str, dict[str, Any]], str, tuple[str, ...]]] = [
    # id, overrides (table -> values), field, words the message must hold
    ("unknown-table", {"sapce": {"lr": [1e-3, 1e-2]}}, "sapce", ("unknown key", "space", "study", "ensemble")),
    ("unknown-key", {"study": {"n_trails": 3}}, "study.n_trails", ("unknown key", "n_trials")),
    ("unknown-nested-key", {"space": {"step": {"step_sz": [1, 2]}}}, "space.step.step_sz",
     ("unknown key", "step_size", "gamma")),
    ("wrong-type-int", {"study": {"n_trials": "ten"}}, "study.n_trials", ("integer",)),
    ("wrong-type-float", {"data": {"val_fraction": "a fifth"}}, "data.val_fraction", ("number",)),
    ("wrong-type-range", {"space": {"lr": "fast"}}, "space.lr", ("[low, high]",)),
    ("wrong-type-range-item", {"space": {"lr": ["low", 0.1]}}, "space.lr", ("numbers",)),
    ("wrong-type-int-range", {"space": {"step": {"step_size": [1.5, 3]}}}, "space.step.step_size", ("integers",)),
    ("low-above-high", {"space": {"lr": [0.1, 0.001]}}, "space.lr", ("low 0.1", "above high 0.001")),
    ("low-above-high-linear", {"space": {"dropout": [0.4, 0.1]}}, "space.dropout", ("low 0.4", "above high 0.1")),
    ("low-above-high-int", {"space": {"plateau": {"patience": [3, 1]}}}, "space.plateau.patience",
     ("low 3", "above high 1")),
    ("log-low-zero", {"space": {"lr": [0, 0.1]}}, "space.lr", ("log scale", "> 0")),
    ("log-low-negative", {"space": {"weight_decay": [-1e-4, 1e-3]}}, "space.weight_decay", ("log scale", "> 0")),
    ("log-low-zero-nested", {"space": {"exponential": {"gamma": [0.0, 0.9]}}}, "space.exponential.gamma",
     ("log scale", "> 0")),
    ("empty-optimizers", {"space": {"optimizer": []}}, "space.optimizer", ("at least one",)),
    ("empty-schedulers", {"space": {"scheduler": []}}, "space.scheduler", ("at least one",)),
    ("dropout-one", {"space": {"dropout": [0.0, 1.0]}}, "space.dropout", ("[0, 1)",)),
    ("unknown-optimizer", {"space": {"optimizer": ["adam", "lion"]}}, "space.optimizer",
     ("'lion'", "adam", "rmsprop", "sgd", "adamw")),
    ("unknown-scheduler", {"space": {"scheduler": ["cyclic"]}}, "space.scheduler",
     ("'cyclic'", "step", "exponential", "plateau", "cosine", "onecycle", "none")),
    ("unknown-dataset", {"data": {"dataset": "mnist"}}, "data.dataset",
     ("'mnist'", "digits", "cifar10", "cifar100", "imagefolder", "synthetic")),
    ("unknown-arch", {"model": {"arch": "lenet5"}}, "model.arch",
     ("'lenet5'", "resnet", "efficientnet", "convnext", "vit", "swin")),
    ("unknown-freeze", {"model": {"freeze": "all"}}, "model.freeze", ("'all'", "none", "backbone")),
    ("flip-on-digits", {"data": {"augment": ["crop", "flip"]}}, "data.augment", ("'flip'", "digits", "crop")),
    ("missing-weights-file", {"model": {"weights": "weights/nowhere/resnet18.safetensors"}}, "model.weights",
     ("does not exist", "resnet18.safetensors", ".safetensors/.pt", "DEFAULT", "none")),
    ("one-fold", {"data": {"folds": 1}}, "data.folds", ("no cross-validation", "2 or more", "0")),
    ("wilcoxon-without-folds", {"study": {"pruner": "wilcoxon"}}, "study.pruner", ("[data] folds", "median", "none")),
    ("unknown-pruner", {"study": {"pruner": "patient"}}, "study.pruner", ("'patient'", "median", "wilcoxon")),
    ("storage-password", {"study": {"storage": "postgresql+psycopg://hp:s3cret@db/hp"}}, "study.storage",
     ("password", "$HPSEARCH_STORAGE", "$PGPASSWORD", "~/.pgpass")),
    # Strict types: a quoted number or a word for a bool is refused, not read as 3 or true.
    ("quoted-int", {"study": {"n_trials": "3"}}, "study.n_trials", ("integer", "'3'", "without quotes")),
    ("quoted-float", {"data": {"val_fraction": "0.2"}}, "data.val_fraction", ("number", "'0.2'", "without quotes")),
    ("word-for-bool", {"train": {"compile": "yes"}}, "train.compile", ("true or false", "'yes'")),
    ("word-for-bool-tracking", {"tracking": {"tensorboard": "off"}}, "tracking.tensorboard",
     ("true or false", "'off'")),
    ("float-for-int", {"train": {"epochs": 2.0}}, "train.epochs", ("integer",)),
    ("number-for-string", {"model": {"weights": 0}}, "model.weights", ("string",)),
    ("grace-below-interval", {"study": {"heartbeat_interval": 60, "heartbeat_grace": 30}}, "study.heartbeat_grace",
     ("30 s", "heartbeat_interval 60 s", "heartbeat_interval = 0")),
    ("grace-equal-interval", {"study": {"heartbeat_interval": 5, "heartbeat_grace": 5}}, "study.heartbeat_grace",
     ("5 s", "heartbeat_interval 5 s")),
]


@pytest.mark.parametrize(("overrides", "field", "allowed"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refusal_names_field_and_what_is_allowed(
    study_file: Callable[..., Path], overrides: dict[str, dict[str, Any]], field: str, allowed: tuple[str, ...]
) -> None:
    path = study_file(**overrides)
    err = refusal(lambda: read_study_file(path))
    assert_names(err, field, *allowed)
    # The message starts with the file it came from, so a user with several studies knows which.
    assert str(err).startswith(f"{path}: {field}"), str(err)


PASSWORD_URLS = [
    "postgresql+psycopg://hp:s3cret@db.example:5432/hp",
    "postgresql+psycopg://hp:p@ss-s3cret@db/hp",  # an unencoded @ in the password
    "postgresql+psycopg://hp:p%40ss-s3cret@db/hp",
    "postgresql+psycopg://hp:s3cret@db:notaport/hp",  # a URL SQLAlchemy cannot parse
    "postgresql+psycopg://hp@db/hp?password=s3cret",  # libpq's query parameter
    "postgresql+psycopg://hp:@db/hp",  # an empty one is a password too: it belongs elsewhere
    "hp:s3cret@db/hp",  # no scheme
]


@pytest.mark.parametrize("url", PASSWORD_URLS)
def test_a_password_in_the_study_file_is_refused_without_repeating_it(
    study_file: Callable[..., Path], url: str
) -> None:
    err = refusal(lambda: read_study_file(study_file(study={"storage": url})))
    assert_names(err, "study.storage", "password", "$HPSEARCH_STORAGE", "$PGPASSWORD", "~/.pgpass")
    assert "s3cret" not in str(err) and url not in str(err), str(err)


@pytest.mark.parametrize("url", [
    "postgresql+psycopg://hp@db.example:5432/hp",  # the password comes from $PGPASSWORD or ~/.pgpass
    "postgresql+psycopg://db.example/hp",
    "sqlite:///studies/hp.db",
    "sqlite:////abs/with:colon@and-at.db",
    "journal:///shared/hp.log",
    "grpc://10.0.0.5:13000",
])
def test_a_storage_without_a_password_is_accepted(study_file: Callable[..., Path], url: str) -> None:
    assert read_study_file(study_file(study={"storage": url})).study.storage == url


def test_a_recorded_config_holding_a_password_still_validates() -> None:
    from hpsearch.record import StudyRecord

    # A study created before the refusal recorded its file's storage; the record leaves it out when read back.
    recorded = parse_study({"study": {"name": "old"}}).model_dump(mode="json")
    recorded["study"]["storage"] = "postgresql+psycopg://hp:s3cret@db/hp"
    config = StudyRecord.of({"config": recorded}).config
    assert config is not None and "storage" not in config["study"]
    assert StudyConfig.model_validate(config).study.storage is None


def test_the_tiny_study_itself_is_valid(study_file: Callable[..., Path]) -> None:
    # Guards the table above: each refusal comes from its one override, not from a broken base study.
    cfg = read_study_file(study_file())
    assert cfg.study.name == "tiny"
    assert cfg.space.lr == (1e-3, 3e-3)
    assert cfg.space.optimizer == ["adam", "rmsprop"]
    assert cfg.model.weights_kind == "none"


def test_strict_types_keep_what_toml_writes(study_file: Callable[..., Path]) -> None:
    # TOML has no tuples and writes whole numbers as integers: an integer for a float field, lists for the
    # ranges (integers in a float range too) and strings for choices still load, as the numbers they mean.
    cfg = read_study_file(study_file(
        train={"checkpoint_minutes": 5, "label_smoothing": 0, "checkpoint_every": None},
        data={"val_fraction": 0.25},
        study={"pruner_p_threshold": 0.2, "heartbeat_interval": 0, "heartbeat_grace": 1},
        space={"lr": [1, 2], "dropout": [0, 0.5], "scheduler": ["step"], "step": {"gamma": [1, 2]}},
    ))
    assert cfg.train.checkpoint_minutes == 5.0 and isinstance(cfg.train.checkpoint_minutes, float)
    assert cfg.space.lr == (1.0, 2.0) and cfg.space.dropout == (0.0, 0.5) and cfg.space.step.gamma == (1.0, 2.0)
    assert cfg.study.heartbeat_grace == 1  # heartbeats off: any grace
    # A recorded config (JSON: lists, floats) validates again, as `ensemble` and `report` read it.
    assert StudyConfig.model_validate(json.loads(json.dumps(cfg.model_dump(mode="json")))).space == cfg.space


def test_heartbeat_grace_above_the_interval_is_accepted(study_file: Callable[..., Path]) -> None:
    cfg = read_study_file(study_file(study={"heartbeat_interval": 1, "heartbeat_grace": 3}))
    assert (cfg.study.heartbeat_interval, cfg.study.heartbeat_grace) == (1, 3)


def test_flip_is_fine_for_other_datasets(study_file: Callable[..., Path]) -> None:
    cfg = read_study_file(study_file(data={"dataset": "synthetic", "augment": ["crop", "flip"]}))
    assert cfg.data.augment == ["crop", "flip"]


def test_existing_local_weights_file_is_accepted(study_file: Callable[..., Path], tmp_path: Path) -> None:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"not checked until the model is built")
    cfg = read_study_file(study_file(model={"weights": str(weights)}))
    assert cfg.model.weights_kind == "file"


def test_invalid_toml_is_refused_with_its_position(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('[study]\nname = "x"\nn_trials = \n', encoding="utf-8")
    err = refusal(lambda: read_study_file(path))
    assert_names(err, "(file)", "not valid TOML", "line 3")
    assert str(path) in str(err)


def test_non_utf8_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[study]\nname = "café"\n'.encode("latin-1"))
    assert_names(refusal(lambda: read_study_file(path)), "(file)", "UTF-8")


def test_missing_study_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert_names(refusal(lambda: read_study_file(path)), "study file", "does not exist", str(path))


def test_missing_study_name_is_refused() -> None:
    assert_names(refusal(lambda: parse_study({"study": {"n_trials": 3}})), "study.name", "required")


def test_parse_study_from_a_dict_uses_the_defaults() -> None:
    cfg = parse_study({"study": {"name": "bare"}})
    assert cfg.source is None
    assert cfg.data.dataset == "digits" and cfg.model.arch == "resnet18" and cfg.model.weights == "none"
    assert cfg.space.scheduler == ["step", "exponential", "plateau"]


# ------------------------------------------------------------------------ checks that need the model


def _checked(study_file: Callable[..., Path], arch: str, image_size: int, weights: str = "none") -> None:
    cfg = read_study_file(study_file(model={"arch": arch, "weights": weights}, data={"image_size": image_size}))
    check_model_config(cfg.model, cfg.data.image_size)


@pytest.mark.parametrize(
    ("arch", "image_size", "weights", "field", "allowed"),
    [
        # ViT cuts the image into 16x16 patches.
        ("vit_b_16", 30, "none", "data.image_size", ("vit_b_16", "divisible", "patch size 16", "use e.g. 16")),
        # ViT's pretrained position embeddings are for one size only (known offline, from the enum's meta).
        ("vit_b_16", 32, "DEFAULT", "data.image_size", ("exactly 224x224", "image_size = 224")),
        # VGG's five poolings take 16 px down to nothing: the meta-device forward finds it.
        ("vgg11", 16, "none", "data.image_size", ("vgg11 cannot take 16x16", "larger size")),
        ("convnext_tiny", 16, "none", "data.image_size", ("convnext_tiny cannot take 16x16", "larger size")),
        ("densenet121", 8, "none", "data.image_size", ("densenet121 cannot take 8x8", "larger size")),
        ("resnet18", 32, "IMAGENET9", "model.weights", ("'IMAGENET9'", "DEFAULT", "IMAGENET1K_V1", "none")),
    ],
    ids=["vit-patch", "vit-pretrained-size", "vgg-too-small", "convnext-too-small", "densenet-too-small",
         "unknown-weights-name"],
)
def test_model_refusals(
    study_file: Callable[..., Path], arch: str, image_size: int, weights: str, field: str,
    allowed: tuple[str, ...],
) -> None:
    assert_names(refusal(lambda: _checked(study_file, arch, image_size, weights)), field, *allowed)


@pytest.mark.parametrize(
    ("arch", "image_size"),
    [("resnet18", 32), ("resnet18", 8), ("vit_b_16", 32), ("vgg11", 32), ("mobilenet_v3_small", 32),
     ("efficientnet_b0", 32), ("regnet_x_400mf", 32), ("swin_t", 32), ("densenet121", 32)],
)
def test_model_sizes_that_work_pass_the_check(study_file: Callable[..., Path], arch: str, image_size: int) -> None:
    _checked(study_file, arch, image_size)


def test_weights_enum_name_is_checked_without_network() -> None:
    # Naming weights (not loading them) is checked offline; the qualified enum spelling works too.
    check_model_config(ModelSection(arch="resnet18", weights="IMAGENET1K_V1"), 32)
    check_model_config(ModelSection(arch="resnet18", weights="ResNet18_Weights.IMAGENET1K_V1"), 32)
    check_model_config(ModelSection(arch="vit_b_16", weights="DEFAULT"), 224)


# --------------------------------------------------------------------------------- shipped studies


def test_studies_folder_is_not_empty() -> None:
    assert REPO / "studies" / "digits.toml" in STUDY_FILES


@pytest.mark.parametrize("path", STUDY_FILES, ids=[p.name for p in STUDY_FILES])
def test_shipped_study_parses_and_passes_the_model_check(path: Path) -> None:
    cfg = read_study_file(path)
    assert cfg.source == str(path)
    assert cfg.study.name
    # Offline: enum weights are only named here, never fetched.
    check_model_config(cfg.model, cfg.data.image_size)


# ------------------------------------------------------------------------------------- fingerprint


def _config(**space: Any) -> StudyConfig:
    base: dict[str, Any] = {"lr": [1e-4, 1e-2], "optimizer": ["adam"], "scheduler": ["step", "exponential"]}
    return parse_study({"study": {"name": "fp"}, "space": {**base, **space}})


def test_fingerprint_is_stable_and_ignores_non_space_tables() -> None:
    a = _config()
    assert a.space_fingerprint() == _config().space_fingerprint()
    other = parse_study({"study": {"name": "other", "n_trials": 99}, "train": {"epochs": 2},
                         "space": {"lr": [1e-4, 1e-2], "optimizer": ["adam"], "scheduler": ["step", "exponential"]}})
    assert other.space_fingerprint() == a.space_fingerprint()
    assert len(a.space_fingerprint()) == 16


def test_fingerprint_changes_with_lr_range() -> None:
    assert _config(lr=[1e-4, 1e-1]).space_fingerprint() != _config().space_fingerprint()
    assert _config(lr=[1e-5, 1e-2]).space_fingerprint() != _config().space_fingerprint()


def test_fingerprint_changes_with_choices_and_selected_branches() -> None:
    base = _config().space_fingerprint()
    assert _config(optimizer=["adam", "sgd"]).space_fingerprint() != base
    assert _config(scheduler=["step"]).space_fingerprint() != base
    assert _config(step={"gamma": [0.2, 0.5]}).space_fingerprint() != base
    assert _config(exponential={"gamma": [0.5, 0.9]}).space_fingerprint() != base
    assert _config(weight_decay=[1e-6, 1e-3]).space_fingerprint() != base


def test_fingerprint_ignores_unselected_scheduler_branch() -> None:
    # plateau is not among the schedulers: its ranges cannot reach Optuna.
    base = _config().space_fingerprint()
    assert _config(plateau={"factor": [0.2, 0.3], "patience": [1, 4]}).space_fingerprint() == base
    # ...until it is selected.
    with_plateau = _config(scheduler=["step", "exponential", "plateau"])
    changed = _config(scheduler=["step", "exponential", "plateau"], plateau={"factor": [0.2, 0.3]})
    assert with_plateau.space_fingerprint() != changed.space_fingerprint()


# ------------------------------------------------------------------------------------ through the CLI


def _hpsearch(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "HPSEARCH_STORAGE"}
    env["COLUMNS"] = "60"  # a narrow terminal must not wrap the error line
    return subprocess.run([sys.executable, "-m", "hpsearch", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def _assert_one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])


BAD_FILES: list[tuple[str, dict[str, dict[str, Any]], tuple[str, ...]]] = [
    ("unknown-optimizer", {"space": {"optimizer": ["adam", "lion"]}}, ("space.optimizer", "'lion'", "adamw")),
    ("log-low-zero", {"space": {"lr": [0.0, 0.1]}}, ("space.lr", "log scale")),
    ("image-size", {"model": {"arch": "vgg11"}, "data": {"image_size": 16}}, ("data.image_size", "vgg11")),
    ("missing-weights", {"model": {"weights": "no/such/file.pt"}}, ("model.weights", "does not exist")),
    ("wilcoxon-without-folds", {"study": {"pruner": "wilcoxon"}}, ("study.pruner", "needs [data] folds")),
]
BAD_IDS = [b[0] for b in BAD_FILES]


@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize(("overrides", "words"), [b[1:] for b in BAD_FILES], ids=BAD_IDS)
def test_cli_main_refuses_bad_file_with_exit_2_and_one_line(
    study_file: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str,
    overrides: dict[str, dict[str, Any]], words: tuple[str, ...],
) -> None:
    # In-process (fast) over every kind of refusal; the subprocess tests below cover the real process.
    from hpsearch.cli._main import main

    path = study_file(**overrides)
    code = main([command, str(path), "--storage", f"sqlite:///{tmp_path / 'x.db'}"])
    captured = capsys.readouterr()
    _assert_one_line_error(subprocess.CompletedProcess([], code, captured.out, captured.err), *words)
    assert captured.out == ""
    assert not (tmp_path / "x.db").exists()


def test_cli_check_refuses_bad_file_in_a_real_process(study_file: Callable[..., Path], tmp_path: Path) -> None:
    path = study_file(model={"arch": "vgg11"}, data={"image_size": 16})
    proc = _hpsearch("check", str(path), cwd=tmp_path)
    _assert_one_line_error(proc, "data.image_size", "vgg11 cannot take 16x16", "larger size")
    assert proc.stdout == ""


def test_cli_check_refuses_a_storage_password_in_a_real_process(
    study_file: Callable[..., Path], tmp_path: Path
) -> None:
    secret = "p@ss-9f3e-SECRET"
    path = study_file(study={"storage": f"postgresql+psycopg://hp:{secret}@db.example/hp"})
    proc = _hpsearch("check", str(path), cwd=tmp_path)
    _assert_one_line_error(proc, "study.storage", "password", "$HPSEARCH_STORAGE", "$PGPASSWORD", "~/.pgpass")
    assert proc.stdout == ""
    for part in (secret, "9f3e", "SECRET"):
        assert part not in proc.stderr, proc.stderr


def test_cli_check_refuses_invalid_toml_in_a_real_process(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[study\nname = 'x'\n", encoding="utf-8")
    _assert_one_line_error(_hpsearch("check", str(path), cwd=tmp_path), str(path), "(file)", "not valid TOML")


@pytest.mark.parametrize(("overrides", "words"), [b[1:] for b in BAD_FILES[::2]], ids=BAD_IDS[::2])
def test_cli_run_refuses_bad_file_before_any_trial(
    study_file: Callable[..., Path], tmp_path: Path, overrides: dict[str, dict[str, Any]], words: tuple[str, ...]
) -> None:
    path = study_file(**overrides)
    db = tmp_path / "x.db"
    proc = _hpsearch("run", str(path), "--storage", f"sqlite:///{db}", "--artifacts", str(tmp_path / "art"),
                     cwd=tmp_path)
    _assert_one_line_error(proc, *words)
    # Nothing was recorded: no study, hence no trial (opening the storage here creates an empty one).
    assert optuna.get_all_study_summaries(storage=f"sqlite:///{db}") == []
    assert not (tmp_path / "art").exists()
    assert not (tmp_path / "hpsearch.db").exists()


def test_cli_check_accepts_the_digits_study() -> None:
    proc = _hpsearch("check", "studies/digits.toml", "--storage", "sqlite:///unused.db")
    assert proc.returncode == 0, proc.stderr
    assert "studies/digits.toml is valid" in proc.stdout
    assert '"arch": "resnet18"' in proc.stdout
    assert "Traceback" not in proc.stderr
    # check validates only: it must not create the storage it names.
    assert not (REPO / "unused.db").exists()


def test_config_module_imports_no_torch() -> None:
    code = "import sys, hpsearch.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("command", ["check", "run", "worker"])
def test_a_bad_study_file_is_refused_before_torch_is_imported(tmp_path: Path, command: str) -> None:
    """The file is read first: its one-line error comes in about a second, not after torch's import."""
    path = tmp_path / "bad.toml"
    path.write_text("[study]\nname = 'x'\n[data]\ndataset = 'mnist-typo'\n", encoding="utf-8")
    code = ("import sys\nfrom hpsearch.cli import main\n"
            f"code = main([{command!r}, {str(path)!r}])\n"
            "assert code == 2, code\nassert 'torch' not in sys.modules, 'torch imported before the file was read'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "data.dataset" in proc.stderr
