"""Archives of other code bases for the landscape tests, made here: an open_lth lottery run (its
folder layout, hparams.log and logger formats, a model of open_lth's names) trained on MNIST-format
idx files, and Chen et al.'s prune-style CIFAR ResNet checkpoints over CIFAR python batches.

Recorded accuracies are computed here with numpy preprocessing written out by hand (the recipe's
mean and std), independently of flowscan's data loaders.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flowscan.train import zoo

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def write_idx(path: Path, array: np.ndarray) -> None:
    header = b"\x00\x00" + bytes([0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def mnist_like(folder: Path, n_train: int = 600, n_test: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class-conditional 28x28 uint8 digits in MNIST's idx files; returns the test images and labels."""
    rng = np.random.default_rng(seed)
    prototypes = rng.random((10, 28, 28)) < 0.2
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = rng.integers(0, 10, n)
        x = np.where(prototypes[y] ^ (rng.random((n, 28, 28)) < 0.42), rng.integers(150, 256, (n, 28, 28)), 0)
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", y)
        out[split] = (x.astype(np.uint8), y)
    return out["t10k"]


def accuracy(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x.astype(np.float32))).argmax(1).numpy()


def open_lth_lottery(root: Path, data: Path, replicates: int = 2, levels: int = 3,
                     model_name: str = "mnist_lenet_40_20", wrong_preprocessing: bool = False,
                     steps: int = 60, batch: int = 64, lr: float = 0.1) -> dict:
    """An open_lth lottery run on the idx files in `data`: each level trains from the rewind point
    under its mask, prunes 20 % of the hidden layers' weights (fc ignored, as open_lth's default), and
    writes level_L/main/{model_ep0_it0.pth, model_ep2_it0.pth, mask.pth, logger} plus hparams.log.
    Returns {(replicate, level): test accuracy} as recorded in the logger (computed with the recipe's
    normalization, or on [0, 1] inputs with `wrong_preprocessing`)."""
    from flowscan.train.data import _read_idx

    def normalize(pixels):   # open_lth: ToTensor (/255) then Normalize(mean, std)
        scaled = pixels.astype(np.float64)[:, None] / 255.0
        return (scaled - MNIST_MEAN) / MNIST_STD

    x_train, y_train = _read_idx(data / "train-images-idx3-ubyte.gz"), _read_idx(data / "train-labels-idx1-ubyte.gz")
    x_test, y_test = _read_idx(data / "t10k-images-idx3-ubyte.gz"), _read_idx(data / "t10k-labels-idx1-ubyte.gz")
    xt = torch.from_numpy(normalize(x_train).astype(np.float32))
    yt = torch.from_numpy(y_train.astype(np.int64))
    recorded = {}
    lottery = root / "lottery_93bc65d66dfa64ffaf2a0ab105433a2c"
    for r in range(replicates):
        torch.manual_seed(r)
        model = zoo.build(model_name, (1, 28, 28), 10)
        rewind = {k: v.clone() for k, v in model.state_dict().items()}
        masks = {k: torch.ones_like(v) for k, v in rewind.items() if k.endswith("weight")}
        for level in range(levels):
            main = lottery / f"replicate_{r + 1}" / f"level_{level}" / "main"
            main.mkdir(parents=True)
            model.load_state_dict({k: v * masks[k] if k in masks else v for k, v in rewind.items()})
            torch.save(model.state_dict(), main / "model_ep0_it0.pth")
            opt = torch.optim.SGD(model.parameters(), lr=lr)
            g = torch.Generator().manual_seed(100 * r + level)
            for _step in range(steps):
                idx = torch.randint(0, len(yt), (batch,), generator=g)
                opt.zero_grad()
                F.cross_entropy(model(xt[idx]), yt[idx]).backward()
                opt.step()
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        if name in masks:
                            p.mul_(masks[name])
            # open_lth saves the end weights unmasked-by-value; pruned entries hold anything
            state = {k: v.clone() for k, v in model.state_dict().items()}
            for k in masks:
                state[k] = state[k] + (1 - masks[k]) * 0.5
            torch.save(state, main / "model_ep2_it0.pth")
            torch.save({k: m.to(torch.int32) for k, m in masks.items()}, main / "mask.pth")
            inputs = x_test.astype(np.float64)[:, None] / 255.0 if wrong_preprocessing else normalize(x_test)
            acc = float((accuracy(model, inputs) == y_test).mean())
            recorded[(r, level)] = acc
            (main / "logger").write_text(f"test_loss,0,2.3\ntest_accuracy,0,0.1\ntest_accuracy,{steps},{acc}\n")
            (main / "sparsity_report.json").write_text("{}")
            if level == 0:
                (main / "hparams.log").write_text(
                    "Dataset Hyperparameters\n    * dataset_name => mnist\n    * batch_size => 128\n"
                    f"Model Hyperparameters\n    * model_name => {model_name}\n    * model_init => kaiming_normal\n"
                    "    * batchnorm_init => uniform\nTraining Hyperparameters\n    * optimizer_name => sgd\n"
                    f"    * lr => {lr}\n    * training_steps => 2ep\n"
                    "Pruning Hyperparameters\n    * pruning_strategy => sparse_global\n"
                    "    * pruning_fraction => 0.2\n    * pruning_layers_to_ignore => fc.weight\n")
            # prune 20 % of the remaining hidden weights by magnitude, globally
            hidden = [k for k in masks if k.startswith("fc_layers")]
            alive = torch.cat([model.state_dict()[k][masks[k].bool()].abs().flatten() for k in hidden])
            cut = alive.kthvalue(max(1, int(0.2 * alive.numel()))).values
            for k in hidden:
                masks[k] = masks[k] * (model.state_dict()[k].abs() > cut).float()
    return recorded


CHEN_MEAN, CHEN_STD = np.array([0.4914, 0.4822, 0.4465]), np.array([0.2023, 0.1994, 0.2010])


def cifar_like(folder: Path, n_train: int = 64, n_test: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10's python batches (data_batch_1..5, test_batch) of random images; returns the test set."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in [*((f"data_batch_{i}", n_train // 5) for i in range(1, 6)), ("test_batch", n_test)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    test = pickle.loads((folder / "test_batch").read_bytes())
    return test["data"].reshape(-1, 3, 32, 32), np.array(test["labels"])


def chen_cifar_run(folder: Path, data: Path, rounds: int = 2, seed: int = 0) -> list[float]:
    """Chen et al.'s `{k}checkpoint.pth.tar` files of a CIFAR ResNet-18 (3x3 stem): `state_dict`
    prune-style (weight_orig + weight_mask) from round 1 on, conv1 and fc never pruned, and
    `result.test_ta` in percent computed with Chen et al.'s CIFAR-10 mean and std. Returns the
    recorded accuracies (fractions)."""
    test = pickle.loads((data / "test_batch").read_bytes())
    x_test, y_test = test["data"], np.array(test["labels"])
    inputs = (x_test.reshape(-1, 3, 32, 32) / 255.0 - CHEN_MEAN[None, :, None, None]) / CHEN_STD[None, :, None, None]
    torch.manual_seed(seed)
    model = zoo.build("cifar-resnet18", (3, 32, 32), 10).eval()
    folder.mkdir(parents=True, exist_ok=True)
    recorded = []
    masks: dict[str, torch.Tensor] = {}
    for k in range(rounds):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in masks:
                    p.mul_(masks[name])
        acc = float((accuracy(model, inputs) == y_test).mean())
        recorded.append(acc)
        state = {}
        for name, value in model.state_dict().items():
            if name in masks:
                state[name[:-len("weight")] + "weight_orig"] = value.clone()
                state[name[:-len("weight")] + "weight_mask"] = masks[name].clone()
            else:
                state[name] = value.clone()
        torch.save({"state": k, "state_dict": state, "best_sa": 100 * acc, "result": {"test_ta": [5.0, 100 * acc]}},
                   folder / f"{k}checkpoint.pth.tar")
        for name, p in model.named_parameters():   # the next round's mask: 20 % of each conv, by magnitude
            if name.endswith("weight") and p.dim() == 4 and name != "conv1.weight":
                current = masks.get(name, torch.ones_like(p))
                cut = (p.detach().abs() * current)[current.bool()].kthvalue(max(1, int(0.2 * int(current.sum())))).values
                masks[name] = current * (p.detach().abs() > cut).float()
    return recorded
