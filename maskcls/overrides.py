"""Label overrides: a reviewed audit.csv (audit.py) that corrects labels at discovery, the data staying
read-only (train.py --label_overrides)."""
from __future__ import annotations

import csv
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TypeVar

from maskcls.cli import DataError
from maskcls.task import GENDER_NAMES, GENDERS, MASK_KINDS, MAX_AGE

S = TypeVar("S")  # dataset.Sample: a frozen dataclass with person, path, kind, mask, gender and age


OVERRIDE_COLUMNS = ("person", "image", "kind", "score", "label", "suggested")  # audit.py's audit.csv


OVERRIDE_KINDS = ("gender", "age", "mask_swap", "outlier")


DROP = "drop"


@dataclass(frozen=True)
class LabelOverride:
    """One reviewed row of an audit.csv: `person` (folder name), `image` (file name, "" for the whole
    person), `kind`, `label` (the value it corrects; "" = not checked) and `suggested` (the new value)."""

    person: str
    image: str
    kind: str
    label: str
    suggested: str

    def record(self) -> dict[str, str]:
        return {"person": self.person, "image": self.image, "kind": self.kind, "label": self.label,
                "suggested": self.suggested}


@dataclass
class LabelOverrides:
    """Label corrections applied by `discover` (train.py --label_overrides): the data stays read-only."""

    path: str
    rows: list[LabelOverride]

    def records(self) -> list[dict[str, str]]:
        """What a checkpoint stores: every applied override."""
        return [r.record() for r in self.rows]

    def describe(self) -> str:
        count = {k: sum(r.kind == k for r in self.rows) for k in OVERRIDE_KINDS}
        return (f"label overrides: {count['gender']} gender, {count['age']} age, {count['mask_swap']} mask swap, "
                f"{count['outlier']} dropped ({self.path})")

    def _error(self, row: LabelOverride, what: str) -> DataError:
        return DataError(f"label override {row.kind} {row.person}{'/' + row.image if row.image else ''}: {what} "
                         f"({self.path})")

    def apply(self, samples: Sequence[S], root: Path) -> list[S]:
        """`samples` with every override applied; DataError for a row naming a person or image that is not
        in the data, or whose `label` is not the data's current value (an audit of other data)."""
        out: list = list(samples)
        by_person: dict[str, list[int]] = {}
        for i, s in enumerate(samples):
            by_person.setdefault(s.person, []).append(i)
        for row in sorted(self.rows, key=lambda r: r.kind == "outlier"):  # drops last: a dropped image may be swapped
            if row.person not in by_person:
                raise self._error(row, f"no such person folder in {root}")
            mine = by_person[row.person]
            first = samples[mine[0]]
            if row.kind == "gender":
                current = GENDER_NAMES[first.gender]
                if row.label and row.label != current:
                    raise self._error(row, f"the data says {current}, the file says {row.label}")
                for i in mine:
                    out[i] = dataclasses.replace(out[i], gender=GENDERS[row.suggested])
                continue
            if row.kind == "age":
                if row.label and int(float(row.label)) != first.age:
                    raise self._error(row, f"the data says age {first.age}, the file says {row.label}")
                for i in mine:
                    out[i] = dataclasses.replace(out[i], age=int(row.suggested))
                continue
            named = [i for i in mine if Path(samples[i].path).name == row.image]
            if not named:
                raise self._error(row, f"no image {row.image!r} in {root / row.person}")
            i = named[0]
            if row.kind == "outlier":
                out[i] = None
                continue
            current = samples[i].kind
            if row.label and row.label != current:
                raise self._error(row, f"the image is {current}, the file says {row.label}")
            partner = [j for j in mine if samples[j].kind == row.suggested]
            if not partner:
                raise self._error(row, f"no {row.suggested} image to swap with")
            j = partner[0]
            out[i] = dataclasses.replace(out[i], kind=row.suggested, mask=MASK_KINDS[row.suggested])
            out[j] = dataclasses.replace(out[j], kind=current, mask=MASK_KINDS[current])
        kept = [s for s in out if s is not None]
        if not kept:
            raise DataError(f"the label overrides drop every image ({self.path})")
        return kept


def read_label_overrides(path: str | os.PathLike) -> LabelOverrides:
    """Read and check an audit.csv (audit.py) kept by a reviewer: rows deleted are simply absent,
    `suggested` is the new value (gender male/female; age in years; mask_swap the kind the image really
    shows, its partner taking the image's kind; outlier `drop`). Errors are one line naming the file and
    line; a repeated row counts once, conflicting ones are an error."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"label overrides file not found: {file}" if not file.exists()
                        else f"label overrides must be a CSV file: {file}")
    try:
        with open(file, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            missing = [c for c in ("person", "image", "kind", "suggested") if c not in header]
            if missing:
                raise DataError(f"label overrides lack the column(s) {', '.join(missing)} (expected "
                                f"{','.join(OVERRIDE_COLUMNS)}, as audit.py writes): {file}")
            reader.fieldnames = header
            lines = [(reader.line_num, row) for row in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read label overrides ({e.__class__.__name__}): {file}") from None
    rows: dict[tuple, LabelOverride] = {}
    swapped: dict[tuple[str, str], tuple] = {}
    for line, raw in lines:
        cell = {k: (raw.get(k) or "").strip() for k in ("person", "image", "kind", "label", "suggested")}
        if not any(cell.values()):
            continue
        try:
            row = _override_row(**cell)
        except ValueError as e:
            raise DataError(f"label overrides line {line}: {e}: {file}") from None
        key = ((row.person, row.kind) if row.kind in ("gender", "age") else
               (row.person, row.kind, *sorted((Path(row.image).stem, row.suggested))) if row.kind == "mask_swap"
               else (row.person, row.kind, row.image))
        if key in rows and rows[key] != row and row.kind != "mask_swap":
            raise DataError(f"label overrides line {line}: a second, different {row.kind} row for "
                            f"{row.person}{'/' + row.image if row.image else ''}: {file}")
        if row.kind == "mask_swap" and key not in rows:
            for kind in key[2:]:  # an image swapped twice: the order of the swaps would decide its label
                if (row.person, kind) in swapped:
                    raise DataError(f"label overrides line {line}: {row.person} {kind} is in two different "
                                    f"mask swaps: {file}")
                swapped[(row.person, kind)] = key
        rows.setdefault(key, row)
    return LabelOverrides(str(file), list(rows.values()))


def _override_row(person: str, image: str, kind: str, label: str, suggested: str) -> LabelOverride:
    """One row, normalised; ValueError saying what is wrong with it."""
    if not person:
        raise ValueError("empty person")
    if kind not in OVERRIDE_KINDS:
        raise ValueError(f"unknown kind {kind!r} (known: {', '.join(OVERRIDE_KINDS)})")
    if kind in ("gender", "age") and image:
        raise ValueError(f"a {kind} override is about the whole person: leave image empty, got {image!r}")
    if kind in ("mask_swap", "outlier") and not image:
        raise ValueError(f"a {kind} override needs the image's file name")
    if kind == "gender":
        suggested, label = suggested.lower(), label.lower()
        for value in filter(None, (suggested, label)):
            if value not in GENDERS:
                raise ValueError(f"gender must be male or female, got {value!r}")
        if not suggested:
            raise ValueError("no suggested gender")
    elif kind == "age":
        for value in filter(None, (suggested, label)):
            try:
                age = float(value)
            except ValueError:
                raise ValueError(f"age must be a number of years, got {value!r}") from None
            if not 0 < age < MAX_AGE:
                raise ValueError(f"age must be between 0 and {MAX_AGE}, got {value!r}")
        if not suggested:
            raise ValueError("no suggested age")
        suggested = str(int(round(float(suggested))))
    elif kind == "mask_swap":
        image_kind = Path(image).stem.lower()  # as discover reads file names
        if image_kind not in MASK_KINDS:
            raise ValueError(f"{image!r} is not a mask image ({', '.join(MASK_KINDS)})")
        for value in filter(None, (suggested, label)):
            if value not in MASK_KINDS:
                raise ValueError(f"mask kind must be one of {', '.join(MASK_KINDS)}, got {value!r}")
        if not suggested or suggested == (label or image_kind):
            raise ValueError(f"a mask swap needs the other image's kind as suggested, got {suggested!r}")
    elif suggested.lower() != DROP:
        raise ValueError(f"an outlier override's suggested value is {DROP}, got {suggested!r}")
    return LabelOverride(person, image, kind, label, suggested.lower() if kind == "outlier" else suggested)
