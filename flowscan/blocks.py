"""Block rules: which block each prunable tensor belongs to (docs/definitions.md).

A rule is a preset name, `LABEL=REGEX`, or `REGEX` (label = first capture group, else the whole
match). Rules are tried in order, the first match wins, and unmatched tensors go to `(other)`.
Presets may compute labels from all of a run's names (open_lth CIFAR ResNets number residual
blocks flat, and the stage depends on the depth).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from flowscan.errors import FlowscanError

OTHER = "(other)"

Labeler = Callable[[Sequence[str]], list["str | None"]]


@dataclass(frozen=True)
class RegexRule:
    label: str | None
    pattern: re.Pattern

    def labels(self, names: Sequence[str]) -> list[str | None]:
        out = []
        for name in names:
            m = self.pattern.search(name)
            if m is None:
                out.append(None)
            elif self.label is not None:
                out.append(self.label)
            else:  # the first capture group, or the whole match when there is none
                out.append(m.group(1) if m.re.groups and m.group(1) is not None else m.group(0))
        return out

    def __str__(self) -> str:
        return f"{self.label}={self.pattern.pattern}" if self.label else self.pattern.pattern


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    labeler: Labeler

    def labels(self, names: Sequence[str]) -> list[str | None]:
        return self.labeler(names)

    def __str__(self) -> str:
        return self.name


def _regex_preset(*rules: str) -> Labeler:
    return lambda names: first_match([parse_rule(r) for r in rules], names)


_OPENLTH_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _openlth_cifar(per_block: bool) -> Labeler:
    def labeler(names: Sequence[str]) -> list[str | None]:
        indices = [int(m.group(1)) for n in names if (m := _OPENLTH_BLOCK.match(n))]
        per_stage = max(1, -(-(max(indices) + 1) // 3)) if indices else 1  # D = (depth - 2) / 6
        out: list[str | None] = []
        for name in names:
            if m := _OPENLTH_BLOCK.match(name):
                i = int(m.group(1))
                stage = f"stage{i // per_stage + 1}"
                out.append(f"{stage}.block{i % per_stage + 1}" if per_block else stage)
            elif name.startswith("conv."):
                out.append("stem")
            elif name.startswith("fc."):
                out.append("fc")
            else:
                out.append(None)
        return out
    return labeler


_BERT_LAYER = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")
_bert_other = _regex_preset(r"embeddings=(^|\.)embeddings\.", r"pooler=(^|\.)pooler\.",
                            r"classifier=^(classifier|cls|qa_outputs)\.")


def _bert_layers(names: Sequence[str]) -> list[str | None]:
    layers = [f"layer{m.group(1)}" if (m := _BERT_LAYER.search(n)) else None for n in names]
    return [lab if lab is not None else other for lab, other in zip(layers, _bert_other(names))]


_FLAX_BLOCK = re.compile(r"^((?:Bottleneck)?ResNetBlock)_(\d+)\.")
# Flax ResNets number their residual blocks flat (flax's ImageNet example); the stage sizes of
# the standard depths, by the number of blocks.
FLAX_RESNET_STAGES = {8: (2, 2, 2, 2), 16: (3, 4, 6, 3), 33: (3, 4, 23, 3), 50: (3, 8, 36, 3)}


def _flax_resnet(per_block: bool) -> Labeler:
    def labeler(names: Sequence[str]) -> list[str | None]:
        indices = {int(m.group(2)) for n in names if (m := _FLAX_BLOCK.match(n))}
        sizes = FLAX_RESNET_STAGES.get(len(indices)) if indices == set(range(len(indices))) else None
        stage_of = [s + 1 for s, size in enumerate(sizes or ()) for _ in range(size)]
        out: list[str | None] = []
        for name in names:
            if m := _FLAX_BLOCK.match(name):
                i = int(m.group(2))
                if per_block:
                    out.append(f"{m.group(1)}_{i}")
                else:   # blocks of an unknown depth match nothing: better (other) than a wrong stage
                    out.append(f"stage{stage_of[i]}" if stage_of else None)
            elif re.match(r"^(conv_init|bn_init)\.", name):
                out.append("stem")
            elif re.match(r"^Dense_\d+\.", name):
                out.append("fc")
            else:
                out.append(None)
        return out
    return labeler


_LEAF = re.compile(r"\.(weight|kernel)$")   # torch calls a layer's matrix weight, Flax and Keras kernel


def _per_tensor(names: Sequence[str]) -> list[str | None]:
    """One rule for every reader: the tensor's module, without its leaf (`fc1.weight`, `Dense_0.kernel`)."""
    return [_LEAF.sub("", n) for n in names]


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("resnet-stages", "torchvision ResNets: stem, layer1..layer4, fc",
           _regex_preset(r"stem=^(conv1|bn1)\.", r"^(layer\d+)\.", r"fc=^fc\.")),
    Preset("resnet-blocks", "torchvision ResNets, one block per residual block: layer1.0, layer1.1, ...",
           _regex_preset(r"stem=^(conv1|bn1)\.", r"^(layer\d+\.\d+)\.", r"fc=^fc\.")),
    Preset("openlth-cifar-stages", "open_lth CIFAR ResNets: stem, stage1..3 (stage = i // ((depth-2)/6)), fc",
           _openlth_cifar(per_block=False)),
    Preset("openlth-cifar-blocks", "open_lth CIFAR ResNets, one block per residual block: stage1.block1, ...",
           _openlth_cifar(per_block=True)),
    Preset("bert-layers", "BERT: embeddings, layer0..layer11 (encoder.layer.N), pooler, classifier",
           _bert_layers),
    Preset("keras-resnet-stages", "Keras applications ResNets: stem (conv1_*), conv2..conv5, fc (predictions)",
           _regex_preset(r"stem=^conv1_", r"^(conv\d+)_block\d+_", r"fc=^(predictions|fc\d*)\.")),
    Preset("keras-resnet-blocks", "Keras applications ResNets, one block per residual block: conv2_block1, ...",
           _regex_preset(r"stem=^conv1_", r"^(conv\d+_block\d+)_", r"fc=^(predictions|fc\d*)\.")),
    Preset("flax-resnet-stages", "Flax ResNets (ResNetBlock_N numbered flat; depths 18/34/50/101/152): "
           "stem, stage1..4, fc", _flax_resnet(per_block=False)),
    Preset("flax-resnet-blocks", "Flax ResNets, one block per residual block: ResNetBlock_0, ...",
           _flax_resnet(per_block=True)),
    Preset("per-tensor", "one block per tensor, labelled by its module (the name without '.weight' or '.kernel')",
           _per_tensor),
)}


_PRESET_LIKE = re.compile(r"[a-z]+(-[a-z0-9]+)+")


def parse_rule(text: str) -> RegexRule | Preset:
    """A preset name, LABEL=REGEX, or REGEX. A word-hyphen-word value that is no preset is an
    error: it is far likelier a misspelt preset than a regex for tensor names."""
    if text in PRESETS:
        return PRESETS[text]
    if _PRESET_LIKE.fullmatch(text):
        close = difflib.get_close_matches(text, list(PRESETS), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise FlowscanError(f"--blocks {text!r}: no such preset; {hint}(presets: {', '.join(PRESETS)}; "
                            f"to match names with this regular expression, write {text}={text})")
    label, sep, regex = text.partition("=")
    # '=' also occurs inside regexes ((?=...), (?P=...)): only a plain word before it is a label.
    if not sep or not re.fullmatch(r"[\w.\-/ ]+", label):
        label, regex = None, text
    try:
        return RegexRule(label, re.compile(regex))
    except re.error as exc:
        raise FlowscanError(f"--blocks {text!r}: invalid regular expression: {exc}") from None


def first_match(rules: Sequence[RegexRule | Preset], names: Sequence[str]) -> list[str | None]:
    labels: list[str | None] = [None] * len(names)
    for rule in rules:
        pending = [i for i, lab in enumerate(labels) if lab is None]
        if not pending:
            break
        for i, lab in zip(pending, rule.labels([names[i] for i in pending])):
            labels[i] = lab
    return labels


@dataclass(frozen=True)
class BlockRules:
    """Parsed --blocks values; empty means: detect a preset from the names."""

    rules: tuple[RegexRule | Preset, ...] = ()

    @classmethod
    def parse(cls, values: Sequence[str]) -> "BlockRules":
        return cls(tuple(parse_rule(v) for v in values))

    def resolve(self, names: Sequence[str]) -> tuple[list[str], str]:
        """A label for every name, and a description of the rules used."""
        rules = self.rules or (detect_preset(names),)
        labels = first_match(rules, names)
        description = " ".join(str(r) for r in rules) + (" (auto-detected)" if not self.rules else "")
        return [lab if lab is not None else OTHER for lab in labels], description

    def __str__(self) -> str:
        return " ".join(str(r) for r in self.rules) or "auto"

    def warnings(self, names: Sequence[str], labels: Sequence[str], n_params: Sequence[int]) -> list[str]:
        """What a user should hear about the grouping: rules that match no tensor, and a
        result where most prunable parameters fall into `(other)`."""
        out = [f"block rule {str(rule)!r} matches no prunable tensor" for rule in self.rules
               if not any(label is not None for label in rule.labels(names))]
        total = sum(n_params)
        other = sum(n for n, label in zip(n_params, labels) if label == OTHER)
        if total and other / total > 0.5:
            out.append(f"{other / total:.0%} of the prunable parameters match no block rule and are in "
                       f"{OTHER}; see `flowscan inspect` and --blocks")
        return out


def detect_preset(names: Sequence[str]) -> Preset:
    """A preset that fits the names, else one block per tensor."""
    def share(pattern: str) -> float:
        rx = re.compile(pattern)
        return sum(bool(rx.search(n)) for n in names) / max(len(names), 1)

    if share(r"(?:^|\.)encoder\.layer\.\d+\.") > 0.5:
        return PRESETS["bert-layers"]
    if share(r"^layer\d+\.\d+\.") > 0.5:
        return PRESETS["resnet-stages"]
    if share(r"^blocks\.\d+\.") > 0.5:
        return PRESETS["openlth-cifar-stages"]
    if share(r"^conv\d+_block\d+_") > 0.5:
        return PRESETS["keras-resnet-stages"]
    if share(r"^(Bottleneck)?ResNetBlock_\d+\.") > 0.5:
        return PRESETS["flax-resnet-stages"]
    return PRESETS["per-tensor"]
