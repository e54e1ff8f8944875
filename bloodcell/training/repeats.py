"""Repeated and cross-validated runs: one sampled point trained several times, scored by the mean.

- ``hydra.sweeper.repeats=N`` (the sweeper passes ``trial.repeats``): repeat i trains with seed
  ``seed + i`` on the split of ``data.split_seed`` (null: the trial's ``seed``), so the repeats differ in
  initialisation, data order and augmentation, not in which images validate.
- ``data.cv.folds=K``: fold k trains on the other K-1 folds of a stratified K-fold cut of the train +
  validation pool and validates on fold k (`bloodcell.data.cv_fold`); the test split stays held out.
  Works in a sweep and in a single ``python -m bloodcell.train`` alike.

The loop runs inside the trial's own Hydra job, members one after another through `bloodcell.train.train`,
so any launcher (basic, joblib, submitit/SLURM) runs it unchanged. Each member is an MLflow run nested
under the group run (the trial's run in a sweep, itself under the sweep's parent run); the group run gets
the mean, the spread and every member's value (`bloodcell.tracking.members`), the Optuna trial the same as
user attributes.

Pruning: the trial reports each member's objective to Optuna at step = its index (repeat or fold) and asks
the pruner after each, which is what ``hydra.sweeper.pruner.name=wilcoxon`` (Optuna's WilcoxonPruner) pairs
across trials. Members do not report epochs: one step axis holds either epochs or members, never both.

Resume: a resumed trial reuses its FINISHED members' values (found by tags under its group run) and
continues an unfinished member from its checkpoint (``trainer.resume=<its run id>``).
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING

from omegaconf import DictConfig, open_dict

from bloodcell import tracking
from bloodcell.core.errors import UserError, is_prune
from bloodcell.core.settings import TrainSchema
from bloodcell.tracking import members
from bloodcell.training import checkpoints
from bloodcell.training.resume import config_digest

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

log = logging.getLogger("bloodcell.train")


def plan(settings: TrainSchema | DictConfig) -> tuple[str, int]:
    """("repeat", N), ("fold", K), or ("", 1) for one ordinary run (also one fold given by data.cv.fold):
    what ``trial.repeats`` and ``data.cv`` ask for (of the run's settings, or a config: `TrainSchema.of`)."""
    settings = TrainSchema.of(settings)
    repeats = settings.trial.repeats if settings.trial is not None else 1
    cv = settings.data.cv
    folds = (cv.folds if cv is not None else None) or 1  # null (or 1): no cross-validation
    if repeats > 1 and folds > 1:
        raise UserError(
            f"hydra.sweeper.repeats={repeats} with data.cv.folds={folds}: choose one (the folds already "
            "train the point several times, on different validation images)"
        )
    if folds > 1 and cv is not None and cv.fold is None:
        return "fold", folds
    if repeats > 1:
        return "repeat", repeats
    return "", 1


def member_config(
    cfg: DictConfig, kind: str, index: int, group_run_id: str, resume: str | None
) -> DictConfig:
    """The config of member ``index``: no ``trial`` (the group reports to Optuna, a member does not), nested
    under the group run, tagged with its kind and index, its seed or fold, and the run to continue."""
    settings = TrainSchema.of(cfg)
    member = copy.deepcopy(cfg)
    with open_dict(member):
        if "trial" in member:
            del member["trial"]
        member.tracking.parent_run_id = group_run_id
        member.tracking.tags = members.member_tags(kind, index, plan(settings)[1])
        name = settings.tracking.run_name
        member.tracking.run_name = f"{name}-{kind}-{index}" if name else f"{kind}-{index}"
        if kind == "repeat":
            split_seed = settings.data.split_seed
            member.data.split_seed = settings.seed if split_seed is None else split_seed
            member.seed = settings.seed + index
        else:
            member.data.cv.fold = index
        if resume is not None:  # else the config's own (null in a sweep)
            member.trainer.resume = resume
    return member


def train_members(cfg: DictConfig) -> float:
    """`bloodcell.train.train`, or, for repeats / folds, each member in turn; returns the objective (the
    members' mean)."""
    from bloodcell.training.recipe import check_config, train

    settings: TrainSchema = check_config(cfg)
    kind, count = plan(settings)
    if not kind:
        return train(cfg, settings=settings)
    uri = tracking.resolve_tracking_uri(settings.tracking)
    tracking.check_reachable(uri, wait=tracking.server_wait(settings.tracking))
    experiment_id = tracking.setup_experiment(settings.tracking)
    tracking.mark_dead_runs(experiment_id)
    tags = {"config_digest": config_digest(cfg), f"{members.KIND_TAG}_count": str(count)}
    if settings.trial is not None:
        tags |= {
            "trial_number": str(settings.trial.number),
            "optuna_trial_id": str(settings.trial.trial_id),
            "optuna_study": str(settings.trial.study_name),
        }
    group = "repeats" if kind == "repeat" else "cv"
    group_run_id = members.open_group_run(cfg, settings.tracking, settings.trial, experiment_id, group, tags)
    trial, frozen = _optuna_trial(settings)
    objective = settings.objective
    try:
        values = _run_members(cfg, settings, kind, count, group_run_id, experiment_id, trial, frozen)
        summary = members.log_member_summary(group_run_id, objective, values, kind)
        if trial is not None:
            for key, value in summary.items():
                trial.set_user_attr(f"{kind}_{objective}_{key}", value)
    except BaseException as err:
        _end_failed(settings.trial is not None, group_run_id, err)
        raise
    members.end_group_run(group_run_id, "FINISHED", {"optuna.trial_state": "COMPLETE"} if trial else None)
    log.info(
        "%s over %d %ss: mean %.4f, std %.4f, min %.4f, max %.4f (run %s)",
        objective,
        count,
        kind,
        summary["mean"],
        summary["std"],
        summary["min"],
        summary["max"],
        group_run_id,
    )
    return float(summary["mean"])


def _optuna_trial(settings: TrainSchema) -> tuple[optuna.trial.Trial | None, FrozenTrial | None]:
    if settings.trial is None:
        return None, None
    from bloodcell.sweep.trial import open_trial

    return open_trial(settings.trial)


def _run_members(
    cfg: DictConfig,
    settings: TrainSchema,
    kind: str,
    count: int,
    group_run_id: str,
    experiment_id: str,
    trial: optuna.trial.Trial | None,
    frozen: FrozenTrial | None,
) -> dict[int, float]:
    import optuna

    from bloodcell.training.recipe import train

    objective = settings.objective
    done = members.finished_members(experiment_id, group_run_id, f"best_{objective}")
    reported = set(frozen.intermediate_values) if frozen is not None else set()
    root = checkpoints.root_for(
        tracking.resolve_tracking_uri(settings.tracking), settings.trainer.checkpoint.dir
    )
    values: dict[int, float] = {}
    for index in range(count):
        if index in done:
            values[index] = done[index]
            log.info(
                "%s %d/%d: FINISHED before, %s %.4f reused", kind, index + 1, count, objective, done[index]
            )
        else:
            resume = next(
                (run for run in members.unfinished_members(experiment_id, group_run_id, index)
                 if checkpoints.latest(root / run) is not None),
                None,
            )  # fmt: skip
            log.info("%s %d/%d%s", kind, index + 1, count, f": resuming run {resume}" if resume else "")
            values[index] = train(member_config(cfg, kind, index, group_run_id, resume))
        if trial is None:
            continue
        if index not in reported:
            trial.report(values[index], index)
        if trial.should_prune():
            raise optuna.TrialPruned(
                f"pruned after {kind} {index} ({objective}={values[index]:.4f}; "
                f"so far {', '.join(f'{v:.4f}' for v in values.values())})"
            )
    return values


def _end_failed(in_sweep: bool, group_run_id: str, err: BaseException) -> None:
    from bloodcell.core.redaction import mask_text

    if is_prune(err):
        tags = {"optuna.trial_state": "PRUNED", "pruned": "true", "pruned_reason": str(err)[:5000]}
        status = "KILLED"
    elif isinstance(err, (KeyboardInterrupt, SystemExit)):
        tags, status = {"error": f"interrupted ({type(err).__name__})"}, "KILLED"
    else:
        tags, status = {"error": mask_text(f"{type(err).__name__}: {err}")[:5000]}, "FAILED"
        if in_sweep:
            tags["optuna.trial_state"] = "FAIL"
    try:
        members.end_group_run(group_run_id, status, tags)
    except Exception as record_err:  # the error that ended the trial is the one to report
        log.warning("could not end the group run %s: %s", group_run_id, record_err)
