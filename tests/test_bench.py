"""bench.py smoke test: tiny settings, the final JSON line has every required number."""
import json
import math

import bench
from model import IMAGENET_MEAN, IMAGENET_STD
from maskcls import imaging
from maskcls import augment
from maskcls import loaders


def test_bench_main_prints_table_and_final_json(capsys):
    result = bench.main(["--n", "6", "--resize", "24", "20", "--model", "SmallCNN", "--batch_size", "4",
                         "--warm_epochs", "1", "--train_steps", "1", "--num_workers", "1", "--device", "cpu",
                         "--loop_steps", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert "reference" in "\n".join(lines[:-1]) and "cold" in "\n".join(lines[:-1])  # the table comes first
    final = json.loads(lines[-1])  # the LAST line is one JSON object
    for key in bench.REQUIRED_KEYS:
        assert key in final, key
    for key in ("reference_ips", "cold_ips", "warm_ips", "cold_ratio", "warm_ratio", "train_ips", "infer_ips",
                "infer_eager_ips"):
        assert isinstance(final[key], (int, float)) and final[key] > 0 and math.isfinite(final[key]), key
    assert final["resize"] == [24, 20] and final["model"] == "SmallCNN" and final["device"] == "cpu"
    # the ratios are toolkit / reference with num_workers 0 for both
    assert final["ratio_num_workers"] == 0
    assert final["cold_ratio"] == round(result["cold_ips"] / result["reference_ips"], 2)
    assert final["warm_ratio"] == round(result["warm_ips"] / result["reference_ips"], 2)
    assert result["cold_ips"] == result["pipeline"]["0"]["cold_ips"]
    # both worker settings measured; the cold epoch decoded every image once (workers included),
    # a second run on the completed cache decoded none
    assert set(final["pipeline"]) == {"0", "1"}
    for setting in final["pipeline"].values():
        assert setting["cold_decodes"] == 6 and setting["second_run_decodes"] == 0
        assert setting["cache_complete_before_second_run"] is True
        assert all(setting[k] > 0 for k in ("reference_ips", "cold_ips", "warm_ips", "second_run_ips"))
    # train_ips / infer_ips are the rows train.py and inference.py use by default here, marked in the table
    from maskcls.runtime import default_amp
    import torch

    assert not default_amp(torch.device("cpu"))  # bf16 cost F1 on a CPU (docs/results.md): fp32 there
    assert result["train_default"] == "train_fp32_channels_last_ips"
    assert result["infer_default"] == "infer_channels_last_ips"  # fp32 on a CPU, as inference.py runs there
    assert result["train_ips"] == result[result["train_default"]] and result["infer_ips"] == result[result["infer_default"]]
    table = "\n".join(lines[:-1])
    assert table.count("<- default") == 2
    # bf16 autocast on a CPU without native bf16 is emulated (~10x slower): the table says so
    from maskcls.runtime import slow_amp_warning

    assert final["amp_emulated"] is (slow_amp_warning(torch.device("cpu")) is not None)
    assert ("AMP bfloat16 (emulated), channels_last" in table) is final["amp_emulated"]
    # the training-loop comparison: warm cache and decoding, for each worker count
    assert {k for k in final if k.startswith("loop_")} == {"loop_cache_w0_ips", "loop_cache_w1_ips",
                                                           "loop_decode_w0_ips", "loop_decode_w1_ips"}


def test_make_images_are_384x512_jpegs(tmp_path):
    from PIL import Image

    paths = bench.make_images(tmp_path, 2, seed=1)
    assert len(paths) == 2
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.size == (384, 512)
    # deterministic for a seed: same bytes
    again = bench.make_images(tmp_path / "again", 2, seed=1)
    assert [open(p, "rb").read() for p in paths] == [open(p, "rb").read() for p in again]


# ------------------------------------------------ the pipeline speed-ups bench.py measures keep behaviour
def test_batch_transform_chunks_match_the_plain_formula():
    import torch

    import dataset as data

    # 3x200x200 images: the CPU path works in chunks of a few images, so chunk edges are crossed
    images = torch.randint(0, 256, (10, 3, 200, 200), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    expected = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    for channels_last in (False, True):
        bt = augment.BatchTransform(mean, std, channels_last=channels_last)
        for train in (False, True):  # no noise: training is the same normalisation
            out = bt(images, train=train)
            assert torch.allclose(out, expected, atol=1e-5)
            assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert bt(images[:0]).shape == (0, 3, 200, 200)


def test_uint8_colour_jitter_matches_the_float_formula():
    """The one-pass OpenCV jitter is the straightforward float formula (3x3 colour matrix plus the
    contrast offset from the image's mean, clipped), rounded to uint8."""
    import numpy as np

    import dataset as data

    img = np.random.default_rng(0).integers(0, 256, (60, 50, 3), dtype=np.uint8)
    for seed in range(5):
        out = augment.jitter_colours(img, (0.3, 0.3, 0.3, 0.1), np.random.default_rng(seed))
        matrix, offset_weight = augment.colour_jitter_matrix((0.3, 0.3, 0.3, 0.1), np.random.default_rng(seed))
        x = img.reshape(-1, 3).astype(np.float64)
        expected = (x @ matrix.T + offset_weight @ x.mean(axis=0)).clip(0, 255).reshape(img.shape)
        assert out.dtype == np.uint8 and out.shape == img.shape
        error = np.abs(out - expected)
        assert error.max() < 1 and error.mean() < 0.3  # rounding (of float32 arithmetic) only
        assert not np.array_equal(out, img)


def test_collate_matches_default_collate_in_and_out_of_workers(tmp_path):
    import numpy as np
    import torch
    from torch.utils.data import default_collate

    import dataset as data

    rng = np.random.default_rng(0)
    batch = [(torch.from_numpy(rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)).permute(2, 0, 1), i, torch.tensor((i, 1, 2)))
             for i in range(4)]
    got, want = loaders.collate(batch), default_collate(batch)
    assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(got, want))
    assert got[0].is_contiguous()
    # anything else falls back to default_collate
    assert torch.equal(loaders.collate([torch.ones(2), torch.zeros(2)]), torch.stack([torch.ones(2), torch.zeros(2)]))

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return batch[i][0], i

    loader = loaders.make_loader(Images(), batch_size=4, num_workers=1)
    images, labels = next(iter(loader))
    assert torch.equal(images, want[0]) and labels.tolist() == [0, 1, 2, 3]


def test_jpeg_reduction_never_upsamples(tmp_path):
    import numpy as np
    from PIL import Image

    import dataset as data

    img = np.random.default_rng(0).integers(0, 256, (512, 384, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.jpg", quality=90)
    Image.fromarray(img).save(tmp_path / "p.jpg", quality=90, progressive=True)
    Image.fromarray(img).save(tmp_path / "a.png")
    exif = Image.Exif()
    exif[0x010E] = "x" * 5000  # a long APP1 segment before the frame header
    Image.fromarray(img).save(tmp_path / "e.jpg", quality=90, exif=exif)
    for name in ("a.jpg", "p.jpg", "e.jpg"):
        assert imaging.jpeg_size(tmp_path / name) == (384, 512)
        assert imaging.jpeg_size(imaging.read_bytes(tmp_path / name)) == (384, 512)  # the bytes, read once
    raw = imaging.read_bytes(tmp_path / "e.jpg")
    for cut in (1, 2, 3, 4, 6, 100, 5000):  # cut before the frame header: no size, no exception
        assert imaging.jpeg_size(raw[:cut]) is None, cut
    assert imaging.jpeg_size(tmp_path / "missing.jpg") is None and imaging.read_bytes(tmp_path / "missing.jpg") is None
    assert imaging.jpeg_size(tmp_path / "a.png") is None and imaging.jpeg_reduction(tmp_path / "a.png", (96, 72)) == 1
    assert imaging.jpeg_reduction(tmp_path / "a.jpg", (224, 224)) == 1  # 192 wide at 1/2: too narrow
    assert imaging.jpeg_reduction(tmp_path / "a.jpg", (256, 192)) == 2
    assert imaging.jpeg_reduction(tmp_path / "a.jpg", (128, 96)) == 4
    assert imaging.jpeg_reduction(tmp_path / "a.jpg", (64, 48)) == 8
    # with a crop, what counts is the cropped region: centre 256x256 of the frame, 1/4 is 64x64
    assert imaging.jpeg_reduction(tmp_path / "a.jpg", (64, 64), ("center", 256, 256)) == 4
    assert imaging.jpeg_reduction(tmp_path / "a.jpg", (65, 64), ("center", 256, 256)) == 2
    # a reduced decode gives the requested size and nearly the same pixels as a full decode
    store = imaging.ImageStore([str(tmp_path / "a.jpg")], (128, 96))
    reduced, full = store.decode(0), imaging.preprocess(imaging.load_image(tmp_path / "a.jpg"), (128, 96))
    assert reduced.shape == full.shape == (128, 96, 3)
    smooth = np.full((512, 384, 3), 90, np.uint8)
    smooth[:, 192:] = 200  # two flat halves: both decodes must agree away from the edge
    Image.fromarray(smooth).save(tmp_path / "s.jpg", quality=95)
    out = imaging.ImageStore([str(tmp_path / "s.jpg")], (128, 96)).decode(0).astype(int)
    assert abs(out[:, :40] - 90).max() <= 3 and abs(out[:, 56:] - 200).max() <= 3


def test_hflip_is_a_mirror():
    import numpy as np

    import dataset as data

    img = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    aug = augment.Augmentation("t", hflip=1.0)
    out = aug.cpu_transform(img, np.random.default_rng(0))
    assert np.array_equal(out, img[:, ::-1]) and out.flags["C_CONTIGUOUS"]


def test_bad_flags_are_one_line_before_any_work(tmp_path, capsys):
    """Typos and impossible numbers: `error: ...` and exit 2 via cli, with a did-you-mean; no
    traceback after images were generated (issue 18 item 2); no issue number in --help (item 6)."""
    from maskcls import cli

    cases = {("--model", "resnet18"): "unknown --model 'resnet18'; known: ", ("--batch_size", "0"): "--batch_size must",
             ("--n", "-1"): "--n must be >= 0", ("--data_dir", str(tmp_path / "nope")): "--data_dir not found",
             ("--device", "gpu0"): "unknown --device 'gpu0'",
             ("--n", "0"): "--n 0 (every image) needs --data_dir; to generate images give --n >= 1",
             ("--model", "SmallCNN", "--freeze_blocks", "2"): "model SmallCNN has no --freeze_blocks"}
    for argv, fragment in cases.items():
        code = cli.call(lambda: bench.main([*argv, "--num_workers", "0"]))
        captured = capsys.readouterr()
        assert code == 2, argv
        assert captured.err.startswith(f"error: {fragment}") and captured.err.count("\n") == 1, captured.err
        assert "generating" not in captured.err
    cli.call(lambda: bench.main(["--model", "resnet18"]))
    assert "(did you mean 'ResNet18'?)" in capsys.readouterr().err
    assert "issue" not in bench.build_parser().format_help().lower()


def test_bench_times_a_frozen_stem_side_by_side(capsys):
    """--freeze_blocks N adds train.py's frozen-stem step next to the others (not a default, so unmarked)."""
    result = bench.main(["--n", "4", "--resize", "32", "32", "--model", "EfficientNetLite0", "--batch_size", "2",
                         "--warm_epochs", "0", "--train_steps", "0", "--num_workers", "0", "--device", "cpu",
                         "--loop_steps", "0", "--freeze_blocks", "2"])
    out = capsys.readouterr().out
    assert result[bench.FREEZE_VARIANT] > 0 and result["freeze_blocks"] == 2
    row = next(line for line in out.splitlines() if "--freeze_blocks 2" in line)
    assert "<- default" not in row
    assert bench.FREEZE_VARIANT in json.loads(out.strip().splitlines()[-1])


def test_bench_serve_loads_a_served_model_and_checks_every_answer(trained_run, capsys):
    """--serve: the run's model served on 127.0.0.1 by `mlflow models serve`, bounded concurrent requests,
    every answer checked against inference.py, the server stopped afterwards."""
    result = bench.main(["--serve", str(trained_run), "--clients", "2", "--seconds", "3", "--images", "2"])
    assert result["problems"] == [] and result["alive_after"] and result["requests"] >= 3, result
    assert set(result["by_case"]) == {"good", "bad image", "no image column"}
    assert result["p50_ms"] > 0 and result["p99_ms"] >= result["p50_ms"]
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["requests_per_s"] == result["requests_per_s"]
    import urllib.request  # the server is gone: its port answers nothing now
    try:
        urllib.request.urlopen(result["url"] + "/ping", timeout=2)
        assert False, "the server still answers"
    except OSError:
        pass
