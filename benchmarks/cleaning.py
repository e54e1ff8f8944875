"""How well `bloodcell.clean.find_unwanted` finds unwanted samples: precision, recall, clean cells removed.

    python benchmarks/cleaning.py                      # seeds 0 1 2, the full 13,659 real images
    python benchmarks/cleaning.py --seeds 0 --limit 3000 --skip-unseen   # a quick look

Three parts, all on the real cells of ../shared/data/pbc96 (skipped with a message when ../shared is absent):

1. **Builder pollution**: for each seed, ``../shared/data/build_training_set.py OUT --unwanted 0.1 --seed S``
   (pasted cartoon stickers, exact duplicates with the same or another label), cleaned with the
   default config; precision and recall of the removed samples.
2. **Clean set** (``--unwanted 0``): the fraction of real cells removed, per class and per reason.
3. **Unseen pollution**, kinds the builder does not make (natural photos from sklearn's and
   matplotlib's bundled samples, pasted whole, blended at several alphas or as a patch; drawn shapes;
   two real cells blended half and half;
   flat frames; gradients; noise; truncated, salt-and-pepper, inverted, striped images; near duplicates
   re-encoded, shifted, recoloured, flipped or all at once), added to the clean set: recall per kind and
   overall precision.

How duplicates are scored. The builder copies a real cell and marks the *copy* unwanted; but both copies
are the same picture, so in a group of identical images whose labels agree, removing any ``size - 1`` of
them is equally right: such a group counts ``size - 1`` unwanted samples, matched by the number of its
members removed (extra removals are false positives). A group whose labels *conflict* is scored two ways:
**policy** (the default figures): the whole group is unwanted, because nothing in the data says which
label is the true one and the issue asks to drop such groups; **strict**: only the builder's marked copies
are unwanted, so dropping the correctly-labelled original counts as a false positive. Both are printed.
Real near-duplicate pairs that already exist inside pbc96 (the same cell photographed twice) are not
marked by the builder; removing one of them counts as a false positive here (shown per reason).
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
BUILDER = SHARED / "build_training_set.py"

from bloodcell import CLASS_NAMES  # noqa: E402
from bloodcell.clean import find_unwanted  # noqa: E402

# ------------------------------------------------------------------------------------------- scoring


def _pixel_groups(images: np.ndarray) -> list[list[int]]:
    """Groups (size >= 2) of pixel-identical images."""
    by_hash: dict[bytes, list[int]] = defaultdict(list)
    for i, im in enumerate(images):
        by_hash[im.tobytes()].append(i)
    return [g for g in by_hash.values() if len(g) > 1]


def score(
    removed: np.ndarray, unwanted: np.ndarray, labels: np.ndarray, groups: list[list[int]]
) -> dict[str, dict[str, float]]:
    """Precision / recall under the 'policy' and 'strict' rules of the module docstring.

    ``groups`` are the true duplicate groups (identical or deliberately near-identical copies); every
    other sample is unwanted exactly when it is in ``unwanted``."""
    removed, unwanted = set(map(int, removed)), set(map(int, unwanted))
    out = {}
    for rule in ("policy", "strict"):
        tp = fp = fn = 0
        in_group = set()
        for g in groups:
            in_group.update(g)
            r = sum(i in removed for i in g)
            if len({int(labels[i]) for i in g}) == 1:
                want = len(g) - 1
            elif rule == "policy":
                want = len(g)
            else:
                marked = [i for i in g if i in unwanted]
                want = len(marked)
                # a dropped original is a false positive, whatever else was removed
                orig_removed = sum(i in removed for i in g if i not in unwanted)
                tp_g = sum(i in removed for i in marked)
                tp, fp, fn = tp + tp_g, fp + orig_removed, fn + want - tp_g
                continue
            tp_g = min(r, want)
            tp, fp, fn = tp + tp_g, fp + r - tp_g, fn + want - tp_g
        rest_removed = removed - in_group
        rest_unwanted = unwanted - in_group
        tp += len(rest_removed & rest_unwanted)
        fp += len(rest_removed - rest_unwanted)
        fn += len(rest_unwanted - rest_removed)
        out[rule] = {
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "precision": tp / max(tp + fp, 1),
            "recall": tp / max(tp + fn, 1),
        }
    return out


# --------------------------------------------------------------------------------- unseen pollution


def photo_sources() -> list[np.ndarray]:
    """Natural and drawn pictures that ship inside installed packages (no download)."""
    import matplotlib
    from PIL import Image
    from sklearn.datasets import load_sample_images

    pics = [np.asarray(p) for p in load_sample_images().images]  # a temple, a flower
    sample = Path(matplotlib.get_data_path()) / "sample_data"
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"):
        if (sample / name).exists():
            pics.append(np.asarray(Image.open(sample / name).convert("RGB")))
    if (sample / "topobathy.npz").exists():
        from matplotlib import colormaps

        z = np.load(sample / "topobathy.npz")["topo"].astype(float)
        z = (z - z.min()) / (np.ptp(z) + 1e-9)
        pics.append((colormaps["terrain"](z)[..., :3] * 255).astype(np.uint8))
    return pics


def _crop(pic: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    from PIL import Image

    h, w = pic.shape[:2]
    s = int(rng.uniform(0.15, 0.9) * min(h, w))
    y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
    return np.asarray(Image.fromarray(pic[y : y + s, x : x + s]).resize((size, size), Image.BILINEAR))


def _jpeg(im: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(im).save(buf, "JPEG", quality=int(quality))
    return np.asarray(Image.open(buf).convert("RGB"))


def _shift(im: np.ndarray, dy: int, dx: int) -> np.ndarray:
    p = 8
    a = np.pad(im, ((p, p), (p, p), (0, 0)), mode="reflect")
    return a[p - dy : p - dy + im.shape[0], p - dx : p - dx + im.shape[1]]


def _recolour(im: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = im.astype(np.float32) * rng.uniform(0.9, 1.1, 3) + rng.uniform(-10, 10, 3)
    out = 255 * (np.clip(out, 0, 255) / 255) ** rng.uniform(0.85, 1.15)
    return out.clip(0, 255).astype(np.uint8)


def _shapes(rng: np.random.Generator, size: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(im)
    for _ in range(rng.integers(3, 9)):
        (x0, x1), (y0, y1) = sorted(rng.integers(0, size, 2)), sorted(rng.integers(0, size, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1 + 3, y1 + 3], fill=colour)
    draw.text(
        (int(rng.integers(0, size // 2)), int(rng.integers(0, size - 12))),
        f"TEXT {rng.integers(100)}",
        fill=(0, 0, 0),
    )
    return np.asarray(im)


def unseen_pollution(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator, per_kind: int):
    """{kind: (images, labels, source)}: ``per_kind`` unwanted samples of each kind; ``source`` is the
    real cell a near duplicate was made from (-1 for the rest)."""
    pics = photo_sources()
    n, size = len(images), images.shape[1]
    cell = lambda: images[rng.integers(n)].astype(np.float32)
    photo = lambda: _crop(pics[rng.integers(len(pics))], rng, size).astype(np.float32)

    def patch():
        im, s = cell(), int(rng.integers(size // 3, size // 2 + 1))
        y, x = rng.integers(0, size - s, 2)
        im[y : y + s, x : x + s] = _crop(pics[rng.integers(len(pics))], rng, s)
        return im

    def gradient():
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        g = np.broadcast_to(a + (b - a) * np.linspace(0, 1, size)[:, None, None], (size, size, 3))
        return g if rng.random() < 0.5 else g.transpose(1, 0, 2)

    def truncated():
        im = cell()
        im[rng.integers(size // 4, 3 * size // 4) :] = rng.choice([0, 128])
        return im

    def salt_pepper():
        im = cell()
        hit = rng.random((size, size)) < 0.15
        im[hit] = rng.choice([0, 255], (int(hit.sum()), 1))
        return im

    def row_noise():
        im = cell()
        rows = rng.random(size) < 0.2
        im[rows] = rng.integers(0, 256, (int(rows.sum()), size, 3))
        return im

    def near(kind):
        def make():
            i = int(rng.integers(n))
            im = images[i]
            if kind == "jpeg":
                im = _jpeg(im, rng.integers(40, 80))
            elif kind == "shift":
                im = _shift(im, *rng.integers(-3, 4, 2))
            elif kind == "recolour":
                im = _recolour(im, rng)
            elif kind == "flip":
                im = [im[::-1], im[:, ::-1], np.rot90(im)][rng.integers(3)]
            else:
                im = _jpeg(_recolour(_shift(im, *rng.integers(-2, 3, 2)), rng), rng.integers(60, 90))
            label = labels[i] if rng.random() < 0.5 else rng.integers(8)
            return im.astype(np.float32), label, i

        return make

    makers = {"photo": photo}
    for alpha in (0.7, 0.5, 0.35):
        makers[f"photo_blend_{alpha}"] = lambda a=alpha: a * photo() + (1 - a) * cell()
    makers.update(
        {
            "shapes_blend_0.6": lambda: 0.6 * _shapes(rng, size) + 0.4 * cell(),
            # two real cells blended half and half (mixup-like): colours and texture stay smear-like
            "cell_blend_0.5": lambda: 0.5 * cell() + 0.5 * cell(),
            "photo_patch": patch,
            "flat": lambda: (
                np.broadcast_to(rng.integers(0, 256, 3), (size, size, 3))
                + rng.normal(0, 1.5, (size, size, 3))
            ),
            "gradient": gradient,
            "noise": lambda: rng.integers(0, 256, (size, size, 3)),
            "truncated": truncated,
            "salt_pepper": salt_pepper,
            "inverted": lambda: 255 - cell(),
            "row_noise": row_noise,
        }
    )
    for k in ("jpeg", "shift", "recolour", "flip", "combo"):
        makers[f"near_dup_{k}"] = near(k)
    out = {}
    for kind, make in makers.items():
        xs, ys, src = [], [], []
        for _ in range(per_kind):
            r = make()
            im, y, s = r if isinstance(r, tuple) else (r, rng.integers(8), -1)
            xs.append(np.clip(im, 0, 255).astype(np.uint8))
            ys.append(int(y))
            src.append(int(s))
        out[kind] = (np.stack(xs), np.array(ys), np.array(src))
    return out


# ------------------------------------------------------------------------------------------------ main


def build(out: Path, unwanted: float, seed: int, limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cmd = [sys.executable, str(BUILDER), str(out), "--unwanted", str(unwanted), "--seed", str(seed)]
    if limit:
        cmd += ["--limit", str(limit)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with np.load(out) as d:
        images, labels = d["images"], d["labels"].reshape(-1).astype(np.int64)
    marked = out.with_suffix(".unwanted.npy")
    return images, labels, (np.load(marked) if marked.exists() else np.zeros(0, np.int64))


def clean(images, labels, flips=None):
    cfg = None if flips is None else {"duplicates": {"match_flips": flips}}
    t = time.process_time()
    result = find_unwanted(images, labels, cfg)
    return result, time.process_time() - t


def _line(name: str, s: dict) -> str:
    return (
        f"{name:<22} precision {s['precision']:.4f}  recall {s['recall']:.4f}  "
        f"(tp {s['tp']}, fp {s['fp']}, fn {s['fn']})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--limit", type=int, default=0, help="use only N real images (0 = all 13,659)")
    ap.add_argument("--per-kind", type=int, default=40, help="unseen samples of each kind")
    ap.add_argument("--skip-unseen", action="store_true")
    a = ap.parse_args()
    if not BUILDER.exists():
        print(f"skipped: {BUILDER} not found (the shared data lives beside the repository, in ../shared)")
        return
    cpu_total = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("== builder pollution (--unwanted 0.1), default config ==")
        totals = {"policy": Counter(), "strict": Counter()}
        for seed in a.seeds:
            images, labels, unwanted = build(tmp / f"polluted_{seed}.npz", 0.1, seed, a.limit)
            result, cpu = clean(images, labels)
            cpu_total += cpu
            removed = np.where(~result.keep)[0]
            s = score(removed, unwanted, labels, _pixel_groups(images))
            for rule in s:
                totals[rule].update({k: s[rule][k] for k in ("tp", "fp", "fn")})
            fp = sorted(set(removed) - set(unwanted))
            print(
                f"seed {seed}: {len(labels)} images, {len(unwanted)} marked unwanted, removed {len(removed)} "
                f"{result.counts}, cpu {cpu:.1f}s"
            )
            print("   " + _line("policy", s["policy"]))
            print("   " + _line("strict", s["strict"]))
            why = Counter(e["reason"] for e in result.removed if e["index"] in set(fp))
            print(f"   removed but not marked by the builder, by reason: {dict(why)}")
        for rule, c in totals.items():
            c = dict(c)
            c["precision"], c["recall"] = (
                c["tp"] / max(c["tp"] + c["fp"], 1),
                c["tp"] / max(c["tp"] + c["fn"], 1),
            )
            print(_line(f"all seeds, {rule}", c))

        print("\n== clean set (--unwanted 0) ==")
        images, labels, _ = build(tmp / "clean.npz", 0.0, 0, a.limit)
        result, cpu = clean(images, labels)
        cpu_total += cpu
        removed = np.where(~result.keep)[0]
        per_class = np.bincount(labels[removed], minlength=8)
        total = np.bincount(labels, minlength=8)
        print(
            f"removed {len(removed)} of {len(labels)} real cells = {len(removed) / len(labels):.3%} "
            f"{result.counts}, cpu {cpu:.1f}s"
        )
        print("   per class: " + ", ".join(f"{CLASS_NAMES[c]} {per_class[c]}/{total[c]}" for c in range(8)))
        n_dup = sum(e["reason"] in ("duplicate", "conflicting_labels") for e in result.removed)
        print(
            f"   of which duplicates inside pbc96 itself: {len(result.groups)} groups "
            f"(the same cell twice; {n_dup} removed)"
        )

        if not a.skip_unseen:
            print("\n== unseen pollution kinds added to the clean set (match_flips on, the default) ==")
            rng = np.random.default_rng(1234)
            kinds = unseen_pollution(images, labels, rng, a.per_kind)
            xs, ys, spans, groups, unwanted = [images], [labels], {}, [], []
            start = len(labels)
            for kind, (x, y, src) in kinds.items():
                spans[kind] = np.arange(start, start + len(y))
                for k, s in enumerate(src):
                    if s >= 0:
                        groups.append([int(s), start + k])
                unwanted += list(range(start, start + len(y)))
                xs.append(x), ys.append(y)
                start += len(y)
            allx, ally = np.concatenate(xs), np.concatenate(ys)
            # a cell copied twice forms one group of three
            merged: dict[int, list[int]] = {}
            for s, v in groups:
                merged.setdefault(s, [s]).append(v)
            groups = list(merged.values())
            result, cpu = clean(allx, ally)
            cpu_total += cpu
            removed = set(np.where(~result.keep)[0].tolist())
            s = score(np.array(sorted(removed)), np.array(unwanted), ally, groups)
            print(
                f"{len(ally)} images ({len(unwanted)} unseen unwanted, {a.per_kind} per kind), "
                f"removed {len(removed)} {result.counts}, cpu {cpu:.1f}s"
            )
            print("   " + _line("policy", s["policy"]))
            print("   " + _line("strict", s["strict"]))
            real_removed = sum(i < len(labels) for i in removed)
            print(
                f"   real cells removed: {real_removed} "
                "(incl. near-duplicate sources and pbc96's own duplicates)"
            )
            for kind, idx in spans.items():
                if kind.startswith("near_dup"):
                    # a copy counts as found when it or its source is removed
                    src = kinds[kind][2]
                    hit = np.mean([(v in removed) or (int(s) in removed) for v, s in zip(idx, src)])
                else:
                    hit = np.mean([v in removed for v in idx])
                why = Counter(e["reason"] for e in result.removed if e["index"] in set(idx.tolist()))
                print(f"   {kind:<18} recall {hit:.2f}   {dict(why)}")
    print(f"\ncleaning cpu time, all runs: {cpu_total:.0f}s")


if __name__ == "__main__":
    main()
