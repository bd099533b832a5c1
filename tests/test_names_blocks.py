"""Canonical names, mask pairing, round numbering and block rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flowscan.blocks import BlockRules, detect_preset
from flowscan.errors import FlowscanError, ScanError
from flowscan.readers.base import NameOptions, RawRound
from flowscan.readers.names import canonical, pair
from flowscan.readers.numbering import as_rounds, numbered_groups


def _raw(tensors, masks=None):
    return RawRound({k: np.asarray(v) for k, v in tensors.items()}, Path("w.pt"),
                    {k: np.asarray(v) for k, v in masks.items()} if masks else None, Path("m.pt") if masks else None)


def test_prune_style_pairs_weight_orig_with_weight_mask():
    refs = pair(_raw({"module.conv.weight_orig": np.ones((2, 2)), "module.conv.weight_mask": np.eye(2),
                      "module.conv.bias": np.ones(2), "module.attn.causal_mask": np.ones(3)}), NameOptions())
    by_name = {r.name: r for r in refs}
    assert list(by_name) == ["conv.weight", "conv.bias", "attn.causal_mask"]
    np.testing.assert_array_equal(by_name["conv.weight"].mask, np.eye(2))
    assert by_name["attn.causal_mask"].mask is None  # a *_mask with no matching weight is a tensor


def test_open_lth_checkpoint_mask_buffers():
    refs = pair(_raw({"model.blocks.0.conv1.weight": np.ones(3), "mask_blocks___0___conv1___weight": np.ones(3)}),
                NameOptions(strip_model_prefix=True))
    assert [(r.name, r.mask is not None) for r in refs] == [("blocks.0.conv1.weight", True)]


def test_separate_mask_file_keys_with_or_without_suffix_and_module_prefix():
    refs = pair(_raw({"a.weight": np.ones(2), "b.weight": np.ones(2)},
                     {"module.a.weight": np.ones(2), "b.weight_mask": np.zeros(2)}), NameOptions())
    assert [r.mask_path for r in refs] == [Path("m.pt"), Path("m.pt")]


def test_unmatched_or_misshapen_masks_are_errors_naming_both_files():
    with pytest.raises(ScanError, match="m.pt: tensor 'c.weight': mask 'c.weight' has no matching weight in w.pt"):
        pair(_raw({"a.weight": np.ones(2)}, {"c.weight": np.ones(2)}), NameOptions())
    with pytest.raises(ScanError, match=r"shape \(3,\) but its weight 'a.weight' in w.pt has shape \(2,\)"):
        pair(_raw({"a.weight": np.ones(2)}, {"a.weight": np.ones(3)}), NameOptions())


def test_canonical_names():
    assert canonical("module.module.x", NameOptions()) == "x"
    assert canonical("module.encoder_q.layer1.w", NameOptions(select="encoder_q")) == "layer1.w"
    assert canonical("module.encoder_k.layer1.w", NameOptions(select="encoder_q.")) is None
    assert canonical("model.fc.weight", NameOptions()) == "model.fc.weight"
    assert canonical("model.fc.weight", NameOptions(strip_model_prefix=True)) == "fc.weight"


def test_round_numbers_from_names():
    groups = numbered_groups([Path(p) for p in ["2checkpoint.pth.tar", "10checkpoint.pth.tar", "0checkpoint.pth.tar",
                                                "1model_SA_best.pth.tar", "notes.txt"]])
    assert [n for n, _ in groups["{n}checkpoint.pth.tar"]] == [0, 2, 10]
    assert list(groups) == ["{n}checkpoint.pth.tar", "{n}model_SA_best.pth.tar"]
    ranked, note = as_rounds([(500, Path("checkpoint-500")), (1000, Path("checkpoint-1000"))])
    assert [n for n, _ in ranked] == [0, 1] and "rank" in note


RESNET = ["conv1.weight", "layer1.0.conv1.weight", "layer1.1.conv2.weight", "layer2.0.downsample.0.weight",
          "layer4.1.conv2.weight", "fc.weight"]


def test_presets_for_torchvision_resnets():
    assert BlockRules.parse(["resnet-stages"]).resolve(RESNET)[0] == ["stem", "layer1", "layer1", "layer2", "layer4", "fc"]
    assert BlockRules.parse(["resnet-blocks"]).resolve(RESNET)[0] == [
        "stem", "layer1.0", "layer1.1", "layer2.0", "layer4.1", "fc"]


def test_openlth_stage_from_depth():
    # ResNet-20: D = (20 - 2) / 6 = 3 residual blocks per stage, numbered flat 0..8
    names = ["conv.weight"] + [f"blocks.{i}.conv1.weight" for i in range(9)] + ["fc.weight"]
    labels = BlockRules.parse(["openlth-cifar-stages"]).resolve(names)[0]
    assert labels == ["stem"] + ["stage1"] * 3 + ["stage2"] * 3 + ["stage3"] * 3 + ["fc"]
    labels = BlockRules.parse(["openlth-cifar-blocks"]).resolve(names)[0]
    assert labels[4] == "stage2.block1" and labels[9] == "stage3.block3"


def test_bert_layers_preset():
    names = ["bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight",
             "bert.encoder.layer.11.output.dense.weight", "bert.pooler.dense.weight", "classifier.weight"]
    assert BlockRules.parse(["bert-layers"]).resolve(names)[0] == [
        "embeddings", "layer0", "layer11", "pooler", "classifier"]
    assert detect_preset(names[1:3]).name == "bert-layers"


def test_label_regex_first_capture_group_first_match_wins_and_other():
    rules = BlockRules.parse(["early=layer[12]\\.", r"(layer\d)\.(\d)"])
    labels, description = rules.resolve(RESNET)
    assert labels == ["(other)", "early", "early", "early", "layer4", "(other)"]
    assert description == "early=layer[12]\\. (layer\\d)\\.(\\d)"
    # '=' inside a regex (a lookahead) is not a label separator
    assert BlockRules.parse([r"layer(?=1)\d"]).resolve(["layer1.x", "layer2.x"])[0] == ["layer1", "(other)"]
    with pytest.raises(FlowscanError, match="invalid regular expression"):
        BlockRules.parse(["("])


def test_default_blocks_detect_a_preset_or_fall_back_to_one_per_tensor():
    assert BlockRules().resolve(RESNET)[1] == "resnet-stages (auto-detected)"
    assert BlockRules().resolve(["w1.weight", "w2.weight"]) == (["w1", "w2"], "per-tensor (auto-detected)")
