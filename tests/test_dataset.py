"""Tests for dataset.py: labels, discovery and its errors, splits, datasets and
augmentations, BatchTransform, crops, the decoded-image cache and eval info."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dataset as data
import demo_data
from maskcls.cli import DataError
from maskcls.task import MASK_KINDS
from model import IMAGENET_MEAN, IMAGENET_STD
from maskcls import imaging
from maskcls import augment
from maskcls import loaders
from maskcls.task import TASK_CLASSES, age_label, decode_class, encode_class, task_target

SIZE = (40, 32)  # (H, W) requested from the datasets
N_PEOPLE = 18
KINDS = ("mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """One small synthetic dataset (18 people, 48x64 photos) shared by the module."""
    return demo_data.generate(tmp_path_factory.mktemp("demo") / "data", people=N_PEOPLE, size=(48, 64),
                              seed=5, eval_people=6)


@pytest.fixture(scope="module")
def samples(demo) -> list[data.Sample]:
    return data.discover(demo / "train", verbose=False)


def _copy_people(demo: Path, dest: Path, n: int = 2) -> Path:
    """Copy the first n person folders into dest/train/images; returns dest/train."""
    src = demo / "train" / "images"
    images = dest / "train" / "images"
    images.mkdir(parents=True)
    for person in sorted(p for p in src.iterdir() if p.is_dir())[:n]:
        shutil.copytree(person, images / person.name)
    return dest / "train"


def _people(train: Path) -> list[Path]:
    return sorted(p for p in (train / "images").iterdir() if p.is_dir())


def _expected_label(path: str) -> int:
    """18-class label worked out from the path text alone, independently of dataset.py."""
    p = Path(path)
    _, gender, _, age = p.parent.name.split("_")
    kind = p.stem
    mask = 0 if kind.startswith("mask") else 1 if kind == "incorrect_mask" else 2
    age = int(age)
    return mask * 6 + (3 if gender == "female" else 0) + (0 if age < 30 else 1 if age < 60 else 2)


def _fake_samples(per_stratum: int = 6) -> list[data.Sample]:
    """Image-free samples (splits never read pixels): per_stratum people in each gender-age cell."""
    ages = (20, 45, 65)
    out = []
    pid = 0
    for gender in (0, 1):
        for band in range(3):
            for _ in range(per_stratum):
                pid += 1
                person = f"{pid:06d}_{'female' if gender else 'male'}_Asian_{ages[band]}"
                for kind, mask in MASK_KINDS.items():
                    out.append(data.Sample(f"/x/{person}/{kind}.jpg", person, kind, mask, gender, ages[band]))
    return out


def _people_of(samples, idx) -> set[str]:
    return {samples[i].person for i in idx}


# --------------------------------------------------------------------------- labels
@pytest.mark.parametrize("age,bins,expected", [
    (29, (30, 60), 0), (30, (30, 60), 1), (59, (30, 60), 1), (60, (30, 60), 2),
    (29, (30, 58), 0), (30, (30, 58), 1), (57, (30, 58), 1), (58, (30, 58), 2),
    (59, (30, 58), 2), (60, (30, 58), 2), (18, (30, 58), 0),
])
def test_age_label_boundaries(age, bins, expected):
    assert age_label(age, bins) == expected


def test_age_label_default_bins():
    assert [age_label(a) for a in (29, 30, 59, 60)] == [0, 1, 1, 2]


def test_encode_decode_round_trip_all_18():
    seen = set()
    for label in range(18):
        m, g, a = decode_class(label)
        assert m in range(3) and g in range(2) and a in range(3)
        assert encode_class(m, g, a) == label
        seen.add((m, g, a))
    assert len(seen) == 18
    assert encode_class(2, 1, 2) == 17 and encode_class(1, 0, 1) == 7


@pytest.mark.parametrize("task,expected", [
    ("all", 2 * 6 + 1 * 3 + 1), ("mask", 2), ("genderage", 4), ("multi", (2, 1, 1)),
])
def test_task_target(task, expected):
    assert task_target(2, 1, 1, task) == expected


def test_task_target_unknown_lists_tasks():
    with pytest.raises(ValueError, match="genderage"):
        task_target(0, 0, 0, "gender")


def test_sample_target_uses_age_bins():
    s = data.Sample("/x/1_female_Asian_58/normal.jpg", "1_female_Asian_58", "normal", 2, 1, 58)
    assert s.label18() == 2 * 6 + 3 + 1
    assert s.label18((30, 58)) == 2 * 6 + 3 + 2
    assert s.target("genderage", (30, 58)) == 5


# --------------------------------------------------------------------------- discovery
def test_discover_accepts_train_and_images_dir(demo, samples, capsys):
    via_images = data.discover(demo / "train" / "images")
    out = capsys.readouterr().out
    assert [s.path for s in via_images] == [s.path for s in samples]
    assert len(samples) == N_PEOPLE * 7
    assert len({s.person for s in samples}) == N_PEOPLE
    assert f"{N_PEOPLE} people, {N_PEOPLE * 7} images" in out
    for s in samples:
        assert s.label18() == _expected_label(s.path)
    # the demo data holds every class; the summary's per-class counts must add up
    counts = [int(n) for n in re.findall(r"\b\d+:(\d+)", out)]
    assert len(counts) == 18 and sum(counts) == N_PEOPLE * 7 and min(counts) > 0


def test_discover_skips_hidden_and_non_image_files(demo, tmp_path, capsys):
    train = _copy_people(demo, tmp_path, 2)
    first, second = _people(train)
    (first / "._mask1.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble garbage")
    (first / ".DS_Store").write_bytes(b"Bud1 garbage")
    (second / "notes.txt").write_text("not an image")
    (train / "images" / ".DS_Store").write_bytes(b"Bud1")
    (train / "images" / ".hidden_dir").mkdir()
    for junk in ("__MACOSX", "@eaDir"):  # a zip made on a Mac, a Synology NAS
        (train / "images" / junk / first.name).mkdir(parents=True)
        (train / "images" / junk / first.name / "._mask1.jpg").write_bytes(b"\x00\x05\x16\x07")
    found = data.discover(train)
    out = capsys.readouterr().out
    assert len(found) == 14
    assert all(not Path(s.path).name.startswith(".") and Path(s.path).suffix == ".jpg" for s in found)
    assert "2 people, 14 images" in out
    assert re.search(r"\b2 hidden", out), out
    assert re.search(r"\b1 not a", out), out


def test_discover_accepts_mixed_case_extensions_and_png(demo, tmp_path):
    train = _copy_people(demo, tmp_path, 1)
    person = _people(train)[0]
    (person / "mask1.jpg").rename(person / "mask1.JPG")
    (person / "mask2.jpg").rename(person / "mask2.jpeg")
    (person / "mask3.jpg").rename(person / "mask3.JpEg")
    for kind, ext in (("normal", ".png"), ("incorrect_mask", ".PNG")):
        pixels = np.asarray(Image.open(person / f"{kind}.jpg").convert("RGB"))
        (person / f"{kind}.jpg").unlink()
        Image.fromarray(pixels).save(person / f"{kind}{ext}", format="PNG")
    found = data.discover(train, verbose=False)
    assert sorted(Path(s.path).name for s in found) == sorted(
        ["mask1.JPG", "mask2.jpeg", "mask3.JpEg", "mask4.jpg", "mask5.jpg", "normal.png", "incorrect_mask.PNG"])
    by_kind = {s.kind: s for s in found}
    assert by_kind["normal"].mask == 2 and by_kind["incorrect_mask"].mask == 1 and by_kind["mask1"].mask == 0
    store = imaging.ImageStore([s.path for s in found], SIZE)
    assert all(store[i].shape == (*SIZE, 3) for i in range(len(store)))


def test_discover_reads_kind_names_in_any_case(demo, tmp_path):
    """"Normal.JPG" is the normal photo (cameras, case-insensitive disks); a second spelling of one kind is an error."""
    train = _copy_people(demo, tmp_path, 1)
    person = _people(train)[0]
    (person / "normal.jpg").rename(person / "Normal.JPG")
    (person / "incorrect_mask.jpg").rename(person / "INCORRECT_MASK.jpg")
    by_kind = {s.kind: s for s in data.discover(train, verbose=False)}
    assert len(by_kind) == 7 and by_kind["normal"].mask == 2 and by_kind["incorrect_mask"].mask == 1
    assert Path(by_kind["normal"].path).name == "Normal.JPG"
    shutil.copy(person / "mask1.jpg", person / "Mask1.png")
    with pytest.raises(DataError, match="two files for 'mask1'"):
        data.discover(train, verbose=False)


def _rename_person(train: Path, new_name: str) -> Path:
    person = _people(train)[0]
    target = person.parent / new_name
    person.rename(target)
    return target


def _bad_folder(train):
    return _rename_person(train, "badname")


def _bad_gender(train):
    return _rename_person(train, "000001_robot_Asian_30")


def _bad_age(train):
    return _rename_person(train, "000001_male_Asian_thirty")


def _impossible_age(train):
    return _rename_person(train, "000001_male_Asian_300")


def _two_files(train):
    person = _people(train)[0]
    shutil.copy(person / "mask1.jpg", person / "mask1.png")
    return person / "mask1.png"


def _truncated(train):
    path = _people(train)[1] / "mask3.jpg"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def _garbage(train):
    path = _people(train)[0] / "mask2.jpg"
    path.write_bytes(os.urandom(64) + b"definitely not a jpeg")
    return path


@pytest.mark.parametrize("breaker", [_bad_folder, _bad_gender, _bad_age, _impossible_age, _two_files, _truncated,
                                     _garbage],
                         ids=["folder_name", "gender", "age", "impossible_age", "two_files", "truncated", "garbage"])
def test_discover_bad_input_raises_one_line_error_naming_path(demo, tmp_path, breaker):
    train = _copy_people(demo, tmp_path, 2)
    bad_path = breaker(train)
    with pytest.raises(DataError) as err:
        data.discover(train, verbose=False)
    message = str(err.value)
    assert str(bad_path) in message
    assert "\n" not in message


def test_discover_missing_and_empty_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=re.escape(str(missing))) as err:
        data.discover(missing, verbose=False)
    assert "\n" not in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=re.escape(str(empty))) as err:
        data.discover(empty, verbose=False)
    assert "\n" not in str(err.value)
    # only hidden entries still counts as empty
    (empty / ".DS_Store").write_bytes(b"x")
    (empty / ".trash").mkdir()
    with pytest.raises(DataError, match=re.escape(str(empty))):
        data.discover(empty, verbose=False)


def test_skip_bad_images_warns_and_drops(demo, tmp_path, capsys):
    train = _copy_people(demo, tmp_path, 2)
    truncated, garbage = _truncated(train), _garbage(train)
    with pytest.warns(UserWarning) as record:
        found = data.discover(train, skip_bad_images=True)
    messages = " ".join(str(w.message) for w in record)
    assert str(truncated) in messages and str(garbage) in messages
    paths = {s.path for s in found}
    assert len(found) == 12
    assert str(truncated) not in paths and str(garbage) not in paths
    assert "2 bad image" in capsys.readouterr().out


def test_person_missing_kinds_warns_not_raises(demo, tmp_path):
    train = _copy_people(demo, tmp_path, 2)
    person = _people(train)[1]
    (person / "normal.jpg").unlink()
    (person / "mask5.jpg").unlink()
    with pytest.warns(UserWarning, match=re.escape(person.name)) as record:
        found = data.discover(train, verbose=False)
    assert any("normal" in str(w.message) and "mask5" in str(w.message) for w in record)
    assert len(found) == 12
    assert {s.kind for s in found if s.person == person.name} == set(KINDS) - {"normal", "mask5"}


def test_check_image_accepts_good_and_rejects_bad(demo, tmp_path):
    good = next((demo / "train" / "images").glob("*/mask1.jpg"))
    assert imaging.check_image(good) is None
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert imaging.check_image(empty)
    png = tmp_path / "cut.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8) + 7).save(png)
    assert imaging.check_image(png) is None
    raw = png.read_bytes()
    png.write_bytes(raw[:-20])
    assert "PNG" in imaging.check_image(png)


def _bit_rot(path: Path) -> Path:
    """Damage a JPEG's Huffman table: the header and end marker stay whole, only decoding fails."""
    raw = bytearray(path.read_bytes())
    table = raw.index(b"\xff\xc4")
    raw[table + 5:table + 21] = bytes([0x00, 0xFF] * 8)
    path.write_bytes(bytes(raw))
    return path


def test_skip_bad_images_also_drops_what_only_decoding_finds(demo, tmp_path):
    """Bit rot inside a whole JPEG passes the cheap check; under --skip_bad_images discovery decodes
    each image, so such a file is dropped with the others rather than stopping training later."""
    train = _copy_people(demo, tmp_path, 2)
    rotten = _bit_rot(_people(train)[0] / "mask3.jpg")
    assert imaging.check_image(rotten) is None and imaging.check_image(rotten, decode=True) == "cannot decode image"
    with pytest.raises(DataError, match="cannot decode image"):
        imaging.load_image(rotten)
    with pytest.warns(UserWarning, match=re.escape(f"{rotten} (cannot decode image)")):
        found = data.discover(train, skip_bad_images=True, verbose=False)
    assert len(found) == 13 and str(rotten) not in {s.path for s in found}


def test_broken_link_is_a_bad_image_not_a_missing_kind(demo, tmp_path):
    train = _copy_people(demo, tmp_path, 2)
    link = _people(train)[0] / "mask2.jpg"
    link.unlink()
    link.symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(DataError, match=re.escape(f"broken symbolic link: {link}")):
        data.discover(train, verbose=False)
    with pytest.warns(UserWarning, match="broken symbolic link"):
        assert len(data.discover(train, skip_bad_images=True, verbose=False)) == 13


def test_check_image_takes_a_very_large_photo(tmp_path, monkeypatch, recwarn):
    """PIL calls anything over 179 megapixels a decompression bomb; a 200-megapixel phone photo is
    a photo (OpenCV decodes it). Simulated by lowering PIL's limit below a small image's size."""
    photo = tmp_path / "big.jpg"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(photo)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64 x 64 > 2 x 100: PIL would refuse it
    assert imaging.check_image(photo) is None and imaging.check_image(photo, decode=True) is None
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


# --------------------------------------------------------------------------- splits
def test_split_by_profile_exact_count_no_overlap():
    samples = _fake_samples(6)  # 36 people
    for ratio in (0.2, 0.25, 0.5, 0.1):
        train_idx, val_idx = data.split_by_profile(samples, ratio, seed=1)
        val_people, train_people = _people_of(samples, val_idx), _people_of(samples, train_idx)
        assert len(val_people) == round(36 * ratio)
        assert not val_people & train_people
        assert sorted(train_idx + val_idx) == list(range(len(samples)))
        assert len(val_idx) == 7 * len(val_people)  # whole people, all 7 images


def test_split_by_profile_deterministic_and_seed_dependent():
    samples = _fake_samples(6)
    a = data.split_by_profile(samples, 0.2, seed=3)
    assert data.split_by_profile(samples, 0.2, seed=3) == a
    others = [data.split_by_profile(samples, 0.2, seed=s)[1] for s in (4, 5, 6)]
    assert any(o != a[1] for o in others)


def test_split_by_profile_stratified():
    samples = _fake_samples(6)  # 6 strata x 6 people; 7 in val -> every stratum can be represented
    for seed in range(8):
        _, val_idx = data.split_by_profile(samples, 0.2, seed=seed)
        strata = {samples[i].gender * 3 + age_label(samples[i].age) for i in val_idx}
        assert strata == set(range(6)), seed


def test_split_by_profile_small_and_edge_cases(samples):
    train_idx, val_idx = data.split_by_profile(samples, 0.2, seed=0)  # 18 people: too few to stratify
    assert len(_people_of(samples, val_idx)) == round(N_PEOPLE * 0.2)
    assert not _people_of(samples, val_idx) & _people_of(samples, train_idx)
    train_idx, val_idx = data.split_by_profile(samples, 0.0, seed=0)
    assert val_idx == [] and len(train_idx) == len(samples)
    with pytest.raises(DataError):
        data.split_by_profile(samples, 1.0, seed=0)


def test_split_by_image_count_and_determinism():
    samples = _fake_samples(6)  # 252 images
    train_idx, val_idx = data.split_by_image(samples, 0.2, seed=0)
    assert len(val_idx) == round(252 * 0.2)
    assert sorted(train_idx + val_idx) == list(range(252))
    assert data.split_by_image(samples, 0.2, seed=0) == (train_idx, val_idx)
    assert data.split_by_image(samples, 0.2, seed=1)[1] != val_idx


def test_kfold_partitions_people():
    samples = _fake_samples(5)  # 30 people
    k = 5
    val_people_per_fold = []
    for fold in range(k):
        train_idx, val_idx = data.kfold_split(samples, k, fold, seed=0)
        tr, va = _people_of(samples, train_idx), _people_of(samples, val_idx)
        assert va and not tr & va
        assert sorted(train_idx + val_idx) == list(range(len(samples)))
        val_people_per_fold.append(va)
    everyone = [p for va in val_people_per_fold for p in va]
    assert len(everyone) == len(set(everyone)) == 30  # each person in exactly one val fold
    assert data.kfold_split(samples, k, 2, seed=0) == data.kfold_split(samples, k, 2, seed=0)
    with pytest.raises(ValueError):
        data.kfold_split(samples, k, k, seed=0)


def test_split_indices_dispatch():
    samples = _fake_samples(6)
    by_image = data.split_indices(samples, "MaskBaseDataset", 0.2, seed=2)
    assert by_image == data.split_by_image(samples, 0.2, 2)
    # the image split is the leaky one: people straddle train and val
    assert _people_of(samples, by_image[0]) & _people_of(samples, by_image[1])
    for name in ("MaskSplitByProfileDataset", "MaskSplitByProfileDatasetForAlbum",
                 "MaskSplitByProfileDatasetForAlbumOnlyMask"):
        by_person = data.split_indices(samples, name, 0.2, seed=2)
        assert by_person == data.split_by_profile(samples, 0.2, 2)
        assert not _people_of(samples, by_person[0]) & _people_of(samples, by_person[1])
    # K-fold is by person whatever the dataset name
    assert data.split_indices(samples, "MaskBaseDataset", 0.2, 2, kfold=5, fold=1) == \
        data.kfold_split(samples, 5, 1, 2)


def test_unknown_dataset_name_lists_known():
    with pytest.raises(ValueError) as err:
        data.split_indices(_fake_samples(1), "NoSuchDataset", 0.2, 0)
    assert "MaskBaseDataset" in str(err.value) and "MaskSplitByProfileDataset" in str(err.value)
    with pytest.raises(ValueError, match="inference"):
        data.dataset_spec("TestDataset")


def test_unknown_augmentation_lists_known():
    with pytest.raises(ValueError, match="BaseAugmentation"):
        data.create_augmentation("NoSuchAug")


# --------------------------------------------------------------------------- datasets
@pytest.mark.parametrize("name", list(data.DATASETS))
def test_every_dataset_name_builds(samples, name):
    spec = data.dataset_spec(name)
    task = spec["task"]
    train_idx, val_idx = data.split_indices(samples, name, 0.2, seed=0)
    store = imaging.ImageStore([s.path for s in samples], SIZE)
    aug = data.create_augmentation("FastAugmentation")
    train_set = data.MaskDataset(samples, store, train_idx, task, augmentation=aug, train=True)
    val_set = data.MaskDataset(samples, store, val_idx, task)
    assert len(train_set) + len(val_set) == len(samples)
    n_classes = TASK_CLASSES[task]
    for ds, idx in ((train_set, train_idx), (val_set, val_idx)):
        for i in (0, len(ds) - 1):
            img, target = ds[i]
            assert img.dtype == torch.uint8 and tuple(img.shape) == (3, *SIZE)
            assert isinstance(target, int) and 0 <= target < n_classes
        full = [_expected_label(samples[j].path) for j in idx]
        expected = {"all": full, "mask": [c // 6 for c in full], "genderage": [c % 6 for c in full]}[task]
        assert ds.targets == expected
        assert ds.labels18() == full


def test_multi_task_targets(samples):
    store = imaging.ImageStore([s.path for s in samples], SIZE)
    idx = list(range(0, len(samples), 5))
    ds = data.MaskDataset(samples, store, idx, "multi")
    img, target = ds[0]
    assert isinstance(target, torch.Tensor) and target.shape == (3,) and target.dtype == torch.int64
    assert tuple(target.tolist()) == decode_class(_expected_label(samples[idx[0]].path))
    batch_imgs, batch_targets = next(iter(loaders.make_loader(ds, batch_size=4)))
    assert batch_imgs.shape == (4, 3, *SIZE) and batch_targets.shape == (4, 3)
    assert batch_targets[:, 0].max() <= 2 and batch_targets[:, 1].max() <= 1 and batch_targets[:, 2].max() <= 2


def test_dataset_rejects_unknown_task(samples):
    with pytest.raises(ValueError, match="genderage"):
        data.MaskDataset(samples, imaging.ImageStore([], SIZE), [], "bogus")


def test_age_bins_reach_dataset_targets(samples):
    store = imaging.ImageStore([s.path for s in samples], SIZE)
    idx = list(range(len(samples)))
    for bins in ((30, 60), (30, 58), (25, 45)):
        ds = data.MaskDataset(samples, store, idx, "genderage", age_bins=bins)
        expected = [s.gender * 3 + (0 if s.age < bins[0] else 1 if s.age < bins[1] else 2) for s in samples]
        assert ds.targets == expected


@pytest.mark.parametrize("name", list(data.AUGMENTATIONS))
def test_every_augmentation_builds_and_yields_size(samples, name):
    aug = data.create_augmentation(name)
    assert aug.name == name
    sub = samples[:14]
    store = imaging.ImageStore([s.path for s in sub], SIZE, aug.crop)
    idx = list(range(len(sub)))
    train_set = data.MaskDataset(sub, store, idx, augmentation=aug, train=True, seed=0)
    val_set = data.MaskDataset(sub, store, idx, augmentation=aug, train=False)
    for i in range(0, len(sub), 3):
        for ds in (train_set, val_set):
            img, target = ds[i]
            assert img.dtype == torch.uint8 and tuple(img.shape) == (3, *SIZE)
            assert target == _expected_label(sub[i].path)
        # validation is never augmented: exactly the deterministic preprocessing
        assert torch.equal(val_set[i][0], torch.from_numpy(store.decode(i)).permute(2, 0, 1))


@pytest.mark.parametrize("name", ["FastAugmentation", "ErasingAugmentation", "StrongAugmentation", "GoodAugmentation"])
def test_train_augmentation_reproducible_per_epoch(samples, name):
    sub = samples[:14]
    aug = data.create_augmentation(name)
    assert aug.is_random
    store = imaging.ImageStore([s.path for s in sub], SIZE, aug.crop)
    idx = list(range(len(sub)))

    def read(epoch: int, seed: int = 0) -> torch.Tensor:
        ds = data.MaskDataset(sub, store, idx, augmentation=data.create_augmentation(name), train=True, seed=seed)
        ds.set_epoch(epoch)
        return torch.stack([ds[i][0] for i in idx])

    e0 = read(0)
    assert torch.equal(e0, read(0))  # same (seed, epoch): identical, even from a fresh dataset
    assert not torch.equal(e0, read(1))  # a new epoch draws new augmentations
    assert not torch.equal(e0, read(0, seed=1))
    plain = torch.stack([torch.from_numpy(store.decode(i)).permute(2, 0, 1) for i in idx])
    assert not torch.equal(e0, plain)  # the augmentation actually did something


def test_rotation_turns_the_image_about_its_centre():
    """`rotate` alone (no shift or scale): a bright dot right of the centre moves on a circle around it."""
    img = np.zeros((41, 41, 3), np.uint8)
    img[20, 35] = 255  # 15 px right of the centre (20, 20)
    aug = augment.Augmentation("rot", shift_scale=(0.0, 0.0), rotate=90.0)
    angles = []
    for seed in range(20):
        out = aug.cpu_transform(img, np.random.default_rng(seed))
        y, x = np.unravel_index(out[..., 0].argmax(), out.shape[:2])
        assert abs(np.hypot(y - 20, x - 20) - 15) <= 1.5  # same distance from the centre
        angles.append(np.degrees(np.arctan2(20 - y, x - 20)))  # counter-clockwise, as cv2 turns
    assert max(np.abs(angles)) <= 90 + 5 and np.ptp(angles) > 45  # within +-rotate, and really varied


def test_random_erase_replaces_one_rectangle_only():
    """One axis-aligned rectangle of 2-33% of the image changes; the rest and the input stay as they were."""
    img = np.full((40, 60, 3), 7, np.uint8)
    fractions = []
    for seed in range(50):
        out = augment.random_erase(img, np.random.default_rng(seed))
        assert out.shape == img.shape and out.dtype == np.uint8
        changed = (out != 7).any(axis=2)
        rows, cols = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
        box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        assert changed.sum() >= 0.95 * box  # one filled rectangle (a random pixel may equal 7)
        fractions.append(box / changed.size)
    assert (img == 7).all()  # the caller's image is not written to
    assert 0.015 <= min(fractions) and max(fractions) <= 0.34 and np.ptp(fractions) > 0.1


def test_erasing_augmentation_erases_about_half_the_images():
    import dataclasses

    # its colour jitter off, which would change every pixel
    aug = dataclasses.replace(data.create_augmentation("ErasingAugmentation"), jitter=(0, 0, 0, 0))
    img = np.full((32, 32, 3), 7, np.uint8)
    rng = np.random.default_rng(0)
    erased = [(aug.cpu_transform(img, rng) != 7).any(axis=2).mean() > 0.015 for _ in range(400)]
    assert 0.4 < np.mean(erased) < 0.6


def test_validation_ignores_random_augmentation(samples):
    sub = samples[:7]
    store = imaging.ImageStore([s.path for s in sub], SIZE)
    ds = data.MaskDataset(sub, store, range(7), augmentation=data.create_augmentation("GoodAugmentation"),
                          train=False)
    first = [ds[i][0] for i in range(7)]
    ds.set_epoch(3)
    for i in range(7):
        assert torch.equal(first[i], ds[i][0])
        assert torch.equal(first[i], torch.from_numpy(store.decode(i)).permute(2, 0, 1))


# --------------------------------------------------------------------------- BatchTransform
def _uint8_batch(n: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 16, 12), generator=g, dtype=torch.uint8)


def test_batch_transform_eval_is_plain_normalisation():
    x = _uint8_batch()
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    bt = augment.BatchTransform(mean, std, noise_std=0.2)
    out = bt(x.clone(), train=False)
    expected = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.equal(bt(x.clone(), train=False), out)  # deterministic
    noisy = bt(x.clone(), train=True)  # the noise only in training
    assert not torch.allclose(noisy, out, atol=1e-3) and abs(float((noisy - out).std()) - 0.2) < 0.03


def test_colour_jitter_runs_per_sample_in_training_only():
    rng_img = np.random.default_rng(0)
    img = rng_img.integers(0, 256, (16, 12, 3), dtype=np.uint8)
    for jitter in ((0.3, 0, 0, 0), (0, 0.3, 0, 0), (0, 0, 0.3, 0), (0, 0, 0, 0.1), (0.2, 0.2, 0.2, 0.05)):
        aug = augment.Augmentation("j", jitter=jitter)
        assert aug.is_random
        out = aug.cpu_transform(img, np.random.default_rng(1))
        assert out.dtype == np.uint8 and out.shape == img.shape and not np.array_equal(out, img), jitter
        assert np.array_equal(aug.cpu_transform(img, np.random.default_rng(1)), out)  # the sample's rng decides
    # through the dataset: training images are jittered, validation images never
    store = imaging.ImageStore([], (16, 12))
    store.decode = lambda index: img.copy()
    store.paths = ["a.jpg"]
    samples = [data.Sample("a.jpg", "p0", "mask1", 0, 0, 20)]
    aug = augment.Augmentation("j", jitter=(0.3, 0.3, 0.3, 0.1))
    train = data.MaskDataset(samples, store, [0], "all", augmentation=aug, train=True)
    val = data.MaskDataset(samples, store, [0], "all", augmentation=aug, train=False)
    assert not np.array_equal(train[0][0].permute(1, 2, 0).numpy(), img)
    assert np.array_equal(val[0][0].permute(1, 2, 0).numpy(), img)


def test_colour_jitter_keeps_grey_and_strength_zero_is_identity():
    # saturation and hue jitter must leave grey pixels grey (they act on colour only)
    grey = np.full((4, 4, 3), 128, dtype=np.uint8)
    for seed in range(5):
        out = augment.jitter_colours(grey, (0, 0, 0.5, 0.2), np.random.default_rng(seed))
        assert np.abs(out.astype(int) - 128).max() <= 1
    img = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert np.array_equal(augment.jitter_colours(img, (0, 0, 0, 0), np.random.default_rng(0)), img)


# --------------------------------------------------------------------------- crops
def test_crop_box_scales_with_resolution():
    # 384x512 photo (W x H): the reference frame itself
    assert imaging.crop_box(512, 384, ("center", 256, 256)) == (128, 64, 256, 256)
    assert imaging.crop_box(512, 384, ("bust", 384, 384)) == (64, 0, 384, 384)
    assert imaging.crop_box(512, 384, ("center", 320, 256)) == (96, 64, 320, 256)
    # 96x128 photo: a quarter of the size, the same part of the frame
    assert imaging.crop_box(128, 96, ("center", 256, 256)) == (32, 16, 64, 64)
    assert imaging.crop_box(128, 96, ("bust", 384, 384)) == (16, 0, 96, 96)
    assert imaging.crop_box(128, 96, None) == (0, 0, 128, 96)
    with pytest.raises(ValueError):
        imaging.crop_box(128, 96, ("middle", 10, 10))


def test_preprocess_shape_and_crop_content():
    img = np.zeros((128, 96, 3), np.uint8)
    img[32:96, 16:80] = 200  # exactly the centre-256 region of a 96x128 photo
    out = imaging.preprocess(img, SIZE, ("center", 256, 256))
    assert out.shape == (*SIZE, 3) and out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]
    assert (out == 200).all()
    full = imaging.preprocess(img, SIZE)
    assert full.shape == (*SIZE, 3) and (full == 0).any()
    same = imaging.preprocess(img, (128, 96))
    assert np.array_equal(same, img)


# --------------------------------------------------------------------------- cache
def test_cache_fill_finalize_and_warm_hit(samples, tmp_path):
    paths = [s.path for s in samples[:21]]
    cache = tmp_path / "cache"
    store = imaging.ImageStore(paths, SIZE, ("center", 320, 256), cache_dir=cache)
    assert not store.is_complete()
    first = [store[i] for i in range(10)]
    assert store.finalize() is False  # not every row filled yet
    store.fill()
    assert store.finalize() is True and store.is_complete()

    plain = imaging.ImageStore(paths, SIZE, ("center", 320, 256))
    warm = imaging.ImageStore(paths, SIZE, ("center", 320, 256), cache_dir=cache)
    assert warm.key == store.key and warm.is_complete()

    def no_decode(index):
        raise AssertionError("a complete cache must not decode")

    warm.decode = no_decode
    for i in range(len(paths)):
        expected = plain[i]
        assert expected.shape == (*SIZE, 3)
        assert np.array_equal(warm[i], expected)
    for i in range(10):
        assert np.array_equal(first[i], plain[i])
    # the returned array is a private copy: writing into it must not touch the cache
    row = warm[0]
    row[:] = 0
    assert np.array_equal(warm[0], plain[0])
    # a different working size or crop is a different cache
    assert imaging.ImageStore(paths, (20, 16), None, cache_dir=cache).key != store.key
    assert imaging.ImageStore(paths, SIZE, None, cache_dir=cache).key != store.key


def test_cache_key_changes_with_mtime(samples, tmp_path):
    src = [Path(s.path) for s in samples[:3]]
    paths = []
    for i, p in enumerate(src):
        dst = tmp_path / f"img{i}.jpg"
        shutil.copy(p, dst)
        paths.append(str(dst))
    cache = tmp_path / "cache"
    store = imaging.ImageStore(paths, SIZE, cache_dir=cache)
    store.fill()
    assert store.finalize()
    st = os.stat(paths[1])
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    touched = imaging.ImageStore(paths, SIZE, cache_dir=cache)
    assert touched.key != store.key and not touched.is_complete()
    # replacing the file's content is picked up, not served stale from the old cache
    Image.fromarray(np.full((64, 48, 3), 255, np.uint8)).save(paths[1], format="JPEG")
    fresh = imaging.ImageStore(paths, SIZE, cache_dir=cache)
    assert fresh[1].min() > 240


def test_cache_filled_by_dataloader_workers(samples, tmp_path):
    sub = samples[:28]
    paths = [s.path for s in sub]
    cache = tmp_path / "cache"
    store = imaging.ImageStore(paths, SIZE, cache_dir=cache)
    ds = data.MaskDataset(sub, store, range(len(sub)))
    loader = loaders.make_loader(ds, batch_size=5, num_workers=2)
    got = torch.cat([imgs for imgs, _ in loader])
    assert got.shape == (28, 3, *SIZE)
    assert store.finalize() is True  # every row was written by the workers
    plain = imaging.ImageStore(paths, SIZE)
    warm = imaging.ImageStore(paths, SIZE, cache_dir=cache)
    assert warm.is_complete()
    for i in range(len(paths)):
        expected = plain[i]
        assert np.array_equal(warm[i], expected)
        assert torch.equal(got[i], torch.from_numpy(expected).permute(2, 0, 1))


def test_check_image_accepts_jpeg_with_data_after_the_end_marker(demo, tmp_path):
    # Phones append trailers after a JPEG's end marker (Samsung's SEFT block, a motion photo's video):
    # the image is whole and decodes; only a stream that never reaches the marker is truncated.
    raw = next((demo / "train" / "images").glob("*/mask1.jpg")).read_bytes()
    for name, tail in (("samsung", b"SEFH" + os.urandom(200) + b"SEFT"), ("padded", b"\x00" * 4096),
                       ("video", os.urandom(20000))):
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(raw + tail)
        assert imaging.check_image(path) is None, name
        assert imaging.ImageStore([str(path)], SIZE)[0].shape == (*SIZE, 3)
    cut = tmp_path / "cut.jpg"
    for n in (len(raw) // 3, len(raw) - 2):
        for filler in (b"", b"\x00" * (len(raw) - n), os.urandom(64).replace(b"\xff", b"\x00")):
            cut.write_bytes(raw[:n] + filler)  # a crashed copy, possibly zero-filled to full size
            assert "truncated JPEG" in imaging.check_image(cut)


def test_check_image_accepts_png_with_data_after_iend_and_refuses_a_cut_one(demo, tmp_path):
    photo = Image.open(next((demo / "train" / "images").glob("*/mask1.jpg")))
    whole = tmp_path / "whole.png"
    photo.save(whole)
    raw = whole.read_bytes()
    for name, tail in (("padded", b"\x00" * 4096), ("trailer", os.urandom(300))):
        path = tmp_path / f"{name}.png"
        path.write_bytes(raw + tail)
        assert imaging.check_image(path) is None, name
        assert np.array_equal(imaging.load_image(path), imaging.load_image(whole))
    cut = tmp_path / "cut.png"
    for n in (len(raw) // 2, len(raw) - 16):  # inside the image data; inside the last data chunk's CRC
        for filler in (b"", b"\x00" * 64):
            cut.write_bytes(raw[:n] + filler)
            assert "truncated PNG" in imaging.check_image(cut), (n, len(filler))


def test_check_image_catches_a_truncated_multi_picture_jpeg(demo, tmp_path):
    # Phones save multi-picture JPEGs (PIL: "MPO") as .jpg; cut inside its first picture, OpenCV
    # would decode a grey-filled image without an error.
    photo = Image.open(next((demo / "train" / "images").glob("*/mask1.jpg")))
    path = tmp_path / "phone.jpg"
    photo.save(path, format="MPO", save_all=True, append_images=[photo.resize((24, 32))])
    assert Image.open(path).format == "MPO" and imaging.check_image(path) is None
    raw = path.read_bytes()
    path.write_bytes(raw[: raw.index(b"\xff\xda") + 100])  # inside the first picture's image data
    assert Image.open(path).format == "MPO" and "truncated JPEG" in imaging.check_image(path)


# --------------------------------------------------------------------------- eval info
def test_read_eval_info_row_order_and_test_dataset(demo):
    info, paths = data.read_eval_info(demo / "eval")
    rows = (demo / "eval" / "info.csv").read_text().splitlines()[1:]
    ids = [r.split(",")[0] for r in rows]
    assert list(info["ImageID"]) == ids and len(ids) == 6 * 7
    assert [Path(p).name for p in paths] == ids
    assert ids != sorted(ids)  # the demo's rows are shuffled, so order really is preserved
    ds = data.TestDataset(imaging.ImageStore(paths, SIZE))
    assert len(ds) == len(ids)
    img, i = ds[5]
    assert i == 5 and img.dtype == torch.uint8 and tuple(img.shape) == (3, *SIZE)


def test_read_eval_info_errors(demo, tmp_path):
    eval_dir = tmp_path / "eval"
    shutil.copytree(demo / "eval", eval_dir)
    info, paths = data.read_eval_info(eval_dir)
    gone = Path(paths[3])
    gone.unlink()
    with pytest.raises(DataError) as err:
        data.read_eval_info(eval_dir)
    assert str(gone) in str(err.value) and "\n" not in str(err.value)
    assert "extension" not in str(err.value)  # no hint when nothing else is there

    ids = [Path(p).name for p in paths]  # ImageIDs written without the extension: name the file they meant
    (eval_dir / "info.csv").write_text("ImageID,ans\n" + "".join(f"{Path(i).stem},0\n" for i in ids[4:7]))
    with pytest.raises(DataError) as err:
        data.read_eval_info(eval_dir)
    assert str(err.value).endswith(f"(an ImageID names the file with its extension: {Path(ids[4]).stem!r} is "
                                   f"{ids[4]!r} in images/)"), err.value

    (eval_dir / "info.csv").write_text("")
    with pytest.raises(DataError, match="info.csv"):
        data.read_eval_info(eval_dir)
    (eval_dir / "info.csv").write_text("ImageID,ans\n")
    with pytest.raises(DataError, match="info.csv"):
        data.read_eval_info(eval_dir)
    (eval_dir / "info.csv").unlink()
    with pytest.raises(DataError, match=re.escape(str(eval_dir / "info.csv"))):
        data.read_eval_info(eval_dir)


def test_read_eval_info_reads_ids_as_written(demo, tmp_path):
    eval_dir = tmp_path / "eval"
    shutil.copytree(demo / "eval", eval_dir)
    ids = [line.split(",")[0] for line in (eval_dir / "info.csv").read_text().splitlines()[1:]]
    for odd in ("0012", "NA"):  # not the number 12, not a missing value
        shutil.copy(eval_dir / "images" / ids[0], eval_dir / "images" / odd)
    rows = [f" {ids[0]} , 0", f"{ids[1]},0", "0012,0", "NA,0"]
    (eval_dir / "info.csv").write_bytes(("\ufeffImageID , ans\r\n" + "\r\n".join(rows) + "\r\n").encode())
    info, paths = data.read_eval_info(eval_dir)
    assert list(info["ImageID"]) == [ids[0], ids[1], "0012", "NA"]
    assert paths == [str(eval_dir / "images" / i) for i in info["ImageID"]]
    # a trailing comma on every row (but not the header) must not turn ImageID into pandas' index
    (eval_dir / "info.csv").write_text("ImageID,ans\n" + "".join(f"{i},0,\n" for i in ids[:3]))
    with pytest.warns(Warning, match="header"):  # pandas' ParserWarning about the extra cells
        info, _ = data.read_eval_info(eval_dir)
    assert list(info["ImageID"]) == ids[:3]


@pytest.mark.parametrize("content, expected", [
    ("ImageID,ans\na.jpg,0\nb.jpg,0\na.jpg,0\n", "more than once ('a.jpg')"),
    ("ImageID,ans\na.jpg,0\n ,0\n", "1 empty ImageID"),
    (b"ImageID,ans\ncaf\xe9.jpg,0\n", "UnicodeDecodeError"),
    ("ImageID,ans\r\n".encode("utf-16"), "UnicodeDecodeError"),
    ("ImageID,ans\na.jpg,0\nb.jpg,0,x,y\n", "ParserError"),
], ids=["duplicate", "empty_id", "latin1", "utf16", "ragged"])
def test_read_eval_info_bad_csv_is_one_line_error(tmp_path, content, expected):
    (tmp_path / "images").mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / name)
    info = tmp_path / "info.csv"
    info.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as err:
        data.read_eval_info(tmp_path)
    message = str(err.value)
    assert expected in message and str(info) in message and "\n" not in message


def test_read_eval_info_finds_a_name_stored_in_another_unicode_form(tmp_path):
    """info.csv writes Hangul composed (NFC); unzipped from a Mac the file is decomposed (NFD)."""
    import unicodedata

    composed = "사진 1.jpg"
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / unicodedata.normalize("NFD", composed))
    (tmp_path / "info.csv").write_text(f"ImageID,ans\n{composed},0\n", encoding="utf-8")
    info, paths = data.read_eval_info(tmp_path)
    assert list(info["ImageID"]) == [composed]  # output.csv keeps the ID as info.csv wrote it
    assert os.path.isfile(paths[0]) and Path(paths[0]).name == unicodedata.normalize("NFD", composed)


# --------------------------------------------------------------------------- messages (issue 18 item 5)
def test_data_error_is_a_toolkit_error():
    from maskcls import cli

    assert issubclass(DataError, cli.ToolkitError) and issubclass(DataError, ValueError)


def test_data_dir_that_is_a_file_says_what_to_pass(demo):
    csv_file = demo / "train" / "train.csv"
    with pytest.raises(DataError) as err:
        data.discover(csv_file, verbose=False)
    message = str(err.value)
    assert "not found" not in message and "is a file" in message
    assert str(csv_file) in message and f"e.g. {csv_file.parent})" in message and "\n" not in message
    photo = next((demo / "train" / "images").glob("*/mask1.jpg"))  # one photo: the training folder, not its person's
    with pytest.raises(DataError, match=re.escape(f"e.g. {demo / 'train'})")):
        data.discover(photo, verbose=False)


def test_data_dir_one_level_too_high_names_the_training_folder(demo):
    """The dataset's root (train/, eval/, gt/) used to fail on eval/ as a badly named person folder."""
    with pytest.raises(DataError, match=re.escape(f"pass its training folder: --data_dir {demo / 'train'}")):
        data.discover(demo, verbose=False)
    with pytest.raises(DataError, match=re.escape(f"e.g. {demo / 'train'})")):  # not gt/, which holds no images
        data.discover(demo / "gt" / "gt.csv", verbose=False)


def test_read_eval_info_accepts_the_info_csv_itself(demo):
    from_folder = data.read_eval_info(demo / "eval")
    from_file = data.read_eval_info(demo / "eval" / "info.csv")
    assert from_file[1] == from_folder[1] and from_file[0].equals(from_folder[0])


def test_many_incomplete_people_are_one_short_warning(demo, tmp_path):
    train = _copy_people(demo, tmp_path, 8)
    for person in _people(train):
        (person / "normal.jpg").unlink()
    with pytest.warns(UserWarning) as record:
        found = data.discover(train, verbose=False)
    assert len(found) == 8 * 6
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert messages[0].startswith("8 incomplete person(s)") and messages[0].endswith("and 5 more")
    assert sum(p.name in messages[0] for p in _people(train)) == 3


# --------------------------------------------------------------------------- loader workers (issue 17)
class _WorkerSignals(torch.utils.data.Dataset):
    """Each item: the worker's SIGTERM and SIGINT dispositions, and what the chained init set."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        import signal

        return (int(signal.getsignal(signal.SIGTERM) == signal.SIG_IGN),
                int(signal.getsignal(signal.SIGINT) == signal.SIG_IGN), int(os.environ.get("CHAINED_INIT", "0")))


def _mark_init(worker_id: int) -> None:
    os.environ["CHAINED_INIT"] = "1"


def test_loader_workers_leave_termination_signals_to_the_main_process():
    import signal

    before = signal.getsignal(signal.SIGTERM)
    loader = loaders.make_loader(_WorkerSignals(), batch_size=2, num_workers=1, worker_init_fn=_mark_init)
    term, intr, chained = next(iter(loader))
    assert term.tolist() == [1, 1] and intr.tolist() == [1, 1]  # the workers ignore both
    assert chained.tolist() == [1, 1]  # and the caller's worker_init_fn still ran
    assert signal.getsignal(signal.SIGTERM) == before  # the main process is untouched
    del loader


def test_load_image_pil_fallback_turns_exif_rotated_photos_upright(tmp_path, monkeypatch):
    """When OpenCV cannot open a file (a GIF, a non-ASCII path on Windows), PIL's result is as upright as OpenCV's."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white: rotation moves it
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    upright = imaging.load_image(path)
    assert upright.shape == (40, 20, 3)  # torchvision applies the EXIF orientation
    monkeypatch.setattr(imaging, "decode_jpeg_rgb", lambda path: None)
    opencv = imaging.load_image(path)
    assert np.array_equal(opencv, upright)  # and so does OpenCV, to the same pixels
    monkeypatch.setattr(imaging.cv2, "imread", lambda *a, **k: None)
    fallback = imaging.load_image(path)
    assert fallback.shape == upright.shape and np.abs(fallback.astype(int) - upright).mean() < 3


def test_jpeg_decoders_agree_and_other_files_take_the_opencv_way(tmp_path):
    """The fast torchvision decoder gives OpenCV's pixels for colour, grey and progressive JPEGs, and
    steps aside (None) for a PNG, a PNG named .jpg, a missing file and a truncated JPEG header."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (48, 32, 3), dtype=np.uint8)
    cases = {"colour.jpg": (Image.fromarray(rgb), {}), "grey.jpg": (Image.fromarray(rgb).convert("L"), {}),
             "progressive.jpg": (Image.fromarray(rgb), {"progressive": True})}
    for name, (im, options) in cases.items():
        im.save(tmp_path / name, quality=90, **options)
        fast = imaging.decode_jpeg_rgb(tmp_path / name)
        assert fast.shape == (48, 32, 3) and fast.dtype == np.uint8 and fast.flags.c_contiguous
        assert np.array_equal(fast, imaging.cv2.imread(str(tmp_path / name), imaging.cv2.IMREAD_COLOR)[..., ::-1]), name
    Image.fromarray(rgb).save(tmp_path / "a.png")
    (tmp_path / "png-named.jpg").write_bytes((tmp_path / "a.png").read_bytes())
    (tmp_path / "header-only.jpg").write_bytes((tmp_path / "colour.jpg").read_bytes()[:40])
    for name in ("a.png", "png-named.jpg", "missing.jpg", "header-only.jpg"):
        assert imaging.decode_jpeg_rgb(tmp_path / name) is None, name
    assert np.array_equal(imaging.load_image(tmp_path / "png-named.jpg"), rgb)  # OpenCV reads it by content


def test_a_torchvision_without_image_decoders_leaves_decoding_to_opencv(tmp_path, monkeypatch):
    """torchvision 0.29 deprecates torchvision.io's decoders; once they are gone, images still load."""
    import sys

    rgb = np.random.default_rng(0).integers(0, 256, (48, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=90)
    before = imaging.load_image(tmp_path / "a.jpg")
    monkeypatch.setitem(sys.modules, "torchvision.io", None)  # `from torchvision.io import ...` now fails
    assert imaging.decode_jpeg_rgb(tmp_path / "a.jpg") is None
    assert np.array_equal(imaging.load_image(tmp_path / "a.jpg"), before)
    store = imaging.ImageStore([str(tmp_path / "a.jpg")], (24, 16))
    assert store.decode(0).shape == (24, 16, 3)


def test_close_loaders_stops_persistent_workers_now():
    """Workers ignore SIGTERM, so they must be shut down by the loader, not left to interpreter exit."""
    loader = loaders.make_loader(torch.utils.data.TensorDataset(torch.arange(8)), batch_size=4, num_workers=1)
    assert [b[0].tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    workers = list(loader._iterator._workers)
    assert workers and all(w.is_alive() for w in workers)  # persistent: alive between epochs
    loaders.close_loaders(loader, None)
    assert loader._iterator is None and not any(w.is_alive() for w in workers)
    assert [b[0].tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # usable again
    loaders.close_loaders(loader)
