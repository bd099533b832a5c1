"""Models of other IMP code bases, with their exact parameter names, so their archives load as they are.

- open_lth's zoo, under open_lth's own names: `mnist_lenet_N1[_N2...]` (fc_layers.i, fc),
  `cifar_resnet_D[_W]` (conv, bn, blocks.i.{conv1,bn1,conv2,bn2,shortcut.0,shortcut.1}, fc) and
  `cifar_vgg_{11,13,16,19}` (layers.i.{conv,bn} with the pooling layers counted in i, fc).
- Chen et al.'s CIFAR ResNets (CV_LTH_Pre-training models/resnet.py): torchvision names with a 3x3
  stride-1 stem and no max-pool: `cifar-resnet18`, `cifar-resnet34`, `cifar-resnet50`.

`infer_model` names the model a state dict was saved from, by its tensor names and shapes.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from flowscan.train.models import BasicBlock, Bottleneck, ResNet


class OpenLTHLeNet(nn.Module):
    def __init__(self, plan: list[int], n_classes: int, n_inputs: int = 784):
        super().__init__()
        sizes = [n_inputs, *plan]
        self.fc_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.fc = nn.Linear(sizes[-1], n_classes)

    def forward(self, x):
        x = torch.flatten(x, 1)
        for layer in self.fc_layers:
            x = F.relu(layer(x))
        return self.fc(x)


class OpenLTHBlock(nn.Module):
    def __init__(self, f_in: int, f_out: int, downsample: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(f_in, f_out, 3, 2 if downsample else 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(f_out)
        self.conv2 = nn.Conv2d(f_out, f_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(f_out)
        if downsample or f_in != f_out:
            self.shortcut = nn.Sequential(nn.Conv2d(f_in, f_out, 1, 2, bias=False), nn.BatchNorm2d(f_out))
        else:
            self.shortcut = nn.Sequential()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class OpenLTHResNet(nn.Module):
    def __init__(self, plan: list[tuple[int, int]], n_classes: int):
        super().__init__()
        filters = plan[0][0]
        self.conv = nn.Conv2d(3, filters, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(filters)
        blocks = []
        for segment, (width, count) in enumerate(plan):
            for b in range(count):
                blocks.append(OpenLTHBlock(filters, width, segment > 0 and b == 0))
                filters = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(plan[-1][0], n_classes)

    def forward(self, x):
        out = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.avg_pool2d(out, out.shape[3]), 1))


class OpenLTHConvModule(nn.Module):
    def __init__(self, f_in: int, f_out: int):
        super().__init__()
        self.conv = nn.Conv2d(f_in, f_out, 3, padding=1)
        self.bn = nn.BatchNorm2d(f_out)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


VGG_PLANS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


class OpenLTHVGG(nn.Module):
    def __init__(self, plan: list, n_classes: int):
        super().__init__()
        layers, filters = [], 3
        for spec in plan:
            if spec == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(OpenLTHConvModule(filters, spec))
                filters = spec
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, n_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.avg_pool2d(self.layers(x), 2), 1))


_LENET = re.compile(r"^mnist_lenet((?:_\d+)+)$")
_RESNET = re.compile(r"^cifar_resnet_(\d+)(?:_(\d+))?$")
_VGG = re.compile(r"^cifar_vgg_(\d+)$")
_CHEN = {"cifar-resnet18": (BasicBlock, [2, 2, 2, 2]), "cifar-resnet34": (BasicBlock, [3, 4, 6, 3]),
         "cifar-resnet50": (Bottleneck, [3, 4, 6, 3])}
# the scanner's block preset and the prunable weights of each family (open_lth prunes every conv and
# linear weight but those in pruning_layers_to_ignore; Chen et al. skip conv1 and fc)
FAMILIES = {"lenet": (r"(fc_layers\.\d+|fc)\.weight$", "per-tensor"),
            "resnet": (r"(conv\d?|shortcut\.0|fc)\.weight$", "openlth-cifar-stages"),
            "vgg": (r"(layers\.\d+\.conv|fc)\.weight$", "per-tensor"),
            "chen": (r"(conv\d|downsample\.0)\.weight$", "resnet-stages")}


def names() -> list[str]:
    return ["mnist_lenet_N1[_N2...]", "cifar_resnet_D[_W]", "cifar_vgg_{11,13,16,19}", *_CHEN]


def family(name: str) -> str | None:
    if _LENET.match(name):
        return "lenet"
    if _RESNET.match(name):
        return "resnet"
    if _VGG.match(name):
        return "vgg"
    return "chen" if name in _CHEN else None


def build(name: str, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """The model called `name` (see the module docstring); ValueError for other names."""
    if m := _LENET.match(name):
        return OpenLTHLeNet([int(n) for n in m.group(1).split("_")[1:]], n_classes,
                            int(torch.tensor(input_shape).prod()))
    if m := _RESNET.match(name):
        depth, width = int(m.group(1)), int(m.group(2) or 16)
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"{name}: open_lth ResNet depth must be 6n+2 (8, 14, 20, 32, 56, ...)")
        d = (depth - 2) // 6
        return OpenLTHResNet([(width, d), (2 * width, d), (4 * width, d)], n_classes)
    if m := _VGG.match(name):
        if int(m.group(1)) not in VGG_PLANS:
            raise ValueError(f"{name}: open_lth VGG depth must be 11, 13, 16 or 19")
        return OpenLTHVGG(VGG_PLANS[int(m.group(1))], n_classes)
    if name in _CHEN:
        block, depths = _CHEN[name]
        return ResNet(block, depths, [64, 128, 256, 512], input_shape[0], n_classes, cifar=True)
    raise ValueError(f"unknown model {name!r}")


def infer_model(shapes: dict[str, tuple[int, ...]]) -> tuple[str, int] | None:
    """(model name, number of classes) of the zoo model whose parameters these are, or None.

    Decided by names and shapes alone: the hidden widths of a LeNet, depth and width of an open_lth
    ResNet (blocks per segment and the stem's filters), the convolutions of a VGG, and the blocks
    per stage and block type of a CIFAR-stem torchvision ResNet."""
    fc = shapes.get("fc.weight")
    if fc is None or len(fc) != 2:
        return None
    classes = fc[0]
    hidden = [shapes[f"fc_layers.{i}.weight"] for i in range(len(shapes)) if f"fc_layers.{i}.weight" in shapes]
    if hidden:
        return "mnist_lenet_" + "_".join(str(s[0]) for s in hidden), classes
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"^blocks\.(\d+)\.conv1\.weight$", k))}
    if blocks and "conv.weight" in shapes:
        if len(blocks) % 3:
            return None
        width = shapes["conv.weight"][0]
        return f"cifar_resnet_{6 * (len(blocks) // 3) + 2}" + ("" if width == 16 else f"_{width}"), classes
    convs = sum(1 for k in shapes if re.match(r"^layers\.\d+\.conv\.weight$", k))
    if convs:
        depth = {8: 11, 10: 13, 13: 16, 16: 19}.get(convs)
        return (f"cifar_vgg_{depth}", classes) if depth else None
    stem = shapes.get("conv1.weight")
    if stem is not None and tuple(stem[2:]) == (3, 3) and "layer4.0.conv1.weight" in shapes:
        per_stage = [len({int(m.group(1)) for k in shapes if (m := re.match(rf"^layer{s}\.(\d+)\.conv1\.weight$", k))})
                     for s in range(1, 5)]
        bottleneck = "layer1.0.conv3.weight" in shapes
        for name, (block, depths) in _CHEN.items():
            if depths == per_stage and (block is Bottleneck) == bottleneck:
                return name, classes
    return None
