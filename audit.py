"""Find mislabeled people and images from out-of-fold predictions, and measure how well that works.

    python audit.py --runs model/cv --out audit/            # a --kfold K --fold all folder, or fold runs
    python audit.py inject --data_dir train --out noisy/    # a symlinked copy with known label errors
    python audit.py recall --audit audit/audit.csv --truth noisy/truth.csv [--keep reviewed.csv]

The audit reads what train.py wrote for each run's best-F1 epoch (val_probs.npy, val_logits.npy,
val_samples.csv, best_f1.pth for the task and age bins): every validation photo was predicted by a
model that never trained on its person. K folds cover everyone; a single split audits only its
validation people, and says so. It writes `DIR/audit.csv` (person,image,kind,score,label,suggested;
one row per suspicion, highest score first) and `DIR/audit.png` (the top suspects, each with their
photos). Review the sheet, delete the rows you reject and train with `--label_overrides audit.csv`.

Scores, in nats (natural-log likelihood ratios; photos' probabilities are clipped to [0.01, 0.99],
so one photo adds at most log 99 = 4.6):
- gender: sum over the person's photos of log p(other gender) - log p(folder's gender); high when
  the photos agree with each other and disagree with the folder.
- age: over the person's photos, log-likelihood of the best other age group minus that of the
  folder's group. The suggested age is the mean expected age of a `years` age head (E[age] = 18 +
  sum of P(age >= t) over t = 19..75), moved into the best other group if it lies in the folder's;
  without one, the median age of the audited people in that group.
- mask_swap: per pair of a person's photos with different mask labels, log-likelihood of the two
  labels swapped minus as filed; the best non-overlapping pairs.
- outlier: images cleanlab's `find_label_issues` flags on the out-of-fold probabilities (labels
  after the person-level suggestions above), scored by log(median fit of the person's other photos)
  - log(fit of this photo), fit = the probability of its label (cleanlab's self-confidence): a photo
  that fits no class of its own person (someone else, a blank frame). Suggested: drop.
`inject` writes a copy of a training set (symlinks) with a known share of people's gender flipped,
ages moved across a cut and normal/incorrect_mask swapped, plus truth.csv (audit.csv's columns;
`suggested` = the true value, so it is also a perfect override file); `recall` scores an audit
against it: per kind, the share of injected errors among the top 2 x (injected) suspects.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

import dataset as data
from maskcls import cli, overrides
from maskcls.checkpoint import (VALIDATION_SAMPLES, CheckpointError, expand_runs, load_array, load_checkpoint,
                                resolve_state_path, run_folder, validation_samples)
from maskcls.fileio import atomic_write_text, check_apart, replace_folder
from maskcls.gallery import Cell, SheetRow, save_sheet
from maskcls.task import (AGE_THRESHOLDS, DEFAULT_AGE_BINS, GENDER_NAMES, MASK_KINDS, MASK_NAMES, age_label, age_names,
                          join_labels, split_labels, split_probs, task_of)
# Imported where used, being heavy or optional: cleanlab (only --method cleanlab).

COLUMNS = overrides.OVERRIDE_COLUMNS
KINDS = overrides.OVERRIDE_KINDS
EPS = 0.01  # probabilities clipped to [EPS, 1 - EPS]: no single photo decides a person
SHEET_ROWS = 24
INJECT_MARKER = ".mask-toolkit-inject"
KIND_ORDER = {k: i for i, k in enumerate(MASK_KINDS)}  # mask1..mask5, incorrect_mask, normal


class AuditError(cli.ToolkitError, ValueError):
    """Bad input to the audit; one line naming the path."""


# --------------------------------------------------------------------------- out-of-fold predictions
@dataclass
class Predictions:
    """Every audited photo once (averaged over runs that validated it): task probabilities at the
    checkpoints' age bins, its label there, and the per-part marginals the person-level views use."""

    paths: list[str]
    people: list[str]
    kinds: list[str]
    ages: np.ndarray  # raw age in years (as the folder says, or as an override set it)
    labels: np.ndarray  # task class ids at `age_bins`
    probs: np.ndarray
    task: str  # the report task: all (18), mask (3) or genderage (6)
    age_bins: tuple[int, int]
    expected_age: np.ndarray  # E[age] of a years age head, NaN without one

    @property
    def parts(self) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """(p_mask [N,3], p_gender [N,2], p_age [N,3]); None for a part the task does not predict."""
        return split_probs(self.task, self.probs)

    @property
    def label_parts(self) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray]:
        """(mask, gender, age group) labels; None where the task has no such part."""
        mask, gender, _ = split_labels(self.task, self.labels)
        return mask, gender, np.array([age_label(int(a), self.age_bins) for a in self.ages], dtype=np.int64)


def check_run(run: Path) -> Path:
    """AuditError unless `run` is a folder: one that is not there, or a file (a .pth given for its folder)."""
    try:
        return run_folder(run)
    except CheckpointError as e:
        raise AuditError(str(e)) from None


def read_run(run: Path) -> tuple[dict, dict]:
    """One run's validation outputs and checkpoint; AuditError / CheckpointError naming what is missing."""
    check_run(run)
    need = [run / n for n in ("val_probs.npy", "val_labels.npy", VALIDATION_SAMPLES)]
    missing = [p.name for p in need if not p.is_file()]
    if missing:
        raise AuditError(f"no out-of-fold predictions ({', '.join(missing)} missing) in {run}; train with a "
                         "validation split, best with --kfold K --fold all")
    ckpt = load_checkpoint(resolve_state_path(run, "best_f1"))
    try:
        rows = validation_samples(run, ckpt)
    except CheckpointError as e:
        raise AuditError(str(e)) from None
    if not rows or not {"path", "person", "kind", "age"} <= set(rows[0]):
        raise AuditError(f"val_samples.csv lacks path,person,kind,age rows: {run / 'val_samples.csv'}")
    out = {"probs": load_array(run / "val_probs.npy", ndim=2), "labels": load_array(run / "val_labels.npy", ndim=1),
           "rows": rows}
    if (run / "val_logits.npy").is_file():
        out["logits"] = load_array(run / "val_logits.npy", ndim=2)
    if len(out["probs"]) != len(rows) or len(out["labels"]) != len(rows):
        raise AuditError(f"val_probs.npy ({len(out['probs'])} rows) and val_samples.csv ({len(rows)}) disagree: {run}")
    return out, ckpt


def load_predictions(runs: Sequence[Path]) -> Predictions:
    """The runs' out-of-fold predictions, one row per photo; runs must share the label space and age bins."""
    merged: dict[str, dict] = {}
    task_name, bins = None, None
    for run in runs:
        out, ckpt = read_run(run)
        task = task_of(ckpt)
        run_bins = tuple(int(b) for b in ckpt["age_bins"])
        if task_name is None:
            task_name, bins = task.report_task, run_bins
        elif (task.report_task, run_bins) != (task_name, bins):
            raise AuditError(f"runs disagree on the task or age bins ({task.report_task} {list(run_bins)} in {run}, "
                             f"{task_name} {list(bins)} before): audit one set of folds at a time")
        probs, expected = out["probs"], np.full(len(out["rows"]), np.nan)
        if task.age_head == "years" and "logits" in out:
            # groups at the labels' bins (val_probs used the scoring cuts), and the expected age
            logits = torch.from_numpy(out["logits"]).float()
            probs = task.probs(logits, bins).numpy()
            expected = (AGE_THRESHOLDS[0] - 1 + task.age_survival(logits).sum(1)).numpy()
        labels = labels_at(task.report_task, out["labels"], [int(r["age"]) for r in out["rows"]], bins)
        for i, r in enumerate(out["rows"]):
            m = merged.setdefault(r["path"], {"row": r, "label": labels[i], "probs": [], "expected": []})
            m["probs"].append(probs[i])
            if np.isfinite(expected[i]):
                m["expected"].append(expected[i])
    items = list(merged.values())
    return Predictions(
        paths=[m["row"]["path"] for m in items], people=[m["row"]["person"] for m in items],
        kinds=[m["row"]["kind"] for m in items], ages=np.array([int(m["row"]["age"]) for m in items]),
        labels=np.array([m["label"] for m in items], dtype=np.int64),
        probs=np.array([np.mean(m["probs"], axis=0) for m in items]), task=task_name, age_bins=bins,
        expected_age=np.array([np.mean(m["expected"]) if m["expected"] else np.nan for m in items]))


def labels_at(task: str, labels: np.ndarray, ages: Sequence[int], bins: tuple[int, int]) -> np.ndarray:
    """The run's validation labels with the age group recomputed at `bins` (they were scored at its
    --score_age_bins); mask and gender are as trained."""
    mask, gender, _ = split_labels(task, labels)
    return join_labels(task, mask, gender, np.array([age_label(a, bins) for a in ages], dtype=np.int64))


# --------------------------------------------------------------------------- the audit
@dataclass
class Suspicion:
    person: str
    image: str
    kind: str
    score: float
    label: str
    suggested: str
    photos: list[int] = field(default_factory=list)  # rows of the image(s) concerned (highlighted)
    fits: dict[int, float] = field(default_factory=dict)  # outlier: p(label) of the person's photos, as scored

    def row(self) -> list[str]:
        return [self.person, self.image, self.kind, f"{self.score:.3f}", self.label, self.suggested]


def log_clip(p: np.ndarray) -> np.ndarray:
    return np.log(np.clip(p, EPS, 1 - EPS))


def audit(pred: Predictions) -> list[Suspicion]:
    """Every suspicion, highest score first (see the module doc for each kind's score)."""
    p_mask, p_gender, p_age = pred.parts
    mask, gender, group = pred.label_parts
    by_person: dict[str, list[int]] = {}
    for i, person in enumerate(pred.people):
        by_person.setdefault(person, []).append(i)
    found: list[Suspicion] = []
    fixed_gender = None if gender is None else gender.copy()
    fixed_group, fixed_mask = group.copy(), None if mask is None else mask.copy()
    for person, rows in by_person.items():
        if p_gender is not None:
            g = int(np.bincount(gender[rows]).argmax())
            score = float((log_clip(p_gender[rows, 1 - g]) - log_clip(p_gender[rows, g])).sum())
            if score > 0:
                found.append(Suspicion(person, "", "gender", score, GENDER_NAMES[g], GENDER_NAMES[1 - g]))
                fixed_gender[rows] = 1 - g
        if p_age is not None:
            a = int(np.bincount(group[rows]).argmax())
            ll = log_clip(p_age[rows]).sum(0)
            other = max((k for k in range(3) if k != a), key=lambda k: ll[k])
            score = float(ll[other] - ll[a])
            if score > 0:
                age = int(np.bincount(pred.ages[rows]).argmax())
                found.append(Suspicion(person, "", "age", score, str(age), str(suggest_age(pred, rows, other, a))))
                fixed_group[rows] = other
        if p_mask is not None:
            for s in mask_swaps(pred, person, rows, p_mask, mask):
                found.append(s)
                i, j = s.photos
                fixed_mask[i], fixed_mask[j] = mask[j], mask[i]
    swapped = {i for s in found if s.kind == "mask_swap" for i in s.photos}
    fitted_labels = join_labels(pred.task, fixed_mask, fixed_gender, fixed_group)
    found += outliers(pred, by_person, fitted_labels, swapped)
    found.sort(key=lambda s: (-s.score, KINDS.index(s.kind), s.person, s.image))
    return found


def suggest_age(pred: Predictions, rows: list[int], group: int, filed: int) -> int:
    """A years head's mean expected age where it lies outside the `filed` group, else kept inside the
    suggested `group`; without a years head the median audited age of `group`."""
    lo, hi = pred.age_bins
    low, high = (1, lo - 1) if group == 0 else (lo, hi - 1) if group == 1 else (hi, 130)
    expected = pred.expected_age[rows]
    if np.isfinite(expected).any():
        years = round(float(np.nanmean(expected)))
        return int(years if age_label(years, pred.age_bins) != filed else np.clip(years, low, high))
    ages = pred.ages[(pred.ages >= low) & (pred.ages <= high)]
    return int(np.median(ages)) if len(ages) else (lo - 5 if group == 0 else (lo + hi) // 2 if group == 1 else hi + 5)


def mask_swaps(pred: Predictions, person: str, rows: list[int], p_mask: np.ndarray, mask: np.ndarray
               ) -> list[Suspicion]:
    """Pairs of one person's photos whose mask labels fit better swapped, best first, no photo twice."""
    lp = log_clip(p_mask)
    pairs = []
    for x, i in enumerate(rows):
        for j in rows[x + 1:]:
            if mask[i] != mask[j]:
                gain = lp[i, mask[j]] + lp[j, mask[i]] - lp[i, mask[i]] - lp[j, mask[j]]
                if gain > 0:
                    pairs.append((float(gain), i, j))
    used: set[int] = set()
    out = []
    for gain, i, j in sorted(pairs, reverse=True):
        if i in used or j in used:
            continue
        used |= {i, j}
        if mask[j] > mask[i]:  # name the photo filed under the rarer kind (normal, then incorrect_mask)
            i, j = j, i
        out.append(Suspicion(person, Path(pred.paths[i]).name, "mask_swap", gain, pred.kinds[i], pred.kinds[j], [i, j]))
    return out


def outliers(pred: Predictions, by_person: dict[str, list[int]], labels: np.ndarray, skip: set[int]
             ) -> list[Suspicion]:
    """Photos that fit their person's (corrected) labels far worse than the person's other photos do,
    among those cleanlab flags as label issues."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    fit = get_label_quality_scores(labels, pred.probs, method="self_confidence")
    with warnings.catch_warnings():  # "too few examples in class k" for small or imbalanced sets
        warnings.simplefilter("ignore")
        try:
            flagged = find_label_issues(labels, pred.probs, n_jobs=1)  # no worker processes in a CLI
        except ValueError:  # too few photos for cleanlab's noise estimate: every misfit is a candidate
            flagged = pred.probs.argmax(1) != labels
    out = []
    for person, rows in by_person.items():
        for i in rows:
            others = [j for j in rows if j != i]
            if not flagged[i] or i in skip or not others:
                continue
            score = float(np.log(max(np.median(fit[others]), EPS)) - np.log(max(fit[i], EPS)))
            if score > 0:
                out.append(Suspicion(person, Path(pred.paths[i]).name, "outlier", score, pred.kinds[i], overrides.DROP, [i],
                                     {j: float(fit[j]) for j in rows}))
    return out


# --------------------------------------------------------------------------- outputs
def csv_text(rows: Sequence[Sequence[str]]) -> str:
    table = io.StringIO()
    csv.writer(table, lineterminator="\n").writerows([COLUMNS, *rows])
    return table.getvalue()


def sheet_rows(pred: Predictions, found: list[Suspicion], limit: int = SHEET_ROWS):
    """The contact sheet's rows: the top suspects of each kind in turn, each with the person's photos."""
    p_mask, p_gender, p_age = pred.parts
    by_kind = {k: [s for s in found if s.kind == k] for k in KINDS}
    picked = [by_kind[k][r] for r in range(limit) for k in KINDS if r < len(by_kind[k])][:limit]
    photos: dict[str, list[int]] = {}
    for i, person in enumerate(pred.people):
        photos.setdefault(person, []).append(i)
    rows = []
    for s in picked:
        cells = []
        for i in sorted(photos[s.person], key=lambda i: (KIND_ORDER.get(pred.kinds[i], 99), pred.paths[i])):
            if s.kind == "gender":
                g = int(p_gender[i].argmax())
                reading = f"{GENDER_NAMES[g]} {p_gender[i, g]:.2f}"
            elif s.kind == "age":
                a = int(p_age[i].argmax())
                reading = (f"age ~{pred.expected_age[i]:.0f}" if np.isfinite(pred.expected_age[i])
                           else f"{age_names(pred.age_bins)[a]} {p_age[i, a]:.2f}")
            elif s.kind == "mask_swap":
                m = int(p_mask[i].argmax())
                reading = f"looks {MASK_NAMES[m]} {p_mask[i, m]:.2f}"
            else:
                reading = f"p(label) {s.fits[i]:.2f}"  # the label the outlier score used
            cells.append(Cell(pred.paths[i], f"{pred.kinds[i]}\n{reading}", highlight=i in s.photos))
        rows.append(SheetRow(f"{s.kind}  {s.person}  {s.label} -> {s.suggested}  score {s.score:.1f}", cells))
    return rows


def warn_missing_photos(rows: Sequence[SheetRow]) -> int:
    """Warn once when photos of the contact sheet are not where val_samples.csv says (the data moved or
    was renamed since training): the sheet then shows grey placeholders. audit.csv needs no photos, so
    the audit goes on. Returns how many are missing."""
    paths = list(dict.fromkeys(str(cell.path) for row in rows for cell in row.cells))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        warnings.warn(f"{len(missing)} of {len(paths)} photos of the review sheet not found (data moved or renamed "
                      f"since training?): {missing[0]}{' ...' if len(missing) > 1 else ''}; audit.png shows grey "
                      "placeholders for them, audit.csv is complete", stacklevel=2)
    return len(missing)


def data_people(runs: Sequence[Path]) -> int | None:
    """How many people the runs' data set has (person folders), None when its folder is not here."""
    ckpt = load_checkpoint(resolve_state_path(runs[0], "best_f1"))
    folder = (ckpt.get("resolved") or {}).get("data_dir") or (ckpt.get("args") or {}).get("data_dir")
    try:
        root = data.images_root(folder) if folder else None
    except cli.DataError:
        return None
    return len(data.person_dirs(root)) if root else None


def run_audit(run_args: Sequence[str], out: str | os.PathLike, sheet: int = SHEET_ROWS) -> list[Suspicion]:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AuditError(f"--out exists and is not a folder: {out}")
    groups = expand_runs(run_args)
    runs = [r for g in groups for r in g]
    for run in runs:
        check_run(run)  # every run before any work
    pred = load_predictions(runs)
    found = audit(pred)
    people = len(set(pred.people))
    total = data_people(runs)
    print(f"audited {people} people ({len(pred.paths)} photos) from the out-of-fold predictions of {len(runs)} run(s)"
          + (f": {people} of the data set's {total} people" if total else ""))
    if len(runs) == 1:
        print(f"note: {runs[0]} is a single validation split: only its {people} validation people are audited; "
              "train with --kfold K --fold all and audit that folder to cover everyone")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "audit.csv", csv_text([s.row() for s in found]))

    rows = sheet_rows(pred, found, sheet)
    warn_missing_photos(rows)
    save_sheet(out / "audit.png", rows, f"label audit: top suspects of {len(found)} ({people} people audited)")
    counts = ", ".join(f"{sum(s.kind == k for s in found)} {k}" for k in KINDS)
    print(f"suspicions: {counts}\nwrote {out / 'audit.csv'} and {out / 'audit.png'}\n"
          f"  review: delete the rows you reject, then train with --label_overrides {out / 'audit.csv'}")
    return found


# --------------------------------------------------------------------------- injected errors, for measuring
def inject_errors(data_dir: str | os.PathLike, out: str | os.PathLike, gender: float = 0.05, age: float = 0.05,
                  mask_swap: float = 0.03, seed: int = 0, age_bins: Sequence[int] = DEFAULT_AGE_BINS) -> Path:
    """Write `out/train` (symlinks to the original photos) with known label errors, and `out/truth.csv`:
    `gender` of the people filed under the other gender, `age` moved across a cut (by up to ten years
    past it), `mask_swap` with normal and incorrect_mask swapped; disjoint people for each kind."""
    for name, share in (("--gender", gender), ("--age", age), ("--mask_swap", mask_swap)):
        cli.in_range(share, 0, 1, name)
    root = data.images_root(data_dir)
    check_apart(out, [root, root.parent, Path(data_dir)])
    samples = data.discover(data_dir, verbose=False)
    by_person: dict[str, list[data.Sample]] = {}
    for s in samples:
        by_person.setdefault(s.person, []).append(s)
    rng = np.random.default_rng(seed)
    order = [str(p) for p in rng.permutation(sorted(by_person))]
    n = len(order)
    counts = [max(1, round(n * share)) if share > 0 else 0 for share in (gender, age, mask_swap)]
    flip, move = set(order[:counts[0]]), set(order[counts[0]:counts[0] + counts[1]])
    swappable = [p for p in order[counts[0] + counts[1]:]
                 if {"normal", "incorrect_mask"} <= {s.kind for s in by_person[p]}]
    swap = set(swappable[:counts[2]])
    truth, folders, lo_hi = [], [], tuple(int(b) for b in age_bins)
    names: dict[str, str] = {}
    for person in sorted(by_person):
        m = data.PERSON_DIR.match(person)
        g, years = m["gender"], int(m["age"])
        if person in flip:
            g = "female" if g.lower() == "male" else "male"
            truth.append([f"{m['id']}_{g}_{m['race']}_{years}", "", "gender", "", g, m["gender"].lower()])
        if person in move:
            wrong = moved_age(years, lo_hi, rng)
            truth.append([f"{m['id']}_{g}_{m['race']}_{wrong}", "", "age", "", str(wrong), str(years)])
            years = wrong
        names[person] = f"{m['id']}_{g}_{m['race']}_{years}"
        folders.append([m["id"], g, m["race"], years, names[person]])

    def build(tmp: Path) -> None:
        for person, photos in by_person.items():
            folder = tmp / "train" / "images" / names[person]
            folder.mkdir(parents=True)
            by_kind = {s.kind: s for s in photos}
            for s in photos:
                source = s
                if person in swap and s.kind in ("normal", "incorrect_mask"):
                    source = by_kind["incorrect_mask" if s.kind == "normal" else "normal"]
                link = folder / (s.kind + Path(source.path).suffix)
                link.symlink_to(Path(source.path).resolve())
                if person in swap and s.kind == "normal":
                    truth.append([names[person], link.name, "mask_swap", "", "normal", "incorrect_mask"])
        atomic_write_text(tmp / "train" / "train.csv", "id,gender,race,age,path\n"
                          + "".join(",".join(map(str, f)) + "\n" for f in folders))
        atomic_write_text(tmp / "truth.csv", csv_text(truth))

    replace_folder(out, build, marker=INJECT_MARKER, tool="audit.py inject")
    print(f"injected into {n} people: {len(flip)} gender flips, {len(move)} ages moved across a cut, "
          f"{len(swap)} normal/incorrect_mask swaps -> {Path(out) / 'train'} (truth: {Path(out) / 'truth.csv'})")
    return Path(out)


def moved_age(age: int, bins: tuple[int, int], rng: np.random.Generator) -> int:
    """An age in a neighbouring group: across the nearer cut (either one from the middle group), 1..10 years past it."""
    lo, hi = bins
    group = age_label(age, bins)
    up = group == 0 or (group == 1 and rng.random() < 0.5)
    cut = lo if group == 0 or (group == 1 and not up) else hi
    return int(cut + rng.integers(0, 10)) if up else int(max(1, cut - 1 - rng.integers(0, 10)))


def read_rows(path: str | os.PathLike, what: str) -> list[dict[str, str]]:
    """The rows of an audit.csv or truth.csv; AuditError for a missing, empty or unreadable file, or a
    header without audit.csv's columns (a header alone is a valid file: nothing found)."""
    file = Path(path)
    if not file.is_file():
        raise AuditError(f"{what} not found: {file}")
    try:
        with open(file, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header, rows = reader.fieldnames, list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise AuditError(f"{what} is not a CSV text file ({type(e).__name__}): {file}") from None
    if header is None:
        raise AuditError(f"{what} is empty (not even the header {','.join(COLUMNS)}): {file}")
    if not set(COLUMNS) <= set(header):
        raise AuditError(f"{what} needs the columns {','.join(COLUMNS)}: {file}")
    return rows


def _key(row: dict[str, str], age_bins: Sequence[int]) -> tuple:
    """What makes two rows the same finding: the person; for an age, the suggested age group (a fix must
    land in the right group); for a swap, which two kinds; for an outlier, the image."""
    if row["kind"] == "mask_swap":
        return row["person"], row["kind"], frozenset((row["label"] or Path(row["image"]).stem, row["suggested"]))
    if row["kind"] == "outlier":
        return row["person"], row["kind"], row["image"]
    if row["kind"] == "age":
        try:
            return row["person"], row["kind"], age_label(round(float(row["suggested"])), age_bins)
        except ValueError:
            raise AuditError(f"age row of {row['person']} suggests {row['suggested']!r}, not a number") from None
    return row["person"], row["kind"]


def recall(audit_rows: list[dict[str, str]], truth_rows: list[dict[str, str]], factor: float = 2.0,
           age_bins: Sequence[int] = DEFAULT_AGE_BINS) -> tuple[dict[str, dict], list[dict[str, str]]]:
    """Per injected kind: injected, found among the top factor x injected suspects of that kind, recall;
    and the audit rows so found (what a reviewer of those suspects would confirm). An age counts as found
    when the suggested age lies in the true age group."""
    report, confirmed = {}, []
    for kind in KINDS:
        true = {_key(r, age_bins) for r in truth_rows if r["kind"] == kind}
        if not true:
            continue
        top = [r for r in audit_rows if r["kind"] == kind][:int(round(factor * len(true)))]
        hits = [r for r in top if _key(r, age_bins) in true]
        confirmed += hits
        found = len({_key(r, age_bins) for r in hits})
        report[kind] = {"injected": len(true), "examined": len(top), "found": found, "recall": found / len(true)}
    return report, confirmed


# --------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "inject":
        p = argparse.ArgumentParser(prog="audit.py inject", description=inject_errors.__doc__)
        p.add_argument("--data_dir", required=True, help="training set (train/ or train/images)")
        p.add_argument("--out", required=True, help=f"new folder, outside the data (replaced only if it holds {INJECT_MARKER})")
        p.add_argument("--gender", type=float, default=0.05, help="share of people with the gender flipped (0.05)")
        p.add_argument("--age", type=float, default=0.05, help="share of people moved across an age cut (0.05)")
        p.add_argument("--mask_swap", type=float, default=0.03, help="share of people with normal/incorrect_mask swapped (0.03)")
        p.add_argument("--age_bins", nargs=2, type=int, default=list(DEFAULT_AGE_BINS), metavar=("A", "B"))
        p.add_argument("--seed", type=int, default=0)
        a = p.parse_args(argv[1:])
        inject_errors(a.data_dir, a.out, a.gender, a.age, a.mask_swap, a.seed, a.age_bins)
        return 0
    if argv and argv[0] == "recall":
        p = argparse.ArgumentParser(prog="audit.py recall", description=recall.__doc__)
        p.add_argument("--audit", required=True, help="audit.csv")
        p.add_argument("--truth", required=True, help="truth.csv of audit.py inject")
        p.add_argument("--factor", type=float, default=2.0, help="examine the top factor x injected suspects per kind (2)")
        p.add_argument("--keep", default=None, metavar="FILE",
                       help="write the audit rows found among them (a reviewer's confirmed rows) as an overrides file")
        a = p.parse_args(argv[1:])
        report, confirmed = recall(read_rows(a.audit, "audit file"), read_rows(a.truth, "truth file"), a.factor)
        for kind, r in report.items():
            print(f"{kind}: {r['found']} of {r['injected']} injected among the top {r['examined']} suspects "
                  f"(recall {r['recall']:.2f})")
        if a.keep:
            atomic_write_text(a.keep, csv_text([[r[c] for c in COLUMNS] for r in confirmed]))
            print(f"wrote the {len(confirmed)} confirmed rows to {a.keep}")
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True,
                   help="run folders whose validation people cover the data: a --kfold K --fold all folder or its folds")
    p.add_argument("--out", required=True, help="folder for audit.csv and audit.png")
    p.add_argument("--sheet", type=int, default=SHEET_ROWS, help=f"suspects shown in audit.png ({SHEET_ROWS})")
    a = p.parse_args(argv)
    cli.positive_int(a.sheet, "--sheet")
    run_audit(a.runs, a.out, a.sheet)
    return 0


if __name__ == "__main__":
    cli.run(main)
