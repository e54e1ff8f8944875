"""Issue 25 item 4: the checked config is the config the code reads. Every shipped config validates into
typed settings (bloodcell.core.settings); every key the YAML writes is a field of the schema; a schema default
is the YAML's value, never a second opinion; and the training path reads the settings, not the raw config
with a `.get(key, default)` of its own."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf
from pydantic import BaseModel

from bloodcell import PROJECT_ROOT
from bloodcell.core.cli import compose
from bloodcell.core.settings import DistillRunSchema, TrainSchema, _model_in, train_settings

CONF = PROJECT_ROOT / "conf"
#: the config groups a training run reads, each checked by the TrainSchema field of its name
GROUPS = ("data", "backbone", "head", "augmentation", "trainer", "finetune", "tracking")

#: schema defaults that deliberately differ from an option file's value, and why
OWN_CHOICE = {
    # each option names its own file (npz: data/training_set.npz); null is "not set", which data=demo is
    "data.path": "every data option that reads a file names its own",
    "augmentation.name": "each pipeline names itself; a pipeline built from a dict by code is 'custom'",
    "augmentation.layers": "a pipeline's layers are what it is; one built from a dict without any has none",
    # heavy's 0.8 and mixup's 0.2 are those presets' choices; the schema's default serves an op or a mixer
    # added to another pipeline (+augmentation.one_of.<op>=..., +augmentation.mixer={kind: mixup})
    "augmentation.one_of_rate": "heavy.yaml applies its one_of to 80% of a batch",
    "augmentation.mixer.alpha": "mixup.yaml's 0.2",
}


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def default_option(group: str) -> str:
    """The option conf/train.yaml's defaults list composes for ``group``."""
    for entry in OmegaConf.load(CONF / "train.yaml").defaults:
        if OmegaConf.is_dict(entry) and group in entry:
            return str(entry[group])
    raise AssertionError(f"conf/train.yaml composes no {group}")


def yaml_of(group: str, option: str) -> dict[str, Any]:
    plain = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"), resolve=False)
    assert isinstance(plain, dict)
    return {str(k): v for k, v in plain.items() if k != "defaults"}


def schema_of(group: str) -> type[BaseModel]:
    model = _model_in(TrainSchema.model_fields[group].annotation)
    assert model is not None
    return model


def fields_with_defaults(
    schema: type[BaseModel], prefix: str
) -> dict[str, tuple[Any, type[BaseModel] | None]]:
    """``<prefix>.<field>`` -> (its default, the nested schema when it is a group), for every field that has
    one, nested groups' fields too (under the key of the group)."""
    out: dict[str, tuple[Any, type[BaseModel] | None]] = {}
    for name, info in schema.model_fields.items():
        nested = _model_in(info.annotation)
        if not info.is_required():
            default = info.get_default(call_default_factory=True)
            out[f"{prefix}.{name}"] = (
                default.model_dump() if isinstance(default, BaseModel) else default,
                nested,
            )
        if nested is not None:
            out |= fields_with_defaults(nested, f"{prefix}.{name}")
    return out


def written(values: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    """(whether the YAML writes ``dotted`` (``group.a.b``, less the group), its value)."""
    node: Any = values
    for part in dotted.split(".")[1:]:
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


@pytest.mark.parametrize(
    "overrides",
    [[f"{group}={option}"] for group in GROUPS for option in options(group)]
    + [[f"+experiment={preset}"] for preset in options("experiment")],
    ids=lambda overrides: overrides[0],
)
def test_every_option_and_preset_composes_into_settings(overrides: list[str]) -> None:
    cfg = compose(overrides)
    weights = cfg.backbone.weights
    if (
        weights not in (None, "imagenet")
        and not (PROJECT_ROOT / weights).exists()
        and not Path(weights).exists()
    ):
        pytest.skip(f"{weights} is not on this machine (../shared/weights)")
    settings = train_settings(cfg)
    assert isinstance(settings, TrainSchema)
    # the settings hold the config's values, not converted ones
    assert settings.seed == cfg.seed and settings.trainer.batch_size == cfg.trainer.batch_size
    assert settings.augmentation.name == cfg.augmentation.name and settings.data.format == cfg.data.format


def test_the_distill_command_composes_into_its_settings() -> None:
    settings = train_settings(
        compose(["+experiment=quickstart", "teacher=some-run"], "distill"), DistillRunSchema
    )
    assert isinstance(settings, DistillRunSchema) and settings.teacher == "some-run"
    assert settings.distill.alpha == OmegaConf.load(CONF / "distill.yaml").distill.alpha


@pytest.mark.parametrize("group", GROUPS)
def test_a_schema_default_is_the_yamls_value(group: str) -> None:
    """A field the group's default option writes has no other default than that value; a field it leaves
    out defaults to null (not set) or to what every option that writes it says: the code reads the
    settings, so a schema default that differed would silently train something the YAML does not say."""
    default = yaml_of(group, default_option(group))
    others = {option: yaml_of(group, option) for option in options(group)}
    wrong = []
    for key, (value, _) in fields_with_defaults(schema_of(group), group).items():
        if key in OWN_CHOICE:
            continue
        is_written, in_yaml = written(default, key)
        if is_written:
            if in_yaml != value:
                wrong.append(f"{key}: schema {value!r}, {group}/{default_option(group)}.yaml {in_yaml!r}")
            continue
        if value is None:
            continue  # not set unless an option sets it
        for option, values in others.items():
            is_written, in_yaml = written(values, key)
            if is_written and in_yaml != value:
                wrong.append(f"{key}: schema {value!r}, {group}/{option}.yaml {in_yaml!r}")
    assert wrong == []


def test_train_yamls_own_keys_and_sections_have_their_schema_default() -> None:
    from bloodcell.data.cleaning.config import resolve_cfg

    train = yaml_of_file(CONF / "train.yaml")
    for key, (value, _) in fields_with_defaults(TrainSchema, "train").items():
        if key.count(".") == 1 and key.split(".")[1] in train:
            assert train[key.split(".")[1]] == value, key
    # cleaning: null means conf/cleaning/default.yaml, which the cleaning module reads itself
    assert resolve_cfg(None) == resolve_cfg(yaml_of("cleaning", "default"))
    distill = yaml_of_file(CONF / "distill.yaml")["distill"]
    for key, (value, _) in fields_with_defaults(DistillRunSchema, "distill").items():
        if key.startswith("distill.distill.") and key.split(".")[-1] in distill:
            assert distill[key.split(".")[-1]] == value, key


def yaml_of_file(path: Path) -> dict[str, Any]:
    plain = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    assert isinstance(plain, dict)
    return {str(k): v for k, v in plain.items()}


def undeclared(values: dict[str, Any], schema: type[BaseModel], prefix: str) -> list[str]:
    """The keys of ``values`` (recursively into nested groups) the schema has no field for."""
    missing = []
    for key, value in values.items():
        info = schema.model_fields.get(str(key))
        if info is None:
            missing.append(f"{prefix}.{key}")
            continue
        nested = _model_in(info.annotation)
        if nested is not None and isinstance(value, dict):
            missing += undeclared(value, nested, f"{prefix}.{key}")
    return missing


@pytest.mark.parametrize("group", GROUPS)
def test_every_key_a_yaml_writes_is_a_schema_field(group: str) -> None:
    """So that what the code reads is typed and checked: extra="allow" would let an undeclared key through
    unchecked, and the code could then only read it raw."""
    missing = [
        key
        for option in options(group)
        for key in undeclared(yaml_of(group, option), schema_of(group), group)
    ]
    assert missing == []


def test_every_key_a_preset_or_train_yaml_writes_is_a_schema_field() -> None:
    missing = []
    for preset in options("experiment"):
        values = {k: v for k, v in yaml_of("experiment", preset).items()}
        missing += undeclared(values, TrainSchema, f"experiment/{preset}")
    train = {k: v for k, v in yaml_of_file(CONF / "train.yaml").items() if k not in ("defaults", "hydra")}
    missing += undeclared(train, TrainSchema, "train")
    distill = {k: v for k, v in yaml_of_file(CONF / "distill.yaml").items() if k not in ("defaults", "hydra")}
    missing += undeclared(distill, DistillRunSchema, "distill")
    assert missing == []


# ---- the training path reads settings, not the raw config ------------------------------------------------

#: the modules a training run goes through (and the library they call with its settings)
TRAINING_PATH = [
    "bloodcell/train.py",
    "bloodcell/distill.py",
    "bloodcell/training",
    "bloodcell/tracking",
    "bloodcell/models",
    "bloodcell/augment",
    "bloodcell/sweep",
    "bloodcell/data/__init__.py",
    "bloodcell/data/mlflow_inputs.py",
    "bloodcell/data/formats.py",
    "bloodcell/data/demo.py",
]
#: every `.get(` left in those modules, by module and receiver: none of them is a config object
NOT_CONFIG = {
    # an epoch's metrics and Keras' logs (the objective may be missing from them)
    ("training/callbacks.py", "logs or {}"),
    ("training/callbacks.py", "record"),
    ("training/callbacks.py", "averages"),
    ("training/phase1_cache.py", "h"),
    # each epoch's validation probabilities, by epoch (callbacks.Validation)
    ("training/phases.py", "self.validation.probabilities"),
    # a checkpoint's or a phase-1 entry's saved arrays and state
    ("training/phase1_cache.py", "entry.saved.arrays"),
    ("training/phases.py", "resumed.arrays"),
    ("training/phases.py", "saved.arrays"),
    ("training/phases.py", "state"),
    # MLflow: a run's tags and params, an experiment's tags
    ("training/distillation.py", "run.tags"),
    ("training/distillation.py", "candidate.tags"),
    ("training/run_data.py", "run.data.tags"),
    ("training/resume.py", "tags"),
    ("training/resume.py", "run.data.tags"),
    ("training/resume.py", "run.data.metrics"),
    ("tracking/members.py", "found[0].data.tags"),
    ("tracking/members.py", "run.data.tags"),
    ("tracking/run.py", "run.data.tags"),
    ("tracking/store.py", "experiment.tags"),
    ("tracking/store.py", "tags"),
    ("tracking/store.py", "run.data.tags"),
    # a record waiting in the outbox for the tracking server (JSON)
    ("tracking/outbox.py", "record"),
    # the stopwatch's seconds
    ("training/record.py", "self.seconds"),
    ("training/record.py", "seconds"),
    # Hydra's own state (HydraConfig.get() is the accessor, not a mapping)
    ("training/recipe.py", "HydraConfig"),
    # Python's keyword arguments of a Keras layer
    ("augment/layers.py", "kwargs"),
    # Optuna: the pruner the sweeper stored on the trial (its own JSON)
    ("sweep/trial.py", "frozen.system_attrs"),
    ("sweep/tables.py", "spec"),
}


def get_calls() -> set[tuple[str, str]]:
    """(module under bloodcell/, receiver source) of every ``<receiver>.get(...)`` in the training path."""
    files: list[Path] = []
    for entry in TRAINING_PATH:
        path = PROJECT_ROOT / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    calls = set()
    for file in files:
        tree = ast.parse(file.read_text(), str(file))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "get"
            ):
                receiver = ast.unparse(node.func.value)
                calls.add((file.relative_to(PROJECT_ROOT / "bloodcell").as_posix(), receiver))
    return calls


def test_the_training_path_reads_no_config_with_get() -> None:
    """A `.get(key, default)` on a config is a default of its own, beside the YAML's and the schema's (the
    three that issue 25 found differing): the training path reads typed settings instead. A `.get` on
    anything else (MLflow tags, saved state, Keras logs) is listed in NOT_CONFIG, with what it reads."""
    unexpected = sorted(get_calls() - NOT_CONFIG)
    assert unexpected == [], (
        "read the typed settings (bloodcell.core.settings) instead of .get() on a config; "
        "if the receiver is not a config, add it to NOT_CONFIG with what it is"
    )


def test_the_list_of_other_gets_is_not_stale() -> None:
    assert sorted(NOT_CONFIG - get_calls()) == []
