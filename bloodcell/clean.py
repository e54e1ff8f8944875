"""``python -m bloodcell.clean input=<npz or folder> output=<npz>``: read, find what is unwanted, write the
cleaned copy and the report. The input is never modified."""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from bloodcell import PROJECT_ROOT
from bloodcell.core.cli import exit_now, run_or_exit
from bloodcell.core.errors import UserError
from bloodcell.core.outputs import atomic_path
from bloodcell.data.cleaning.config import resolve_cfg
from bloodcell.data.cleaning.report import summary, write_report
from bloodcell.data.cleaning.unwanted import EMBEDDING_OFF, find_unwanted


def clean_file(cfg: DictConfig) -> dict[str, Path]:
    """What ``python -m bloodcell.clean`` does: read, find, write the cleaned npz and the report."""
    from bloodcell.data import read_folder, read_npz, resolve_path

    if OmegaConf.is_missing(cfg, "input") or not cfg.input:
        raise UserError(
            "no input given; run python -m bloodcell.clean input=<file.npz or folder> output=<file.npz>"
        )
    if OmegaConf.is_missing(cfg, "output") or not cfg.output:
        raise UserError("no output given; add output=<file.npz> (the input is never modified)")
    src = resolve_path(cfg.input)
    out = Path(str(cfg.output)).expanduser()
    if out.suffix != ".npz":
        raise UserError(f"output={out} must end in .npz (the competition layout)")
    if not src.exists():
        raise UserError(
            f"input {cfg.input} not found; give an .npz file or a folder with one sub-folder per class"
        )
    if out.resolve() == src.resolve():
        raise UserError(f"output {out} is the input; choose another file (the input is never modified)")
    if out.exists() and not cfg.overwrite:
        raise UserError(f"output {out} already exists; choose another name or add overwrite=true")
    resolve_cfg(cfg.cleaning)  # a bad setting is reported before the data is read
    # unreadable images of a folder are skipped with a warning that names them (read_folder)
    images, labels = read_folder(src)[:2] if src.is_dir() else read_npz(src)
    print(f"cleaning {src}: {len(labels)} images", flush=True)
    result = find_unwanted(images, labels, cfg.cleaning)
    report_dir = Path(str(cfg.report_dir)) if cfg.report_dir else out.with_name(out.stem + "_cleaning")
    paths = write_report(result, images, labels, report_dir, source=str(src))
    with atomic_path(out) as partial:  # a failure part-way leaves no truncated file, and no temporary one
        np.savez(
            partial, images=images[result.keep], labels=labels[result.keep].astype(np.uint8).reshape(-1, 1)
        )
    for note in result.notes:
        if not note.startswith(EMBEDDING_OFF):  # that one was logged already, when it happened
            print(f"note: {note}")
    print(summary(result))
    print(
        f"wrote {out} ({int(result.keep.sum())} images), report {paths['json']}, contact sheet {paths['png']}"
    )
    return {"output": out, **paths}


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="clean")
def main(cfg: DictConfig) -> None:
    run_or_exit(clean_file, cfg)


if __name__ == "__main__":
    main()
    exit_now()  # done: skip the interpreter's teardown
