"""The face stage (faces.py): a real face (scikit-image's astronaut, shipped in its package) placed into
larger frames at known offsets, scales and tilts must be found and cut to the template; frames without a
face fall back and are counted; the stage travels with the checkpoint into inference, predict and export."""
from __future__ import annotations

import contextlib
import io
import json

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from skimage import data as skdata

import dataset as data
import export
from maskcls import faces
import inference
import predict
import train
from maskcls.checkpoint import load_checkpoint
from maskcls import task
from maskcls import imaging
from conftest import TINY_TRAIN_ARGS

FRAME = (512, 384)  # (H, W): a competition photo


@pytest.fixture(scope="module")
def astronaut() -> tuple[np.ndarray, np.ndarray]:
    """The photo and its five landmarks as MTCNN finds them in the original (the reference to move)."""
    img = skdata.astronaut()
    face = faces.MTCNN(thresholds=(0.6, 0.7, 0.7)).detect(img)[0]
    return img, face.landmarks


def place(img: np.ndarray, centre: tuple[float, float], scale: float, tilt: float, seed: int = 0,
          size: tuple[int, int] = FRAME) -> tuple[np.ndarray, np.ndarray]:
    """The astronaut's head (a 200x200 patch about her face) pasted into a smooth random frame, scaled and
    turned by `tilt` degrees about its centre, which lands at `centre` (x, y). Returns (frame, the 2x3
    matrix taking astronaut pixels to frame pixels)."""
    rng = np.random.default_rng(seed)
    frame = cv2.resize(rng.integers(40, 220, (6, 5, 3), dtype=np.uint8), (size[1], size[0]),
                       interpolation=cv2.INTER_CUBIC)
    matrix = cv2.getRotationMatrix2D((222.0, 120.0), tilt, scale)
    matrix[:, 2] += np.array(centre) - (222.0, 120.0)
    patch = np.zeros_like(img[:, :, 0])
    patch[20:220, 122:322] = 255
    pasted = cv2.warpAffine(img, matrix, (size[1], size[0]), flags=cv2.INTER_LINEAR)
    inside = cv2.warpAffine(patch, matrix, (size[1], size[0]), flags=cv2.INTER_NEAREST) > 0
    frame[inside] = pasted[inside]
    return frame, matrix


def moved(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


@pytest.mark.parametrize("centre, scale, tilt", [((192, 180), 1.0, 0.0), ((130, 300), 0.7, 12.0),
                                                 ((260, 170), 1.3, -9.0)])
def test_finds_the_face_where_it_was_put_and_aligns_it_to_the_template(astronaut, centre, scale, tilt):
    img, reference = astronaut
    frame, matrix = place(img, centre, scale, tilt)
    stage = faces.FaceStage(faces.FaceSettings("chip"))
    face = stage.detect(frame)
    assert face is not None and face.score >= stage.settings.accept
    expected = moved(reference, matrix)
    eyes = np.linalg.norm(expected[1] - expected[0])
    assert np.linalg.norm(face.landmarks - expected, axis=1).max() < 0.15 * eyes
    # the crop puts the eyes where dlib's chip has them, upright whatever the tilt
    size = (150, 150)
    crop_matrix = faces.similarity(face.landmarks, faces.GEOMETRIES["chip"].template(size))
    eyes_in_crop = moved(face.landmarks[:2], crop_matrix)
    np.testing.assert_allclose(eyes_in_crop, faces.GEOMETRIES["chip"].template(size)[:2], atol=6)
    assert abs(eyes_in_crop[1, 1] - eyes_in_crop[0, 1]) < 3
    assert faces.warp(frame, crop_matrix, size).shape == (150, 150, 3)


def test_similarity_recovers_a_known_transform_and_the_chip_is_dlibs():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    true = cv2.getRotationMatrix2D((0, 0), 23.0, 1.7)
    true[:, 2] = (12.0, -4.0)
    np.testing.assert_allclose(faces.similarity(src, moved(src, true)), true, atol=1e-9)
    # dlib's get_face_chip_details: (padding + mean face) / (1 + 2 padding) * size
    chip = faces.GEOMETRIES["chip"].template((150, 150))
    np.testing.assert_allclose(chip, (0.25 + faces.MEAN_FACE) / 1.5 * 150)
    # a crop taller than wide keeps the square chip's scale and shows more above and below
    tall = faces.GEOMETRIES["chip"].template((200, 150))
    np.testing.assert_allclose(tall, chip + (0, 25))


def _write(path, img: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
    return str(path)


def test_no_face_falls_back_and_training_photos_take_their_sitting(astronaut, tmp_path):
    img, _ = astronaut
    with_face, matrix = place(img, (190, 190), 0.9, 4.0, seed=1)
    empty = place(np.zeros_like(img), (190, 190), 0.9, 4.0, seed=2)[0]  # a black patch: no face
    paths = [_write(tmp_path / "a" / "normal.jpg", with_face), _write(tmp_path / "a" / "mask1.jpg", empty),
             _write(tmp_path / "b.jpg", empty)]
    settings = faces.FaceSettings("wide")
    stage = faces.FaceStage(settings)
    located = stage.locate(paths, imaging.load_image, groups=["a", "a", None])
    assert located.sources() == ["detected", "sitting", "fallback"]
    assert located.counts() == {"detected": 1, "sitting": 1, "fallback": 1}
    assert "fallback crop for 1 (33.3%)" in located.summary()
    # the sitting's photo takes the landmarks found on its other photo
    np.testing.assert_allclose(located.landmarks[1], located.landmarks[0])
    # training learnt the fallback from its own photos: where their faces sit, in fractions of the frame
    fallback = np.array(settings.fallback)
    np.testing.assert_allclose(fallback * (FRAME[1], FRAME[0]), located.landmarks[0], atol=0.01 * FRAME[0])
    np.testing.assert_allclose(located.landmarks[2], located.landmarks[0], atol=0.01 * FRAME[0])
    # alone (prediction), the faceless photos fall back
    alone = faces.FaceStage(settings).locate(paths, imaging.load_image)
    assert alone.sources() == ["detected", "fallback", "fallback"]


def test_training_without_any_face_is_one_clear_error(tmp_path):
    paths = [_write(tmp_path / f"{i}.jpg", np.full((64, 48, 3), 90 + i, np.uint8)) for i in range(2)]
    with pytest.raises(faces.FaceStageError, match="found no face in any of 2 training photos"):
        faces.FaceStage(faces.FaceSettings("chip")).locate(paths, imaging.load_image, groups=["a", "a"])


def test_detections_are_cached_by_file_and_setting(astronaut, tmp_path, monkeypatch):
    img, _ = astronaut
    paths = [_write(tmp_path / "p.jpg", place(img, (190, 200), 1.0, 0.0)[0])]
    run = faces.FaceRun(tmp_path / "cache")
    first = faces.FaceStage(faces.FaceSettings("chip")).locate(paths, imaging.load_image, cache=run.cache(
        faces.FaceSettings().detector_key()))
    assert first.detected_now == 1 and list((tmp_path / "cache").glob("faces-*.npz"))
    calls = []
    monkeypatch.setattr(faces.FaceStage, "detect", lambda self, image: calls.append(1))
    again = faces.FaceRun(tmp_path / "cache")
    second = faces.FaceStage(faces.FaceSettings("wide")).locate(  # another geometry: the same detections
        paths, imaging.load_image, cache=again.cache(faces.FaceSettings().detector_key()))
    assert calls == [] and second.detected_now == 0 and "all from the cache" in second.summary()
    np.testing.assert_allclose(second.landmarks, first.landmarks)
    other = faces.FaceSettings(min_face=60).detector_key()  # another detector setting: detected again
    fixed = faces.FaceSettings(min_face=60, fallback=[[0.5, 0.4]] * 5)  # a checkpoint's: nothing to learn
    assert faces.FaceStage(fixed).locate(paths, imaging.load_image, cache=again.cache(other)).sources() == ["fallback"]
    assert calls == [1]


def test_store_cuts_the_face_crop_and_keys_its_cache_by_the_transforms(astronaut, tmp_path):
    img, _ = astronaut
    paths = [_write(tmp_path / "p.jpg", place(img, (200, 210), 1.1, 6.0)[0])]
    pre = {"resize": [150, 150], "crop": None, "mean": [0.5] * 3, "std": [0.5] * 3,
           "face": faces.FaceSettings("chip").to_dict()}
    store, located = imaging.face_store(paths, pre, tmp_path / "images")
    crop = store[0]
    assert crop.shape == (150, 150, 3) and located.sources() == ["detected"]
    assert pre["face"]["fallback"] is not None  # a training call learns its fallback
    # the crop equals the full-resolution warp (the JPEG decoder's reduction is compensated exactly enough)
    full = faces.warp(imaging.load_image(paths[0]), located.transforms("chip", (150, 150))[0], (150, 150))
    assert np.abs(crop.astype(int) - full.astype(int)).mean() < 4
    plain = imaging.ImageStore(paths, (150, 150), None, tmp_path / "images")
    assert plain.key != store.key


def _portrait_set(root, astronaut_img, people: int = 6) -> None:
    """A training set in the competition layout whose photos are the astronaut placed anew per person."""
    rows = []
    for p in range(people):
        gender, age = ("female", 25 + 10 * p) if p % 2 else ("male", 20 + 9 * p)
        name = f"{p:06d}_{gender}_Asian_{age}"
        frame = place(astronaut_img, (170 + 8 * p, 170 + 6 * p), 0.8 + 0.05 * p, 3.0 * (p - 3), seed=p)[0]
        for kind in task.MASK_KINDS:
            _write(root / "train" / "images" / name / f"{kind}.jpg", frame)
        rows.append((f"{p:06d}", gender, "Asian", age, name))
    pd.DataFrame(rows, columns=["id", "gender", "race", "age", "path"]).to_csv(root / "train" / "train.csv", index=False)


def test_face_crop_trains_is_recorded_and_prediction_crops_alike(astronaut, tmp_path, single_thread):
    img, _ = astronaut
    _portrait_set(tmp_path / "data", img)
    args = [*TINY_TRAIN_ARGS, "--data_dir", str(tmp_path / "data" / "train"), "--model_dir", str(tmp_path / "runs"),
            "--epochs", "1", "--face_crop", "wide", "--resize", "40", "40", "--cache", "True",
            "--cache_dir", str(tmp_path / "cache")]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert train.main(args) == 0
    log = out.getvalue()
    assert "face stage: 42 images, face found in 42" in log, log[-2000:]
    (run,) = (tmp_path / "runs").iterdir()
    ckpt = load_checkpoint(run / "best_f1.pth")
    face = ckpt["preprocess"]["face"]
    assert face["geometry"] == "wide" and np.array(face["fallback"]).shape == (5, 2)
    assert json.loads((run / "config.json").read_text())["face_crop"] == "wide"
    # prediction: a face photo and a faceless frame, no flag repeated
    eval_dir = tmp_path / "eval"
    _write(eval_dir / "images" / "face.jpg", place(img, (210, 190), 0.9, -5.0, seed=9)[0])
    _write(eval_dir / "images" / "empty.jpg", place(np.zeros_like(img), (210, 190), 0.9, 0.0, seed=9)[0])
    pd.DataFrame({"ImageID": ["face.jpg", "empty.jpg"], "ans": [0, 0]}).to_csv(eval_dir / "info.csv", index=False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert inference.main(["--data_dir", str(eval_dir), "--model_dir", str(run), "--output_dir",
                               str(tmp_path / "out"), "--num_workers", "0", "--tracking_uri", "none"]) == 0
    assert "face found in 1, sitting's face used for 0, fallback crop for 1" in out.getvalue()
    probs = pd.read_csv(tmp_path / "out" / "output_probs.csv")
    assert probs["face"].tolist() == ["detected", "fallback"]
    assert probs.columns.tolist()[:2] == ["ImageID", "face"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert predict.main(["--model_dir", str(run), "--json", str(eval_dir / "images" / "empty.jpg"),
                             str(eval_dir / "images" / "face.jpg")]) == 0
    assert [r["face"] for r in json.loads(out.getvalue())["predictions"]] == ["fallback", "detected"]
    # the exported file expects crops and says how to make them
    assert "face stage" in export.describe_input(ckpt) and "wide" in export.describe_input(ckpt)
    # a resume cannot change what the network sees
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
        train.cli.run(lambda: train.main([*args, "--resume", str(run / "last.pth"), "--epochs", "2",
                                          "--face_crop", "chip"]))
    assert "--face_crop 'wide' there, 'chip' here" in err.getvalue()


def test_face_crop_refuses_an_augmentation_that_crops_the_frame(demo_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.cli.run(lambda: train.main([*TINY_TRAIN_ARGS, "--data_dir", str(demo_root / "train"), "--model_dir",
                                          str(tmp_path), "--face_crop", "chip", "--augmentation", "MyAugmentationCenter"]))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--face_crop chip cuts the face" in err and "MyAugmentationCenter" in err


def test_missing_detector_weights_say_how_to_install(monkeypatch):
    monkeypatch.setattr(faces.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(faces.FaceStageError, match="pip install facenet-pytorch==2.5.3"):
        faces.MTCNN()


def test_detector_runs_on_cuda_when_there_is_one(astronaut):
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    img, reference = astronaut
    face = faces.MTCNN(device="cuda").detect(img)[0]
    np.testing.assert_allclose(face.landmarks, reference, atol=2)
