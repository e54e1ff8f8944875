"""The domain of every config value a training run reads: one pydantic model per config group (conf/<group>/),
each field with its type, its bounds and the fix its error suggests. `train_settings` checks a composed
config in one pass, before anything starts (no MLflow run, no TensorFlow), and returns it as typed settings
(a `TrainSchema`: ``.data``, ``.backbone``, ``.head``, ... ``.seed``, ``.objective``), which is what the code
then reads: each step of a run is handed its own group. Otherwise it raises a UserError whose one line names
the key, the value, what it must be and an example.

Every key the code reads is a field here. Its default, where it has one, is the YAML's (conf/<group>/, the
group's default option; tests/unit/core/test_settings_defaults.py holds them equal); the code never supplies
one of its own. Values are checked strictly (no "32" for 32): a value that only converts would be a value
the YAML did not say. Keys not listed here pass (``extra="allow"``); Hydra already refuses keys that do not
exist (struct mode).

Library calls and tests may hand a group as a mapping (a DictConfig, a dict) instead: `Group.of` takes it as
written, with this schema's defaults for the keys it leaves out (unchecked: code, not a user, wrote it).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bloodcell import NUM_CLASSES
from bloodcell.core.errors import UserError

log = logging.getLogger("bloodcell.config")

G = TypeVar("G", bound="Group")


def fix(text: str, **bounds: Any) -> Any:
    """A field's bounds (pydantic's ``ge``, ``gt``, ``le``, ``lt``, ``default``) and the fix its error
    message ends with."""
    return Field(json_schema_extra={"fix": text}, **bounds)


class Group(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    @classmethod
    def of(cls, value: Any) -> Self:
        """``value`` as these settings: settings pass as they are; a mapping (a DictConfig, a dict; None is
        an empty one) is taken as written, nested groups too, with this schema's defaults for the keys it
        leaves out. Unchecked: for what code wrote (a library call, a test, a config a finished run logged);
        a user's config goes through `train_settings`."""
        if isinstance(value, cls):
            return value
        return _construct(cls, plain_mapping(value))


def plain_mapping(value: Any) -> dict[str, Any]:
    """A DictConfig, a mapping or None as a plain dict (interpolations resolved)."""
    if value is None:
        return {}
    from omegaconf import DictConfig, OmegaConf

    if isinstance(value, DictConfig):
        plain = OmegaConf.to_container(value, resolve=True)
        assert isinstance(plain, dict)
        return {str(k): v for k, v in plain.items()}
    if isinstance(value, BaseModel):
        return value.model_dump()
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"settings must be a mapping, got {type(value).__name__}")


def _construct(schema: type[G], plain: Mapping[str, Any]) -> G:
    """``schema`` over ``plain`` without validation: nested groups built the same way, defaults filled in."""
    values: dict[str, Any] = {}
    for name, value in plain.items():
        field = schema.model_fields.get(str(name))
        nested = _model_in(field.annotation) if field is not None else None
        if nested is not None and isinstance(value, Mapping):
            value = _construct(nested, value)
        values[str(name)] = value
    return schema.model_construct(**values)


Fraction = Annotated[float, Field(gt=0, lt=1)]
Auto = Literal["auto", True, False]


class CrossValidationSchema(Group):
    folds: int | None = fix(
        "a number of folds >= 2, e.g. data.cv.folds=3, or null for none", default=None, ge=1
    )
    fold: int | None = fix("a fold index from 0 to data.cv.folds - 1, or null for all", default=None, ge=0)

    @model_validator(mode="after")
    def _fold_of_folds(self) -> CrossValidationSchema:
        if self.fold is not None and (self.folds is None or self.folds < 2 or self.fold >= self.folds):
            raise ValueError(
                f"data.cv.fold={self.fold} needs data.cv.folds above it (now {self.folds}), "
                "e.g. data.cv.folds=3 data.cv.fold=0"
            )
        return self


class DataSchema(Group):
    format: Literal["npz", "folder", "medmnist", "demo"] = fix("use one of npz, folder, medmnist, demo")
    path: str | None = None
    val_fraction: Fraction = fix("a share of the images strictly between 0 and 1, e.g. 0.15")
    test_fraction: Fraction = fix("a share of the images strictly between 0 and 1, e.g. 0.15")
    limit: int | None = fix("a number of images, e.g. data.limit=2000, or null for all", default=None, ge=1)
    clean: bool = False
    strict: bool = fix("true refuses a folder with unreadable images, false skips them", default=False)
    per_class: int | None = fix("images per class of the demo set, e.g. 100", default=None, ge=1)
    image_size: int | None = fix("the demo images' side in pixels, e.g. 64", default=None, ge=16)
    size: Literal[28, 64, 128, 224] | None = fix("a BloodMNIST size: 28, 64, 128 or 224", default=None)
    split_seed: int | None = fix("a whole number >= 0, or null for the run's seed", default=42, ge=0)
    cv: CrossValidationSchema | None = Field(default_factory=lambda: CrossValidationSchema())
    demo_seed: int = fix("the seed the demo images are drawn with, e.g. 0", default=0, ge=0)
    cache_dir: str = fix("the folder BloodMNIST is downloaded into, e.g. data", default="data", min_length=1)

    @model_validator(mode="after")
    def _enough_for_a_split(self) -> DataSchema:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"data.val_fraction={self.val_fraction} and data.test_fraction={self.test_fraction} leave "
                "nothing to train on; keep their sum below 1, e.g. 0.15 each"
            )
        needed = min_images(NUM_CLASSES, self.val_fraction, self.test_fraction)
        split = f"a stratified train / validation / test split of {NUM_CLASSES} classes needs {needed} images"
        if self.limit is not None and self.limit < needed:
            raise ValueError(f"data.limit={self.limit} is too few: {split}; raise it or set data.limit=null")
        if self.format == "demo" and self.per_class is not None and self.per_class * NUM_CLASSES < needed:
            raise ValueError(
                f"data.per_class={self.per_class} is too few: {split}; "
                f"use data.per_class={-(-needed // NUM_CLASSES)} or more"
            )
        if self.format in ("npz", "folder") and not self.path:
            raise ValueError(f"data.path is not set; data={self.format} needs the path of its data")
        return self


class BackboneSchema(Group):
    name: str
    weights: str | None
    input_size: int | None = fix("the side images are resized to, e.g. 128, or null", default=None, ge=32)
    kwargs: dict[str, Any] = Field(default_factory=dict)

    # whether the name is a known backbone and the weights file exists is the backbone module's to say:
    # models.backbones.check_backbone, right after this pass (bloodcell.training.recipe.check_config)


class HeadSchema(Group):
    units: list[Annotated[int, Field(ge=1)]] = fix("widths of the dense layers, e.g. '[256,128]'")
    dropout: list[Annotated[float, Field(ge=0, lt=1)]] = fix("one rate in [0, 1) per layer, e.g. '[0.2,0.1]'")
    batchnorm: bool
    batchnorm_momentum: float = fix("in [0, 1), e.g. 0.99", default=0.99, ge=0, lt=1)
    leaky_relu_slope: float = fix("e.g. 0.05 (0 = ReLU)", ge=0)
    precise_bn_images: int | None = fix("a number of images, e.g. 2048, or 0 for off", ge=0)


class MixerSchema(Group):
    kind: Literal["mixup", "cutmix"] = fix("use mixup or cutmix")
    alpha: float = fix("MixUp's Beta parameter, e.g. 0.2", default=0.4, gt=0)
    factor: float = fix("CutMix's patch factor in (0, 1], e.g. 1.0", default=1.0, gt=0, le=1)


class AugmentationSchema(Group):
    strength: float = fix(
        "0 is no augmentation, 1 the magnitudes as written, e.g. 0.5", default=1.0, ge=0, le=1
    )
    where: Literal["pipeline", "model"] = fix("use pipeline (tf.data) or model", default="pipeline")
    fuse_geometry: bool = True
    one_of_rate: float = fix("a share of the images in [0, 1], e.g. 0.5", default=1.0, ge=0, le=1)
    mixer: MixerSchema | None = None
    #: the pipeline's layer name (``augment_<name>``); each option file names itself
    name: str = "custom"
    #: op name (or a key with ``type: <op>``) -> the op's parameters at strength 1; null drops one
    layers: dict[str, Any] = Field(default_factory=dict)
    #: one of these ops per batch, on ``one_of_rate`` of its images; null or empty: none
    one_of: dict[str, Any] | None = None


class CheckpointSchema(Group):
    every: int = fix("epochs between checkpoints, e.g. 1, or 0 for none", ge=0)
    keep: int = fix("how many checkpoints to keep, e.g. 1", ge=1)
    keep_after_finish: bool = False
    dir: str | None = None


class AbstentionSchema(Group):
    targets: list[Fraction] = fix(
        "accuracies among kept cells in (0, 1), e.g. [0.95, 0.99]", default_factory=lambda: [0.95, 0.99]
    )
    confidence: Fraction = fix("a probability in (0, 1), e.g. 0.9", default=0.9)
    batch_cells: int | None = fix(
        "the smallest batch of kept cells the promise covers, e.g. 1000, or null for the long run",
        default=1000,
        ge=1,
    )


class TrainerSchema(Group):
    epochs: int = fix("phase 1's epochs, e.g. trainer.epochs=30", ge=1)
    batch_size: int = fix("images per step, e.g. trainer.batch_size=32", ge=1)
    lr: float = fix("phase 1's learning rate, e.g. trainer.lr=1e-3", gt=0)
    lr_decay_steps: int = fix("steps per decay, e.g. 1000", ge=1)
    lr_decay_rate: float = fix("in (0, 1], e.g. 0.95 (1 = constant)", gt=0, le=1)
    freeze_backbone: Auto = fix("use auto, true or false")
    early_stopping_patience: int = fix("epochs without improvement, e.g. 15", ge=0)
    time_limit_minutes: float | None = fix("minutes, e.g. 45, or null for none", default=None, gt=0)
    class_weight: Literal["balanced", None] = fix("use balanced or null")
    label_smoothing: float = fix("in [0, 1), e.g. 0.1", default=0.0, ge=0, lt=1)
    ema: bool = False
    ema_momentum: float = fix("in (0, 1), e.g. 0.99 (about the last 100 steps)", default=0.99, gt=0, lt=1)
    test_tta: bool = False
    calibrate: bool = True
    abstention: AbstentionSchema = Field(default_factory=AbstentionSchema)
    mixed_precision: Literal[False, True, "mixed_float16", "mixed_bfloat16", None] = fix(
        "use false, true (mixed_float16) or mixed_bfloat16", default=False
    )
    distribute: Literal[None, "mirrored"] = fix("use null or mirrored", default=None)
    verbose: Literal["auto", 0, 1, 2] = fix("use auto, 0, 1 or 2", default="auto")
    run_eagerly: bool = fix("use true or false", default=False)
    checkpoint: CheckpointSchema
    resume: str | None = None
    reuse_phase1: bool = fix("use true or false", default=True)


class FinetuneSchema(Group):
    epochs: int = fix("phase 2's epochs, e.g. 20, or 0 to skip it", ge=0)
    lr: float = fix("phase 2's learning rate, e.g. finetune.lr=1e-5", gt=0)
    lr_decay_steps: int = fix("steps per decay, e.g. 1000", ge=1)
    lr_decay_rate: float = fix("in (0, 1], e.g. 0.95 (1 = constant)", gt=0, le=1)
    unfreeze_blocks: int = fix("blocks from the top, e.g. 6, 0 = none, -1 = all", ge=-1)
    unfreeze_layers: int | None = fix("layers from the top, e.g. 20, or null", default=None, ge=0)
    freeze_batchnorm: Auto = fix("use auto, true or false")
    early_stopping_patience: int = fix("epochs without improvement, e.g. 10", ge=0)
    swa: bool = False
    swa_epochs: int = fix("phase 2's last epochs to average, e.g. 5", default=5, ge=2)
    augmentation_strength: float | None = fix(
        "phase 2's strength in [0, 1], e.g. 0.5, or null for augmentation.strength", default=None, ge=0, le=1
    )


class TrackingSchema(Group):
    uri: str | None = None
    experiment: str = fix("an experiment name, e.g. bloodcell", min_length=1)
    outage_wait_seconds: float = fix("seconds, e.g. 120", default=120, ge=0)
    run_name: str | None = None
    #: set by the sweeper (the sweep's run) or by training.repeats (the group run)
    parent_run_id: str | None = None
    log_model: bool = True
    #: Grad-CAM and error sheets: auto = every run but a sweep trial that is not the study's best so far
    explain: Auto = "auto"
    system_metrics_seconds: float | None = fix("seconds, e.g. 10, or null or 0 for off", default=10, ge=0)
    #: tags every run gets; set by training.repeats on its members (not in conf/)
    tags: dict[str, str] | None = None


class TrialSchema(Group):
    """``trial``: the Optuna trial a sweep's job trains, set by the sweeper (``++trial.*``); not in conf/."""

    storage: str
    study_name: str
    trial_id: int
    number: int
    #: hydra.sweeper.repeats: how many times the trial's point trains (bloodcell.training.repeats)
    repeats: int = fix("repeats of one point, e.g. 3", default=1, ge=1)


class TrainSchema(Group):
    """conf/train.yaml: the groups, and the keys of its own."""

    seed: int = fix("a whole number >= 0, e.g. seed=42", ge=0)
    objective: Literal["val_accuracy", "val_loss", "train_accuracy", "train_loss"] = fix(
        "use a per-epoch metric: val_accuracy, val_loss, train_accuracy or train_loss"
    )
    data: DataSchema
    backbone: BackboneSchema
    head: HeadSchema
    augmentation: AugmentationSchema
    trainer: TrainerSchema
    finetune: FinetuneSchema
    tracking: TrackingSchema
    model_name: str = fix("a registered model name, e.g. model_name=bloodcell", min_length=1)
    #: conf/cleaning/ (data.clean=true), checked by bloodcell.data.cleaning.config, whose defaults are
    #: conf/cleaning/default.yaml; null: those defaults
    cleaning: dict[str, Any] | None = None
    trial: TrialSchema | None = None

    @model_validator(mode="after")
    def _one_weight_average(self) -> TrainSchema:
        if self.trainer.ema and self.finetune.swa:
            raise ValueError(
                "trainer.ema=true and finetune.swa=true average the weights twice; choose one, "
                "e.g. finetune.swa=false"
            )
        averaging = "trainer.ema" if self.trainer.ema else "finetune.swa" if self.finetune.swa else None
        if averaging and self.head.batchnorm and not self.head.precise_bn_images:
            raise ValueError(
                f"{averaging}=true needs the head's BatchNorm statistics recomputed for the averaged "
                "weights: set head.precise_bn_images, e.g. 2048"
            )
        return self


class DistillSchema(Group):
    """conf/distill.yaml's ``distill`` section (bloodcell.distill)."""

    alpha: float = fix(
        "a weight from 0 to 1 of the true labels against the teacher's, e.g. distill.alpha=0.5", ge=0, le=1
    )
    temperature: float = fix("a temperature > 0 (1 = the teacher as it is), e.g. distill.temperature=2", gt=0)
    allow_different: bool = fix("true or false", default=False)
    batch_size: int = fix("images per teacher batch, e.g. distill.batch_size=64", ge=1)


class DistillRunSchema(TrainSchema):
    """conf/distill.yaml: a training run's config, the teacher and the ``distill`` section."""

    teacher: str = fix(
        "say which model teaches: teacher=<run id> | models:/<name>@<alias> | models:/<name>/<version>",
        min_length=1,
    )
    distill: DistillSchema


T = TypeVar("T", bound=TrainSchema)


def train_settings(cfg: Any, schema: type[T] = TrainSchema) -> T:  # type: ignore[assignment]
    """A composed train config (or another command's config that extends it, ``schema``) as typed settings,
    every value within its domain, or a UserError (one line) for the first that is not, before anything is
    loaded or started. Also warns about passwords written into the config in plain text (Hydra saves the
    config)."""
    settings = validated(cfg, schema)
    warn_plain_secrets(cfg)
    return settings


def validated(cfg: Any, schema: type[G]) -> G:
    """A composed config (a DictConfig, or a plain dict of the same keys) as ``schema``'s settings, or a
    UserError whose one line names the first bad value, its key and a fix."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        plain = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:  # e.g. ${oc.env:VARIABLE} of a variable that is not set
        where = f" ({err.full_key})" if getattr(err, "full_key", None) else ""
        raise UserError(f"the config does not resolve{where}: {str(err).splitlines()[0]}") from None
    try:
        return schema.model_validate(plain)
    except ValidationError as err:
        raise UserError(_one_line(err, schema)) from None


def min_images(n_classes: int, val_fraction: float, test_fraction: float) -> int:
    """The fewest images a stratified train / validation / test split of ``n_classes`` classes takes:
    scikit-learn wants each part to hold at least one image per class, with the test part
    ceil(n * test_fraction) and validation ceil(rest * val_fraction / (1 - test_fraction)) of the rest.
    (Here, not in bloodcell.data: the schema checks ``data.limit`` against it before any data loads.)"""
    val_share = val_fraction / (1 - test_fraction)
    for n in range(n_classes * 3, 10**7):  # three parts, each at least one image per class
        test = math.ceil(n * test_fraction)
        val = math.ceil((n - test) * val_share)
        if min(test, val, n - test - val) >= n_classes:
            return n
    raise ValueError(f"no split fits val_fraction={val_fraction}, test_fraction={test_fraction}")


# pydantic's "Input should be greater than or equal to 1" as "must be >= 1"
_SYMBOLS = {
    "Input should be": "must be",
    "greater than or equal to": ">=",
    "less than or equal to": "<=",
    "greater than": ">",
    "less than": "<",
}
_COMPARISONS = re.compile("|".join(_SYMBOLS))  # longest first: the dict's order


def _one_line(err: ValidationError, schema: type[BaseModel]) -> str:
    """The first error as ``key=value <what it must be>; <fix>``, plus how many others there are."""
    errors = err.errors(include_url=False)
    first = errors[0]
    loc = [str(part) for part in first["loc"]]
    key = ".".join(loc)
    if first["type"] == "value_error":  # our own validators write whole sentences
        text = str(first["ctx"]["error"])
        if not text.startswith(key.split(".")[0]):
            text = f"{key}: {text}"
    elif first["type"] == "missing":
        text = f"{key} is missing"
    else:
        shown = first["input"]
        text = f"{key}={shown!r} " + _COMPARISONS.sub(lambda m: _SYMBOLS[m.group(0)], first["msg"])
        if first["type"] == "literal_error":
            text = f"{key}={shown!r} is unknown"
    hint = _fix_of(schema, loc)
    if hint:
        text += f"; {hint}"
    if len(errors) > 1:
        text += (
            f" (and {len(errors) - 1} more: {', '.join('.'.join(map(str, e['loc'])) for e in errors[1:4])})"
        )
    return text


def _fix_of(schema: type[BaseModel], loc: list[str]) -> str | None:
    """The ``fix`` text of the field at ``loc`` (group, key, ...), following nested models."""
    model: Any = schema
    hint = None
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            break
        info = fields[part]
        extra = info.json_schema_extra
        hint = extra.get("fix") if isinstance(extra, dict) else None
        model = _model_in(info.annotation)
    return hint


def _model_in(annotation: Any) -> Any:
    """The pydantic model inside ``X``, ``X | None``; None otherwise."""
    import typing

    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


#: the keys already warned about in this process: the members of a repeated or cross-validated run check
#: the config again, and each would repeat the warning
_WARNED_PLAIN_SECRETS: set[str] = set()


def warn_plain_secrets(cfg: Any) -> None:
    """One warning per process for each config value written with a password in it rather than as
    ``${oc.env:...}``. What bloodcell and Hydra save is masked (`bloodcell.core.hydra_callbacks`), but the
    command line itself stays in the shell's history and the process list. ``cfg``: a config or a plain
    mapping of them (the sweeper passes its storage URL under the name ``hydra.sweeper.storage``)."""
    from omegaconf import DictConfig, OmegaConf

    from bloodcell.core.redaction import has_secret, mask_text

    def walk(value: Any, name: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{name}.{key}" if name else str(key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, f"{name}[{index}]")
        elif isinstance(value, str) and has_secret(value) and name not in _WARNED_PLAIN_SECRETS:
            _WARNED_PLAIN_SECRETS.add(name)  # an unresolved ${oc.env:...} holds none
            log.warning(
                "%s holds a password in plain text (%s); it is masked in what is saved and printed, but the "
                "command line keeps it (shell history, process list): pass it as '%s=${oc.env:VARIABLE}' "
                "with the value in that environment variable",
                name, mask_text(value), name,
            )  # fmt: skip

    walk(OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg, "")
