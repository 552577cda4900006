"""Detection rates and cost of the face stage's detector on a training set, by kind of photo.

    python recipes/face_rates.py --data_dir TRAIN_DIR [--people 200] [--thresholds 0.6,0.7,0.7 0.1,0.1,0.3]

For each threshold setting (proposal, refinement, output stage) it prints, for masked (mask1..5), incorrectly
masked and unmasked photos, how many got a face, and the milliseconds an image (one process, torch's default
threads). "Far" counts masked photos whose eye centre lies more than half the eye distance from the one
found on the same person's unmasked photo (the seven photos of a person are one sitting): a wrong face, or
landmarks far off. The setting the face stage uses is faces.FaceSettings' (0.1, 0.1, accept 0.3).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dataset as data  # noqa: E402
from maskcls import faces, imaging


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--people", type=int, default=200, help="the first N people (default 200)")
    p.add_argument("--thresholds", nargs="+", default=["0.6,0.7,0.7", "0.5,0.5,0.5", "0.3,0.3,0.3", "0.1,0.1,0.3",
                                                       "0.1,0.1,0.0"])
    p.add_argument("--min_face", type=int, default=faces.FaceSettings.min_face)
    args = p.parse_args()
    samples = data.discover(args.data_dir, verbose=False)
    people = sorted({s.person for s in samples})[:args.people]
    chosen = [s for s in samples if s.person in set(people)]
    images = [imaging.load_image(s.path) for s in chosen]
    print(f"{len(chosen)} photos of {len(people)} people from {args.data_dir}")
    print("thresholds       masked          incorrect      unmasked       far  ms/image")
    for text in args.thresholds:
        t = [float(v) for v in text.split(",")]
        detector = faces.MTCNN(args.min_face, (t[0], t[1], 0.0))
        found: list[faces.Face | None] = []
        start = time.perf_counter()
        for img in images:
            got = detector.detect(img)
            found.append(got[0] if got and got[0].score >= t[2] else None)
        ms = 1000 * (time.perf_counter() - start) / len(images)
        normal = {s.person: f for s, f in zip(chosen, found) if s.kind == "normal" and f is not None}
        far = 0
        for s, f in zip(chosen, found):
            if s.mask == 0 and f is not None and s.person in normal:
                ref = normal[s.person].landmarks
                gap = np.linalg.norm(f.landmarks[:2].mean(0) - ref[:2].mean(0))
                far += gap > 0.5 * np.linalg.norm(ref[1] - ref[0])
        cells = []
        for mask in (0, 1, 2):
            got = [f is not None for s, f in zip(chosen, found) if s.mask == mask]
            cells.append(f"{sum(got)}/{len(got)} ({100 * np.mean(got):.1f}%)")
        print(f"{text:<16} {cells[0]:<15} {cells[1]:<14} {cells[2]:<14} {far:<4} {ms:.1f}")


if __name__ == "__main__":
    main()
