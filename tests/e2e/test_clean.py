"""bloodcell.clean: duplicates, conflicting labels, non-cell images, the report and the CLI.

All data is generated here (no ../shared needed): smear-like images made the way a stained smear is, as
two stains mixed in optical density (pale pink background, red cells with a central pallor, a stained
white cell with a nucleus and granules, fine texture, sensor noise), and pollution made from them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bloodcell import PROJECT_ROOT
from bloodcell.data.cleaning import DEFAULTS, find_unwanted, find_unwanted_cached, write_report
from tests.smears import SIZE, foreign_picture, jpeg, recoloured, shifted, smear_set


@pytest.fixture(scope="module")
def clean_set():
    return smear_set()


def _with(images, labels, extra_images, extra_labels):
    return (
        np.concatenate([images, np.stack(extra_images)]),
        np.concatenate([labels, np.asarray(extra_labels, dtype=np.int64)]),
    )


def _reasons(result) -> dict[int, str]:
    return {e["index"]: e["reason"] for e in result.removed}


# ------------------------------------------------------------------------------------------- detection


def test_clean_data_passes_untouched(clean_set):
    images, labels = clean_set
    result = find_unwanted(images, labels)
    assert result.keep.all(), result.removed
    assert result.removed == [] and result.counts == {}


def test_exact_and_near_duplicates_keep_one_copy(clean_set):
    images, labels = clean_set
    n = len(labels)
    originals = [3, 10, 17, 24, 31]
    copies = [
        images[3].copy(),
        jpeg(images[10], 70),
        shifted(images[17], 2, -1),
        shifted(images[24], -1, 0),
        recoloured(images[31]),
    ]
    x, y = _with(images, labels, copies, labels[originals])
    result = find_unwanted(x, y)
    reasons = _reasons(result)
    assert {i: reasons.get(i) for i in range(n, n + 5)} == {i: "duplicate" for i in range(n, n + 5)}
    assert all(result.keep[originals]), "the first copy of each group is kept"
    assert result.counts == {"duplicate": 5}
    assert sorted(result.groups) == sorted([[o, n + k] for k, o in enumerate(originals)])
    exact = next(e for e in result.removed if e["index"] == n)
    assert exact["score"] == 1.0 and "group" in exact


def test_conflicting_labels_drop_group_or_keep_majority(clean_set):
    images, labels = clean_set
    n = len(labels)
    other = (labels[5] + 1) % 8
    # image 5 twice more: one copy with its own label, one with another label
    x, y = _with(images, labels, [images[5].copy(), jpeg(images[5], 80)], [labels[5], other])
    dropped = find_unwanted(x, y)
    assert {i: r for i, r in _reasons(dropped).items()} == {
        5: "conflicting_labels",
        n: "conflicting_labels",
        n + 1: "conflicting_labels",
    }
    majority = find_unwanted(x, y, {"duplicates": {"conflicting_labels": "keep_majority"}})
    assert majority.keep[5] and not majority.keep[n] and not majority.keep[n + 1]
    # a tie has no majority: the whole group goes
    x2, y2 = _with(images, labels, [images[5].copy()], [other])
    tie = find_unwanted(x2, y2, {"duplicates": {"conflicting_labels": "keep_majority"}})
    assert not tie.keep[5] and not tie.keep[n]


def test_pasted_and_blended_pictures_are_outliers(clean_set):
    images, labels = clean_set
    n = len(labels)
    rng = np.random.default_rng(1)
    pasted = foreign_picture(rng)
    blended = (0.6 * foreign_picture(rng) + 0.4 * images[7]).astype(np.uint8)
    noise = rng.integers(0, 256, images[0].shape).astype(np.uint8)
    cartoon = foreign_picture(rng, photo_like=False)  # flat rows: may read as a corrupt decode
    x, y = _with(images, labels, [pasted, blended, noise, cartoon], [0, 7, 3, 4])
    result = find_unwanted(x, y)
    reasons = _reasons(result)
    assert set(reasons) == {n, n + 1, n + 2, n + 3}
    assert reasons[n] == reasons[n + 1] == reasons[n + 2] == "outlier"
    assert reasons[n + 3] in ("outlier", "corrupt")
    outliers = [e for e in result.removed if e["reason"] == "outlier"]
    assert all(e["score"] > DEFAULTS["outliers"]["max_z"] and e["feature"] for e in outliers)


def test_blank_frames_and_corrupt_values(clean_set):
    images, labels = clean_set
    n = len(labels)
    rng = np.random.default_rng(2)
    flat = np.clip(np.full(images[0].shape, 200.0) + rng.normal(0, 1.0, images[0].shape), 0, 255).astype(
        np.uint8
    )
    black = np.zeros_like(images[0])
    truncated = images[9].copy()
    truncated[SIZE // 2 :] = 128  # a decode that stopped half way
    salt = images[11].copy()
    hit = rng.random(salt.shape[:2]) < 0.1
    salt[hit] = rng.choice([0, 255], (int(hit.sum()), 1))
    x, y = _with(images, labels, [flat, black, truncated, salt], [1, 2, 3, 4])
    reasons = _reasons(find_unwanted(x, y))
    assert reasons[n] == "flat"
    assert reasons[n + 1] in ("corrupt", "flat")
    assert reasons[n + 2] == "corrupt" and reasons[n + 3] == "corrupt"
    assert set(reasons) == {n, n + 1, n + 2, n + 3}


def test_label_outside_the_classes_is_corrupt(clean_set):
    images, labels = clean_set
    bad = labels.copy()
    bad[4] = 9
    result = find_unwanted(images, bad)
    assert _reasons(result) == {4: "corrupt"}
    assert result.removed[0]["bad_label"] == 9


def test_small_sets_skip_the_outlier_check_with_a_note(clean_set):
    images, labels = clean_set
    result = find_unwanted(images[:10], labels[:10])
    assert result.keep.all()
    assert any("outlier check skipped" in note for note in result.notes)


def test_unknown_setting_is_a_user_error(clean_set):
    from bloodcell.core.errors import UserError

    with pytest.raises(UserError, match="unknown key"):
        find_unwanted(*clean_set, {"duplicates": {"treshold": 0.9}})
    with pytest.raises(UserError, match="keep_majority"):
        find_unwanted(*clean_set, {"duplicates": {"conflicting_labels": "vote"}})


def test_config_file_matches_library_defaults():
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf" / "cleaning" / "default.yaml"))
    assert cfg == DEFAULTS


# ---------------------------------------------------------------------------------------- report, cache


def test_report_json_and_contact_sheet(clean_set, tmp_path):
    images, labels = clean_set
    n = len(labels)
    x, y = _with(
        images, labels, [images[2].copy(), foreign_picture(np.random.default_rng(3))], [labels[2], 5]
    )
    result = find_unwanted(x, y)
    paths = write_report(result, x, y, tmp_path / "report")
    report = json.loads(paths["json"].read_text())
    assert report["n_input"] == n + 2 and report["n_kept"] == n
    assert report["counts"] == {"outlier": 1, "duplicate": 1}
    assert {(e["index"], e["reason"]) for e in report["removed"]} == {(n, "duplicate"), (n + 1, "outlier")}
    assert all({"index", "reason", "score", "label"} <= set(e) for e in report["removed"])
    from PIL import Image

    with Image.open(paths["png"]) as sheet:
        assert sheet.width > 0 and sheet.height > 96


def test_cached_result_is_reused(clean_set, tmp_path):
    images, labels = clean_set
    x, y = _with(images, labels, [images[4].copy()], [labels[4]])
    first, hit1 = find_unwanted_cached(x, y, None, "abc123", tmp_path)
    second, hit2 = find_unwanted_cached(x, y, None, "abc123", tmp_path)
    assert (hit1, hit2) == (False, True)
    assert (first.keep == second.keep).all() and first.counts == second.counts
    # other settings, other entry
    _, hit3 = find_unwanted_cached(x, y, {"duplicates": {"near": False}}, "abc123", tmp_path)
    assert hit3 is False


# ------------------------------------------------------------------------------------------------- CLI


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, "-m", "bloodcell.clean", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_refuses_missing_input(tmp_path):
    proc = _cli("input=nowhere.npz", "output=out.npz", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: input nowhere.npz not found")
    assert not (tmp_path / "out.npz").exists()


def test_cli_cleans_end_to_end_and_refuses_existing_output(clean_set, tmp_path):
    images, labels = clean_set
    n = len(labels)
    x, y = _with(
        images, labels, [jpeg(images[6], 75), foreign_picture(np.random.default_rng(4))], [labels[6], 2]
    )
    src = tmp_path / "polluted.npz"
    np.savez(src, images=x, labels=y.astype(np.uint8).reshape(-1, 1))
    before = hashlib.sha256(src.read_bytes()).hexdigest()

    proc = _cli(f"input={src}", "output=cleaned.npz", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "removed 2 of" in proc.stdout
    with np.load(tmp_path / "cleaned.npz") as out:
        assert out["images"].dtype == np.uint8 and out["images"].shape == (n, SIZE, SIZE, 3)
        assert out["labels"].dtype == np.uint8 and out["labels"].shape == (n, 1)
        assert (out["images"] == images).all() and (out["labels"][:, 0] == labels).all()
    report = json.loads((tmp_path / "cleaned_cleaning" / "cleaning_report.json").read_text())
    assert {e["index"] for e in report["removed"]} == {n, n + 1}
    assert (tmp_path / "cleaned_cleaning" / "cleaning_removed.png").stat().st_size > 0
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before, "the input is never modified"

    again = _cli(f"input={src}", "output=cleaned.npz", cwd=tmp_path)
    assert again.returncode == 2
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and "already exists" in lines[0] and "overwrite=true" in lines[0]

    forced = _cli(
        f"input={src}", "output=cleaned.npz", "overwrite=true", f"report_dir={tmp_path / 'rep'}", cwd=tmp_path
    )
    assert forced.returncode == 0, forced.stderr
    assert (tmp_path / "rep" / "cleaning_report.json").exists()
