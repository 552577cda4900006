"""Deterministic synthetic stand-in for the mask-classification data (SPEC.md §2 layout).

Lets every script, test and demo run with no private data. Each person is a drawn face:
- mask: worn = mask over nose and mouth, incorrect = mask below the nose or on the chin
  (nose visible), normal = no mask;
- gender: short hair (male) vs long hair falling to the shoulders (female), plus a hair tint;
- age, from the raw age through the default cut points 30/60: smooth skin (<30),
  forehead lines and crow's feet (30..59), lines plus grey/white hair (>=60);
- nuisance: background, skin tone, shirt, mask colour/shape, face position/scale/tilt, noise.

Same arguments give byte-identical files. `python demo_data.py --out DIR` writes:
  DIR/train/images/<id>_<gender>_Asian_<age>/{mask1..mask5,incorrect_mask,normal}.jpg
  DIR/train/train.csv   id,gender,race,age,path
  DIR/eval/images/<40 hex>.jpg, DIR/eval/info.csv (ImageID,ans=0), DIR/gt/gt.csv (ImageID,ans)
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from maskcls import cli
from maskcls.fileio import atomic_write_text, is_marked
from maskcls.task import age_label, encode_class

FILE_NAMES = ("mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal")
MASK_OF_FILE = {name: (0 if name.startswith("mask") else 1 if name == "incorrect_mask" else 2)
                for name in FILE_NAMES}
GENDERS = ("male", "female")
AGE_BINS = (30, 60)  # the cue steps at these raw ages; labels are recomputed by readers
AGE_RANGES = ((18, 29), (30, 59), (60, 70))
# Ages on the band edges, handed first to the people of each band so they appear in every set.
EDGE_AGES = ((29, 18), (30, 59), (60, 70))
JPEG_QUALITY = 92
SUPERSAMPLE = 2  # draw at 2x then downsample for smooth edges
MARKER = ".mask-toolkit-demo"  # left in the --out folder: its train/, eval/, gt/ are ours to replace
DATA_FILES = ("train.csv", "info.csv", "gt.csv", "images")  # what makes a part look like real data

SKIN_TONES = ((255, 224, 196), (241, 194, 167), (224, 172, 125), (198, 140, 96),
              (160, 105, 70), (120, 78, 50))
YOUNG_HAIR = {"male": ((25, 22, 20), (45, 35, 28), (60, 42, 30)),
              "female": ((80, 45, 25), (110, 65, 35), (60, 32, 20))}
OLD_HAIR = ((225, 225, 225), (200, 200, 205), (238, 236, 230), (185, 185, 185))
MASK_COLOURS = ((245, 245, 245), (150, 200, 235), (30, 30, 35), (235, 160, 185), (120, 125, 135),
                (70, 160, 120), (40, 60, 120), (220, 215, 120))


def class_of(mask: int, gender: int, age: int, bins: tuple[int, int] = AGE_BINS) -> int:
    return encode_class(mask, gender, age_label(age, bins))


def _people(rng: np.random.Generator, n: int) -> list[tuple[str, int]]:
    """(gender, age) for n people: the 6 gender-age cells as balanced as n allows, shuffled."""
    if n < 6:
        raise cli.UsageError(f"need at least 6 people so every gender-age cell is present, got {n}")
    cells = [i % 6 for i in range(n)]
    rng.shuffle(cells)
    used = [0] * 6
    out = []
    for cell in cells:
        gender, band = GENDERS[cell // 3], cell % 3
        k = used[cell]
        used[cell] += 1
        if k < len(EDGE_AGES[band]):
            age = EDGE_AGES[band][k]
        else:
            lo, hi = AGE_RANGES[band]
            age = int(rng.integers(lo, hi + 1))
        out.append((gender, age))
    return out


def _shade(colour, f: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, c * f))) for c in colour)


def _person_style(rng: np.random.Generator, gender: str, age: int) -> dict:
    band = age_label(age)
    hair_pool = OLD_HAIR if band == 2 else YOUNG_HAIR[gender]
    return {
        "gender": gender,
        "band": band,
        "wrinkles": 0 if band == 0 else 3 + (age >= 45),
        "bg": tuple(int(v) for v in rng.integers(30, 226, 3)),
        "shirt": tuple(int(v) for v in rng.integers(20, 236, 3)),
        "skin": _shade(SKIN_TONES[rng.integers(len(SKIN_TONES))], rng.uniform(0.93, 1.05)),
        "hair": _shade(hair_pool[rng.integers(len(hair_pool))], rng.uniform(0.9, 1.1)),
        "cx": rng.uniform(0.46, 0.54), "cy": rng.uniform(0.40, 0.46), "scale": rng.uniform(0.92, 1.08),
    }


def _draw(rng: np.random.Generator, style: dict, mask: int, size: tuple[int, int]) -> Image.Image:
    """One picture of one person; rng supplies the per-picture variation."""
    w, h = size
    W, H = w * SUPERSAMPLE, h * SUPERSAMPLE
    bg = _shade(style["bg"], rng.uniform(0.9, 1.1))
    img = Image.new("RGB", (W, H), bg)
    d = ImageDraw.Draw(img)
    s = style["scale"] * rng.uniform(0.95, 1.05)
    a, b = 0.23 * W * s, 0.22 * H * s  # face half-width / half-height
    cx = W * (style["cx"] + rng.uniform(-0.04, 0.04))
    cy = H * (style["cy"] + rng.uniform(-0.03, 0.03))
    lw = max(1, round(W / 48))  # stroke width, ~2 px at the 96-wide default after downsampling
    skin, hair = style["skin"], style["hair"]

    # shoulders + neck
    d.ellipse((cx - 1.9 * a, cy + 1.35 * b, cx + 1.9 * a, cy + 3.4 * b), fill=style["shirt"])
    d.rectangle((cx - 0.42 * a, cy + 0.6 * b, cx + 0.42 * a, cy + 1.5 * b), fill=_shade(skin, 0.9))
    # hair behind the head: long hair reaches the shoulders, short hair hugs the skull
    if style["gender"] == "female":
        d.rounded_rectangle((cx - 1.3 * a, cy - 1.15 * b, cx + 1.3 * a, cy + 1.75 * b),
                            radius=int(0.9 * a), fill=hair)
    else:
        d.ellipse((cx - 1.08 * a, cy - 1.18 * b, cx + 1.08 * a, cy + 0.2 * b), fill=hair)
    d.ellipse((cx - a, cy - b, cx + a, cy + b), fill=skin)
    # fringe over the top of the head
    d.chord((cx - a, cy - 1.12 * b, cx + a, cy - 0.35 * b), 180, 360, fill=hair)
    # ears
    for sx in (-1, 1):
        ex = cx + sx * a
        d.ellipse((ex - 0.14 * a, cy - 0.2 * b, ex + 0.14 * a, cy + 0.15 * b), fill=_shade(skin, 0.93))

    dark = _shade(skin, 0.45)
    # age lines: forehead creases and crow's feet (30+); step at the cut point, not a gradient
    n = style["wrinkles"]
    for i in range(n):
        y = cy - 0.70 * b + i * 0.11 * b
        d.line((cx - 0.55 * a, y, cx + 0.55 * a, y), fill=dark, width=lw)
    if n:
        for sx in (-1, 1):
            x0 = cx + sx * 0.68 * a
            for dy in (-0.06, 0.02, 0.10):
                d.line((x0, cy - 0.12 * b, x0 + sx * 0.22 * a, cy + (dy - 0.12) * b), fill=dark, width=lw)
    # eyebrows + eyes
    brow = _shade(hair, 0.8) if style["band"] < 2 else (150, 150, 150)
    for sx in (-1, 1):
        ex = cx + sx * 0.38 * a
        d.line((ex - 0.2 * a, cy - 0.3 * b, ex + 0.2 * a, cy - 0.32 * b), fill=brow, width=lw + 1)
        d.ellipse((ex - 0.13 * a, cy - 0.2 * b, ex + 0.13 * a, cy - 0.07 * b), fill=(250, 250, 250))
        d.ellipse((ex - 0.07 * a, cy - 0.18 * b, ex + 0.07 * a, cy - 0.09 * b), fill=(30, 25, 20))
    # nose (bridge + dark nostrils) and mouth
    d.polygon([(cx, cy - 0.08 * b), (cx - 0.16 * a, cy + 0.3 * b), (cx + 0.16 * a, cy + 0.3 * b)],
              fill=_shade(skin, 0.78))
    for sx in (-1, 1):
        d.ellipse((cx + sx * 0.09 * a - 0.05 * a, cy + 0.25 * b, cx + sx * 0.09 * a + 0.05 * a,
                   cy + 0.32 * b), fill=_shade(skin, 0.35))
    d.chord((cx - 0.3 * a, cy + 0.44 * b, cx + 0.3 * a, cy + 0.66 * b), 0, 180, fill=(170, 50, 55))

    if mask < 2:
        colour = _shade(MASK_COLOURS[rng.integers(len(MASK_COLOURS))], rng.uniform(0.9, 1.05))
        edge = _shade(colour, 0.6) if sum(colour) > 150 else (110, 110, 115)
        if mask == 0:  # worn: top edge on the nose bridge, just under the eyes
            top = cy + rng.uniform(-0.06, 0.0) * b
        elif rng.random() < 0.6:  # under the nose: mouth covered, nose out
            top = cy + rng.uniform(0.36, 0.42) * b
        else:  # on the chin: nose and mouth out
            top = cy + rng.uniform(0.70, 0.76) * b
        bottom = max(cy + 1.06 * b, top + 0.42 * b)
        mid = (top + bottom) / 2
        peak = rng.uniform(0.0, 0.08) * b  # KN95-like point or flat surgical top
        poly = [(cx - 1.0 * a, top + 0.06 * b), (cx, top - peak), (cx + 1.0 * a, top + 0.06 * b),
                (cx + 0.95 * a, mid), (cx + 0.45 * a, bottom), (cx - 0.45 * a, bottom), (cx - 0.95 * a, mid)]
        d.polygon(poly, fill=colour, outline=edge, width=lw)
        for sx in (-1, 1):  # ear loops
            d.line((cx + sx * 1.0 * a, top + 0.06 * b, cx + sx * 1.08 * a, cy - 0.05 * b), fill=edge, width=lw)
        for f in (0.33, 0.66):  # pleats
            y = top + f * (bottom - top)
            d.line((cx - 0.8 * a, y, cx + 0.8 * a, y), fill=edge, width=max(1, lw - 1))

    angle = rng.uniform(-6, 6)
    img = img.rotate(angle, resample=Image.BILINEAR, center=(cx, cy), fillcolor=bg)
    img = img.resize((w, h), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) * rng.uniform(0.88, 1.12)  # exposure
    arr += rng.normal(0.0, 7.0, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _save_jpeg(img: Image.Image, path: Path) -> None:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)  # no timestamps/EXIF: bytes are reproducible
    path.write_bytes(buf.getvalue())


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _build(root: Path, people: int, size: tuple[int, int], seed: int, eval_people: int) -> None:
    """Write a complete dataset into an empty directory `root`."""
    # independent streams so changing eval_people leaves the train set unchanged
    train_ss, eval_ss = np.random.SeedSequence([seed, 0]), np.random.SeedSequence([seed, 1])
    rows = []
    images = root / "train" / "images"
    for pid, ((gender, age), ss) in enumerate(zip(_people(np.random.default_rng(train_ss), people),
                                                  train_ss.spawn(people)), start=1):
        rng = np.random.default_rng(ss)
        folder = f"{pid:06d}_{gender}_Asian_{age}"
        (images / folder).mkdir(parents=True)
        style = _person_style(rng, gender, age)
        for name in FILE_NAMES:
            _save_jpeg(_draw(rng, style, MASK_OF_FILE[name], size), images / folder / f"{name}.jpg")
        rows.append([f"{pid:06d}", gender, "Asian", age, folder])
    _write_csv(root / "train" / "train.csv", ["id", "gender", "race", "age", "path"], rows)

    eval_rng = np.random.default_rng(eval_ss)
    eval_images = root / "eval" / "images"
    eval_images.mkdir(parents=True)
    (root / "gt").mkdir()
    entries = []
    for (gender, age), ss in zip(_people(eval_rng, eval_people), eval_ss.spawn(eval_people)):
        rng = np.random.default_rng(ss)
        style = _person_style(rng, gender, age)
        for name in FILE_NAMES:
            image_id = rng.bytes(20).hex() + ".jpg"
            _save_jpeg(_draw(rng, style, MASK_OF_FILE[name], size), eval_images / image_id)
            entries.append((image_id, class_of(MASK_OF_FILE[name], GENDERS.index(gender), age)))
    order = eval_rng.permutation(len(entries))  # the competition's rows are not grouped by person
    entries = [entries[i] for i in order]
    _write_csv(root / "eval" / "info.csv", ["ImageID", "ans"], [[i, 0] for i, _ in entries])
    _write_csv(root / "gt" / "gt.csv", ["ImageID", "ans"], [[i, c] for i, c in entries])


def generate(out_dir: str | Path, people: int = 180, size: tuple[int, int] = (96, 128), seed: int = 0,
             eval_people: int = 36) -> Path:
    """Write the synthetic dataset into out_dir (train/, eval/, gt/; other contents are kept).

    Built in a temporary sibling directory and moved in with train/ last, so a crash never
    leaves a train/train.csv next to a half-written set. Existing train/, eval/, gt/ are replaced
    when this function made them (out_dir carries MARKER) or they hold no data files; anything
    else, e.g. a real train/images, raises ToolkitError and nothing is touched. size is (width, height).
    """
    if people < 6:
        raise cli.UsageError(f"need at least 6 people so every gender-age cell is present, got {people}")
    if eval_people < 6:
        raise cli.UsageError(f"need at least 6 eval people so every gender-age cell is present, got {eval_people}")
    w, h = (int(v) for v in size)
    if w < 16 or h < 16:
        raise cli.UsageError(f"size must be at least 16x16, got {w}x{h}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise cli.ToolkitError(f"--out exists and is not a folder: {out}")
    if out.is_dir() and not is_marked(out, MARKER):
        for part in ("gt", "eval", "train"):
            found = [name for name in DATA_FILES if (out / part / name).exists()]
            if found:
                raise cli.ToolkitError(f"{out / part} holds {', '.join(found)} that demo_data.py did not write "
                                       f"(no {MARKER} in {out}); not replacing it: choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _build(tmp / "data", people, (w, h), seed, eval_people)
        if not out.exists():
            os.replace(tmp / "data", out)
        else:
            for part in ("gt", "eval", "train"):
                target = out / part
                if target.exists():
                    os.replace(target, tmp / f"old-{part}")  # out of the way first, deleted below
                os.replace(tmp / "data" / part, target)
        atomic_write_text(out / MARKER, "Made by demo_data.py, which replaces train/, eval/ and gt/ here "
                                        "when it writes to this folder again.\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_demo_data(out_dir: str | Path, **kwargs) -> Path:
    """Generate the synthetic set into out_dir unless out_dir/train/train.csv already exists.

    Refuses (FileExistsError) to touch an out_dir/train that lacks train.csv: it may be real data.
    kwargs go to generate().
    """
    out = Path(out_dir)
    if (out / "train" / "train.csv").is_file():
        return out
    if (out / "train").exists():
        raise FileExistsError(f"{out / 'train'} exists but has no train.csv; not overwriting it")
    generate(out, **kwargs)
    print(f"generated synthetic demo data in {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="dataset root to write (train/, eval/, gt/)")
    p.add_argument("--people", type=int, default=180, help="training people (7 images each)")
    p.add_argument("--size", type=int, nargs=2, default=(96, 128), metavar=("W", "H"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval_people", type=int, default=36, help="evaluation people (7 images each)")
    args = p.parse_args(argv)
    out = generate(args.out, args.people, tuple(args.size), args.seed, args.eval_people)
    print(f"wrote {args.people * 7} train and {args.eval_people * 7} eval images to {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
