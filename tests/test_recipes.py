"""Landscape analyses on archives of other code bases: the model named by the archive, the data
preprocessed by the archive's recipe, and the recorded accuracies as a check before any number."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from conftest import run_cli
from flowscan import pipeline
from flowscan.landscape import recipes
from flowscan.train import data as datasets
from flowscan.train import models, zoo

import landscape_archives as archives


@pytest.fixture(scope="module")
def lottery(tmp_path_factory):
    root = tmp_path_factory.mktemp("openlth")
    data = root / "mnist"
    archives.mnist_like(data)
    recorded = archives.open_lth_lottery(root / "archive", data)
    return root / "archive", data, recorded


def test_lmc_on_an_open_lth_lottery_needs_no_model_code_and_matches_its_logger(lottery, tmp_path):
    archive, data, recorded = lottery
    result = run_cli("lmc", archive, "-o", tmp_path, "--data", f"mnist:{data}", "--points", "3")
    summary = pl.read_parquet(tmp_path / "lmc_summary.parquet").sort("run", "round")
    # runs named as analyze names them, never "."
    assert summary["run"].unique().sort().to_list() == sorted(r.name for r in pipeline.find_runs(archive))
    assert summary["run"].str.ends_with("replicate_1").sum() == 2    # levels 0->1, 1->2
    for row in summary.iter_rows(named=True):
        r = int(row["run"].split("_")[-1]) - 1
        # LeNet has no BatchNorm: the ends of each path are the logged networks exactly
        assert row["error_start"] == pytest.approx(1 - recorded[(r, row["round"])], abs=1e-9)
        assert row["error_end"] == pytest.approx(1 - recorded[(r, row["next_round"])], abs=1e-9)
        assert row["recipe"].startswith("open_lth: model mnist_lenet_40_20, data mnist")
        assert "mean (0.1307), std (0.3081)" in row["recipe"]
    assert "open_lth: model mnist_lenet_40_20" in result.output          # said, not only recorded
    assert "test accuracy" in result.output and "recorded" in result.output


def test_probe_retrains_open_lth_rounds_as_hparams_log_says(lottery, tmp_path):
    archive, data, recorded = lottery
    result = run_cli("sharpness", archive, "-o", tmp_path, "--data", f"mnist:{data}", "--subset", "32",
                     "--max-iter", "2", "--probe", "0.3,0.6")
    probe = pl.read_parquet(tmp_path / "fraction_probe.parquet").sort("run", "round", "fraction")
    assert probe.height == 2 * 3 * 2   # replicates x levels x fractions
    for row in probe.iter_rows(named=True):
        dense = 1 - recorded[(int(row["run"].split("_")[-1]) - 1, 0)]   # the run's own level-0 error
        assert 0 <= row["error"] <= 1 and row["matching"] == (row["error"] <= dense + 0.01)
    assert "retraining as" in result.output and "2 epochs of batch 128, lr 0.1" in result.output
    assert "fc.weight never pruned" in result.output
    assert "retraining with 0.6 more pruned (2/2)" in result.output   # progress per round and fraction


def test_a_recipe_the_network_was_not_trained_with_stops_before_any_number(tmp_path):
    data = tmp_path / "mnist"
    archives.mnist_like(data)
    right = archives.open_lth_lottery(tmp_path / "a", data, replicates=1, levels=2)
    wrong = archives.open_lth_lottery(tmp_path / "b", data, replicates=1, levels=2, wrong_preprocessing=True)
    assert abs(right[(0, 0)] - wrong[(0, 0)]) > 0.02   # the two preprocessings really differ here
    result = run_cli("lmc", tmp_path / "b", "-o", tmp_path / "out", "--data", f"mnist:{data}", expect=1)
    assert "records test accuracy" in result.output and "not the one this network was trained with" in result.output
    assert not (tmp_path / "out" / "lmc_summary.parquet").exists()
    # a wider tolerance accepts it, on the user's word
    run_cli("lmc", tmp_path / "b", "-o", tmp_path / "out", "--data", f"mnist:{data}", "--points", "2",
            "--accuracy-tolerance", "1")


def test_data_other_than_the_archives_is_refused_by_name(lottery, tmp_path):
    archive, data, _ = lottery
    result = run_cli("lmc", archive, "-o", tmp_path, "--data", f"fashion-mnist:{data}", expect=1)
    assert "trained on mnist" in result.output and "fashion-mnist" in result.output
    result = run_cli("lmc", archive, "-o", tmp_path, expect=1)
    assert "--data mnist:DIR" in result.output


def test_the_recipe_normalization_is_the_one_computed_by_hand(tmp_path):
    test_x, _ = archives.mnist_like(tmp_path / "m", n_train=20, n_test=10)
    loaded = datasets.load(f"mnist:{tmp_path / 'm'}", recipes.OPEN_LTH["mnist"])
    by_hand = (test_x[:, None].astype(np.float64) / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(loaded.x_test.numpy(), by_hand, rtol=1e-6, atol=1e-6)
    own = datasets.load(f"mnist:{tmp_path / 'm'}")   # flowscan's recipe: the training set's statistics
    assert own.preprocessing.startswith("per-channel training-set") and not np.allclose(own.x_test, loaded.x_test)


def test_the_cifar_training_transform_crops_padded_images_and_flips():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    data = datasets.Dataset("c", x, torch.zeros(2), x, torch.zeros(2), 10, augment=True, pad_value=(-1.0, -2.0, -3.0))
    out = data.training_batch(torch.tensor([0, 1] * 50), torch.Generator().manual_seed(0))
    assert out.shape == (100, 3, 32, 32)
    for i, img in enumerate(out):
        src = x[i % 2]
        found = False
        for dy in range(9):
            for dx in range(9):
                padded = torch.tensor([-1.0, -2.0, -3.0]).view(3, 1, 1).expand(3, 40, 40).clone()
                padded[:, 4:36, 4:36] = src
                crop = padded[:, dy:dy + 32, dx:dx + 32]
                found |= bool(torch.equal(img, crop) or torch.equal(img, crop.flip(-1)))
        assert found
    assert not torch.equal(out[0], out[2])   # random crops and flips, not one fixed view


@pytest.mark.parametrize("name, shape", [("mnist_lenet_300_100", (1, 28, 28)), ("mnist_lenet_100", (1, 28, 28)),
                                         ("cifar_resnet_20", (3, 32, 32)), ("cifar_resnet_14_32", (3, 32, 32)),
                                         ("cifar_vgg_11", (3, 32, 32)), ("cifar_vgg_16", (3, 32, 32)),
                                         ("cifar-resnet18", (3, 32, 32)), ("cifar-resnet50", (3, 32, 32))])
def test_zoo_models_are_named_back_from_their_state_dicts(name, shape):
    model, _spec = models.build(name, shape, 10)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert zoo.infer_model(shapes) == (name, 10)
    assert model(torch.zeros(2, *shape)).shape == (2, 10)


def test_open_lth_parameter_names_and_counts_are_open_lths():
    resnet = zoo.build("cifar_resnet_20", (3, 32, 32), 10)
    names = [k for k in resnet.state_dict() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert names[:3] == ["conv.weight", "bn.weight", "bn.bias"]
    assert "blocks.3.shortcut.0.weight" in names and "blocks.0.shortcut.0.weight" not in names
    assert sum(p.numel() for p in resnet.parameters()) == 272_474     # ResNet-20's known size
    vgg = zoo.build("cifar_vgg_16", (3, 32, 32), 10)
    assert "layers.0.conv.weight" in vgg.state_dict() and "layers.2.conv.weight" not in vgg.state_dict()  # a pool
    lenet = zoo.build("mnist_lenet_300_100", (1, 28, 28), 10)
    assert [k for k in lenet.state_dict()] == ["fc_layers.0.weight", "fc_layers.0.bias", "fc_layers.1.weight",
                                              "fc_layers.1.bias", "fc.weight", "fc.bias"]


def test_hparams_log_is_read_as_open_lth_writes_it(tmp_path):
    log = tmp_path / "hparams.log"
    log.write_text("Dataset Hyperparameters\n    * dataset_name => cifar10\n    * batch_size => 128\n"
                   "Model Hyperparameters\n    * model_name => cifar_resnet_20\n")
    assert recipes.read_hparams(log) == {"dataset_name": "cifar10", "batch_size": "128", "model_name": "cifar_resnet_20"}


def test_chen_et_al_cifar_archive_is_recognised_and_checked(tmp_path):
    data = tmp_path / "cifar"
    archives.cifar_like(data)
    recorded = archives.chen_cifar_run(tmp_path / "run", data)
    result = run_cli("sharpness", tmp_path / "run", "-o", tmp_path / "out", "--data", f"cifar10:{data}",
                     "--subset", "16", "--max-iter", "2")
    table = pl.read_parquet(tmp_path / "out" / "sharpness.parquet").sort("round")
    assert table["recipe"][0].startswith("Chen et al. (CV_LTH_Pre-training): model cifar-resnet18, data cifar10")
    assert "0.4914" in table["recipe"][0]
    for k, acc in enumerate(recorded):   # the stored network, before BatchNorm is re-estimated for the Hessian
        assert f"round {k}: test accuracy {acc:.4f} measured, {acc:.4f} recorded (within 0.02)" in result.output
    wrong = run_cli("sharpness", tmp_path / "run", "-o", tmp_path / "out2", "--data", f"cifar100:{data}", expect=1)
    assert "has 10 outputs, cifar100 has 100 classes" in wrong.output
    probe = run_cli("sharpness", tmp_path / "run", "-o", tmp_path / "out3", "--data", f"cifar10:{data}",
                    "--probe", "0.2", expect=1)
    assert "do not record their training schedule" in probe.output


def test_open_lth_cifar_recipe_normalizes_with_imagenet_statistics_and_augments(tmp_path):
    from flowscan.readers.base import Round, Run

    main = tmp_path / "replicate_1" / "level_0" / "main"
    main.mkdir(parents=True)
    (main / "hparams.log").write_text("Dataset Hyperparameters\n    * dataset_name => cifar10\n"
                                      "Model Hyperparameters\n    * model_name => cifar_resnet_20\n")
    run = Run(tmp_path / "replicate_1", "open_lth", [Round(0, "open_lth", (main / "model_ep2_it0.pth",))], "replicate_1")
    recipe, notes = recipes.recipe_for(run, None, "cifar10:/x", {})
    assert (recipe.model, recipe.norm) == ("cifar_resnet_20", recipes.OPEN_LTH["cifar10"])
    assert recipe.norm.mean == (0.485, 0.456, 0.406) and recipe.norm.augment and not notes
    with pytest.raises(Exception, match="trained on cifar10"):
        recipes.recipe_for(run, None, "cifar100:/x", {})


def test_an_archive_without_recorded_accuracies_says_the_check_was_not_made(tmp_path):
    data = tmp_path / "cifar"
    archives.cifar_like(data)
    archives.chen_cifar_run(tmp_path / "run", data)
    for path in (tmp_path / "run").glob("*.pth.tar"):
        ckpt = torch.load(path, weights_only=True)
        del ckpt["result"]
        torch.save(ckpt, path)
    result = run_cli("lmc", tmp_path / "run", "-o", tmp_path / "out", "--data", f"cifar10:{data}", "--points", "2",
                     "--bn-batches", "1")
    assert "records no test accuracy (result.test_ta)" in result.output
    assert "cannot be checked" in result.output
