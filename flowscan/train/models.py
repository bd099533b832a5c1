"""Models with the parameter names the scanner's presets expect.

CIFAR ResNet-14/20/32/44/56 and ResNet-18/50 use torchvision's names (conv1, bn1, layer1.0.conv1,
..., downsample.0, fc: preset `resnet-stages`); the BERT-style encoder uses Hugging Face names
(bert.embeddings..., bert.encoder.layer.N..., bert.pooler.dense, classifier: `bert-layers`).
No torchvision needed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = None
        if stride != 1 or cin != width:
            self.downsample = nn.Sequential(nn.Conv2d(cin, width, 1, stride, bias=False), nn.BatchNorm2d(width))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        out = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or cin != out:
            self.downsample = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (self.downsample(x) if self.downsample is not None else x))


class ResNet(nn.Module):
    """torchvision-named ResNet; `cifar=True` gives the 3x3 stem of He et al.'s CIFAR ResNets."""

    def __init__(self, block, depths, widths, in_channels: int, n_classes: int, cifar: bool):
        super().__init__()
        stem = widths[0]
        if cifar:
            self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.maxpool = nn.Identity() if cifar else nn.MaxPool2d(3, 2, 1)
        cin = stem
        for i, (depth, width) in enumerate(zip(depths, widths), start=1):
            blocks = []
            for j in range(depth):
                blocks.append(block(cin, width, 2 if (j == 0 and i > 1) else 1))
                cin = width * block.expansion
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.n_stages = len(depths)
        self.fc = nn.Linear(cin, n_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for i in range(1, self.n_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class LeNet(nn.Module):
    def __init__(self, in_channels: int, n_classes: int, size: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        flat = 16 * (((size // 2) - 4) // 2) ** 2
        self.fc1 = nn.Linear(flat, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, n_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class MLP(nn.Module):
    def __init__(self, n_inputs: int, n_classes: int, hidden=(300, 100)):
        super().__init__()
        sizes = [n_inputs, *hidden, n_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        x = torch.flatten(x, 1)
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class BertSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))

    def forward(self, x, pad):
        b, n, h = x.shape
        split = lambda t: t.view(b, n, self.heads, h // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                             attn_mask=pad)
        return out.transpose(1, 2).reshape(b, n, h)


class BertLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, inter: int):
        super().__init__()
        self.attention = nn.Module()
        self.attention.self = BertSelfAttention(hidden, heads)
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(hidden, hidden)
        self.attention.output.LayerNorm = nn.LayerNorm(hidden)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(hidden, inter)
        self.output = nn.Module()
        self.output.dense = nn.Linear(inter, hidden)
        self.output.LayerNorm = nn.LayerNorm(hidden)

    def forward(self, x, pad):
        x = self.attention.output.LayerNorm(x + self.attention.output.dense(self.attention.self(x, pad)))
        y = self.output.dense(F.gelu(self.intermediate.dense(x)))
        return self.output.LayerNorm(x + y)


class BertForSequenceClassification(nn.Module):
    """A small BERT-style encoder (token 0 is padding) with a [CLS]-pooler classifier."""

    def __init__(self, vocab: int, n_classes: int, hidden=64, layers=4, heads=4, inter=128, max_len=128):
        super().__init__()
        self.bert = nn.Module()
        emb = self.bert.embeddings = nn.Module()
        emb.word_embeddings = nn.Embedding(vocab, hidden, padding_idx=0)
        emb.position_embeddings = nn.Embedding(max_len, hidden)
        emb.LayerNorm = nn.LayerNorm(hidden)
        self.bert.encoder = nn.Module()
        self.bert.encoder.layer = nn.ModuleList(BertLayer(hidden, heads, inter) for _ in range(layers))
        self.bert.pooler = nn.Module()
        self.bert.pooler.dense = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, tokens):
        emb = self.bert.embeddings
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = emb.LayerNorm(emb.word_embeddings(tokens) + emb.position_embeddings(positions))
        pad = (tokens != 0)[:, None, None, :]  # attend to real tokens only
        for layer in self.bert.encoder.layer:
            x = layer(x, pad)
        return self.classifier(torch.tanh(self.bert.pooler.dense(x[:, 0])))


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[..., nn.Module]       # (input_shape, n_classes) -> module
    prunable: str                         # regex on parameter names (weights of 2+ dims only)
    kind: str = "image"                   # "image" or "tokens"
    preset: str = "per-tensor"            # the scanner's block preset for its names


def _cifar_resnet(depth: int):
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    return lambda shape, classes: ResNet(BasicBlock, [n] * 3, [16, 32, 64], shape[0], classes, cifar=True)


# open_lth prunes every conv and linear weight of its CIFAR ResNets; Chen et al. skip conv1 and fc
# (use --exclude '^(conv1|fc)\.' for that).
_CONV_LINEAR = r"(conv\d*|downsample\.0|fc)\.weight$"
MODELS: dict[str, ModelSpec] = {
    **{f"cifar-resnet{d}": ModelSpec(_cifar_resnet(d), _CONV_LINEAR, preset="resnet-stages")
       for d in (14, 20, 32, 44, 56)},
    "resnet18": ModelSpec(lambda s, c: ResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], s[0], c, False),
                          _CONV_LINEAR, preset="resnet-stages"),
    "resnet50": ModelSpec(lambda s, c: ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], s[0], c, False),
                          _CONV_LINEAR, preset="resnet-stages"),
    "lenet": ModelSpec(lambda s, c: LeNet(s[0], c, s[-1]), r"(conv|fc)\d\.weight$"),
    "mlp": ModelSpec(lambda s, c: MLP(math.prod(s), c), r"layers\.\d+\.weight$"),
    # Chen et al.'s BERT tickets: every encoder linear and the pooler, not embeddings or classifier
    "bert-small": ModelSpec(lambda s, c: BertForSequenceClassification(s[1], c, max_len=max(s[0], 8)),
                            r"^bert\.(encoder\.layer\.\d+\..*dense|encoder\.layer\.\d+\.attention\.self\.\w+|"
                            r"pooler\.dense)\.weight$", kind="tokens", preset="bert-layers"),
}


def build(name: str, input_shape: tuple[int, ...], n_classes: int) -> tuple[nn.Module, ModelSpec]:
    """flowscan's models by name, and the models of other code bases under their own names (zoo.py)."""
    from flowscan.train import zoo

    if name in MODELS:
        spec = MODELS[name]
        return spec.build(input_shape, n_classes), spec
    family = zoo.family(name)
    if family is None:
        raise ValueError(f"unknown model {name!r}; known: {', '.join([*MODELS, *zoo.names()])}")
    prunable, preset = zoo.FAMILIES[family]
    spec = ModelSpec(lambda shape, classes: zoo.build(name, shape, classes), prunable, preset=preset)
    return spec.build(input_shape, n_classes), spec


def prunable_names(model: nn.Module, spec: ModelSpec, exclude: str | None = None) -> list[str]:
    rx = re.compile(spec.prunable)
    ex = re.compile(exclude) if exclude else None
    return [n for n, p in model.named_parameters()
            if p.dim() >= 2 and rx.search(n) and not (ex and ex.search(n))]
