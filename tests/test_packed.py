"""Packed training: the seeds of a round trained together give each seed's one-at-a-time result."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.numpy import load_file

from conftest import run_cli
from flowscan.produce.imp import IMPConfig
from flowscan.produce.runner import produce
from flowscan.train import data as datasets
from flowscan.train import models
from flowscan.train.packed import NotPackable, PackedTrainer, pack, pack_state, unpack_state
from flowscan.train.trainer import Trainer, TrainConfig

DATA = "synthetic-images:3x16x16:200"


def _rounds(out: Path) -> dict:
    found = {}
    for folder in sorted(out.glob("seed_*/round_*")):
        key = (folder.parent.name, folder.name)
        found[key] = (load_file(str(folder / "weights.safetensors")), load_file(str(folder / "masks.safetensors")),
                      json.loads((folder / "round.json").read_text()))
    return found


def _assert_same_archive(packed: Path, alone: Path, atol: float = 2e-5):
    a, b = _rounds(packed), _rounds(alone)
    assert a.keys() == b.keys() and a
    for key in a:
        (wa, ma, ja), (wb, mb, jb) = a[key], b[key]
        assert wa.keys() == wb.keys()
        for name in wa:   # the same numbers up to summation order
            np.testing.assert_allclose(wa[name], wb[name], atol=atol, rtol=1e-4, err_msg=f"{key} {name}")
        for name in ma:   # and the same masks, bit for bit
            assert np.array_equal(ma[name], mb[name]), (key, name)
        assert ja["density"] == jb["density"]
        assert ja["metrics"]["test_accuracy"] == pytest.approx(jb["metrics"]["test_accuracy"], abs=0.011)
        assert ja["metrics"]["train_loss"] == pytest.approx(jb["metrics"]["train_loss"], abs=1e-3)
        assert ja["metrics"]["train_steps"] == jb["metrics"]["train_steps"]
        assert ja["metrics"]["packed_seeds"] >= 1 and "packed_seeds" not in jb["metrics"]
    for seed in {k[0] for k in a}:   # the rewind points too
        ra, rb = load_file(str(packed / seed / "rewind.safetensors")), load_file(str(alone / seed / "rewind.safetensors"))
        for name in ra:
            np.testing.assert_allclose(ra[name], rb[name], atol=atol, rtol=1e-4)


@pytest.mark.parametrize("model,extra", [
    ("lenet", {"augment": True, "rewind": 0.5}),   # crops and flips per seed, a late rewind point
    ("mlp", {}),
])
def test_packed_seeds_match_one_at_a_time(tmp_path, model, extra):
    cfg = IMPConfig(model=model, data=DATA, rounds=3, epochs=2, batch_size=32, **{"lr": 0.05, **extra})
    notes = []
    produce(cfg, [3, 4, 5], tmp_path / "packed", device="cpu", pack=True, note=notes.append)
    produce(cfg, [3, 4, 5], tmp_path / "alone", device="cpu", pack=False)
    assert notes and notes[0].startswith("3 seeds trained together, packed into one model")
    _assert_same_archive(tmp_path / "packed", tmp_path / "alone")


@pytest.mark.parametrize("model,augment,optimizer", [
    ("cifar-resnet14", False, "sgd"), ("cifar-resnet14", True, "sgd"), ("cifar_resnet_8", True, "sgd"),
    ("mlp", False, "adamw"),
])
def test_packed_networks_train_exactly_as_alone_in_float64(model, augment, optimizer):
    """In float32 the grouped and plain convolutions sum in different orders, and a small batch-norm
    network (or Adam's division by tiny second moments) amplifies that within a few steps (1e-7
    after one step, 1e-3 after ten); in float64 both compute the same numbers, so a difference here
    would be a real one."""
    torch.set_default_dtype(torch.float64)
    try:
        data = datasets.load("synthetic-images:3x16x16:100")
        data = replace(data, x_train=data.x_train.double(), x_test=data.x_test.double())
        spec_models, masks = [], []
        for seed in range(2):
            torch.manual_seed(seed)
            model_s, spec = models.build(model, data.input_shape, data.n_classes)
            params = dict(model_s.named_parameters())
            rng = torch.Generator().manual_seed(seed)
            masks.append({n: torch.rand(params[n].shape, generator=rng) > 0.3
                          for n in models.prunable_names(model_s, spec)})
            spec_models.append(model_s)
        cfg = TrainConfig(steps=6, batch_size=32, lr=0.05 if optimizer == "sgd" else 0.01, augment=augment,
                          optimizer=optimizer)
        alone = [copy.deepcopy(m) for m in spec_models]
        for m, mask, seed in zip(alone, masks, range(2)):
            Trainer(m, mask, data, cfg, torch.device("cpu")).train(0, 6, 100 + seed)
        costs = PackedTrainer(spec_models, masks, data, cfg, torch.device("cpu")).train_seeds(0, 6, [100, 101])
    finally:
        torch.set_default_dtype(torch.float32)
    assert [c["train_steps"] for c in costs] == [6, 6]
    for a, b in zip(alone, spec_models):
        sa, sb = a.state_dict(), b.state_dict()
        assert max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa) < 1e-12
        assert any(float((sa[k] - spec_models[0].state_dict()[k]).abs().max()) > 0 for k in sa if sa[k].dim())


def test_seeds_resumed_at_different_rounds_catch_up_packed(tmp_path):
    cfg = IMPConfig(model="lenet", data=DATA, rounds=2, epochs=1, batch_size=32, lr=0.05)
    produce(cfg, [0, 1, 2], tmp_path / "packed", device="cpu", pack=True)
    shutil.rmtree(tmp_path / "packed" / "seed_1" / "round_0001")   # as if killed while writing it
    shutil.rmtree(tmp_path / "packed" / "seed_2" / "round_0001")
    shutil.rmtree(tmp_path / "packed" / "seed_2" / "round_0000")
    more = IMPConfig(**{**cfg.__dict__, "rounds": 3})
    reports = produce(more, [0, 1, 2], tmp_path / "packed", device="cpu", pack=True)
    assert sorted((r.seed, r.round) for r in reports) == [(0, 2), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    produce(more, [0, 1, 2], tmp_path / "alone", device="cpu", pack=False)
    _assert_same_archive(tmp_path / "packed", tmp_path / "alone")


def test_pack_state_round_trip():
    states = [{"w": torch.full((2, 3), float(s)), "b": torch.arange(2.0) + s, "n": torch.tensor(7)} for s in range(3)]
    packed = pack_state(states)
    assert packed["w"].shape == (6, 3) and packed["b"].tolist() == [0, 1, 1, 2, 2, 3] and int(packed["n"]) == 7
    for original, back in zip(states, unpack_state(packed, 3)):
        assert all(torch.equal(original[k], back[k]) for k in original)


class _MixesChannels(nn.Module):
    """A forward pass that averages over all channels: packed, it would mix the seeds."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv(x)
        y = y - y.mean(dim=1, keepdim=True)
        return self.fc(y.mean(dim=(2, 3)))


class _Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(self.fc(torch.flatten(x, 1)))


@pytest.mark.parametrize("make,example,reason", [
    (_MixesChannels, torch.zeros(1, 3, 8, 8), "its forward pass mixes the seeds' channels"),
    (_Normed, torch.zeros(1, 3, 2, 2), "LayerNorm layers"),
    (lambda: models.build("bert-small", (16, 50), 2)[0], torch.zeros(1, 16, dtype=torch.long), "token inputs"),
])
def test_models_that_cannot_pack_are_refused_by_name(make, example, reason):
    torch.manual_seed(0)
    with pytest.raises(NotPackable, match=reason):
        pack([make(), make()], example)


def test_every_flowscan_and_zoo_image_model_packs():
    for name, shape in [("cifar-resnet20", (3, 32, 32)), ("resnet18", (3, 32, 32)), ("lenet", (1, 28, 28)),
                        ("mlp", (1, 8, 8)), ("cifar_resnet_20", (3, 32, 32)), ("cifar_vgg_11", (3, 32, 32)),
                        ("mnist_lenet_300_100", (1, 28, 28)), ("cifar-resnet18", (3, 32, 32))]:
        seeds = []
        for s in range(2):
            torch.manual_seed(s)
            seeds.append(models.build(name, shape, 10)[0])
        pack(seeds, torch.zeros(1, *shape))   # checks the outputs of both seeds


def test_cli_says_how_seeds_were_trained(tmp_path):
    common = ["--model", "lenet", "--data", DATA, "--rounds", "1", "--seeds", "2", "--epochs", "1",
              "--batch-size", "32"]
    packed = run_cli("produce", *common, "--pack-seeds", "-o", tmp_path / "a")
    assert "flowscan: 2 seeds trained together, packed into one model" in packed.output
    adaptive = run_cli("produce", *common, "--pack-seeds", "--schedule", "adaptive", "-o", tmp_path / "b")
    assert "seeds trained one at a time: the adaptive schedule's retries differ per seed" in adaptive.output
    assert "packed" not in run_cli("produce", *common, "-o", tmp_path / "c").output   # CPU default: alone
