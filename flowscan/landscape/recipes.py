"""Which model, data and preprocessing reproduce an archive's networks: its training recipe.

Landscape numbers (errors along a path, barriers, Hessians) mean something only on inputs
preprocessed as in training. The recipe comes from, in order:

- a `flowscan produce` manifest (model and data named there; the training set's own statistics);
- open_lth's `hparams.log` (`model_name`, `dataset_name`) and open_lth's fixed normalization per
  dataset (its datasets/mnist.py and cifar10.py);
- Chen et al.'s CIFAR archives (CV_LTH_Pre-training), told apart by their torchvision names with a
  3x3 stem, and their dataset.py normalization;
- otherwise `--model` and `--data`, with the training set's statistics, said to be assumed.

`--model` and `--data` override the model and the data folder, never silently the preprocessing:
what is used is recorded in every table (`recipe`) and printed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from flowscan import layout
from flowscan.errors import FlowscanError
from flowscan.train.data import Normalization
from flowscan.readers.base import Run

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OPEN_LTH = {"mnist": Normalization((0.1307,), (0.3081,)),
            "cifar10": Normalization(IMAGENET_MEAN, IMAGENET_STD, augment=True)}
CHEN = {"cifar10": Normalization((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), augment=True),
        "cifar100": Normalization((0.5071, 0.4866, 0.4409), (0.2009, 0.1984, 0.2023), augment=True)}


@dataclass(frozen=True)
class Recipe:
    source: str                      # where the recipe comes from, in words
    model: str                       # a flowscan or zoo model name, or package.module:function
    data: str                        # a dataset spec for produce.data.load
    norm: Normalization | None       # None: the training set's own statistics
    accuracy_key: str | None = None  # the round metric holding the recorded test accuracy
    accuracy_scale: float = 1.0      # to a fraction (Chen et al. record percent)

    def describe(self) -> str:
        how = self.norm.describe() if self.norm else "per-channel training-set mean and std"
        return f"{self.source}: model {self.model}, data {self.data.partition(':')[0]}, {how}"

    def recorded_accuracy(self, metrics: dict[str, float]) -> float | None:
        if self.accuracy_key is None or self.accuracy_key not in metrics:
            return None
        return metrics[self.accuracy_key] / self.accuracy_scale


def read_hparams(path: Path) -> dict[str, str]:
    """open_lth's `hparams.log`: section titles, then `    * name => value` lines."""
    values = {}
    for line in path.read_text(errors="replace").splitlines():
        m = re.match(r"^\s*\*\s*(\w+)\s*=>\s*(.*?)\s*$", line)
        if m:
            values[m.group(1)] = m.group(2)
    return values


def open_lth_hparams(run: Run) -> tuple[dict[str, str], Path] | None:
    """The hparams.log of an open_lth run (level 0, or the first level that has one)."""
    for rnd in run.rounds:
        for f in rnd.files[:1]:
            candidate = Path(f).parent / "hparams.log"
            if candidate.is_file():
                return read_hparams(candidate), candidate
    logs = sorted(Path(run.path).glob("level_*/main/hparams.log")) if isinstance(run.path, Path) else []
    return (read_hparams(logs[0]), logs[0]) if logs else None


def recipe_for(run: Run, model: str | None, data: str | None, shapes: dict[str, tuple[int, ...]]) -> tuple[Recipe, list[str]]:
    """The recipe of `run` and notes for the user (what was inferred or assumed). `shapes`: the
    tensor shapes of one of its rounds (to name a model from)."""
    from flowscan.train import zoo

    notes = []
    args = layout.run_args(run.path) if isinstance(run.path, Path) else None
    if args:
        return Recipe("flowscan produce", model or args.get("model"), data or args.get("data"), None,
                      "test_accuracy"), notes
    inferred = zoo.infer_model(shapes)
    dataset = data.partition(":")[0] if data else None
    if run.format == "open_lth":
        found = open_lth_hparams(run)
        hp, where = found if found else ({}, None)
        name = hp.get("model_name")
        wanted = hp.get("dataset_name")
        if name is None:
            name = inferred[0] if inferred else None
            notes.append(f"no hparams.log names the model: {name or '?'} from the tensor names and shapes")
        if wanted is None:
            wanted = dataset
            notes.append(f"no hparams.log names the dataset: {dataset or '?'} from --data assumed")
        if data is None:
            raise FlowscanError(f"{run.path}: open_lth trained on {wanted or 'an unnamed dataset'}; give its "
                                f"files with --data {wanted or 'NAME'}:DIR (flowscan downloads nothing)")
        if dataset != wanted:
            raise FlowscanError(f"{run.path}: trained on {wanted} ({where}), but --data names {dataset}; "
                                "errors on other data mean nothing for this network")
        if wanted not in OPEN_LTH:
            raise FlowscanError(f"{run.path}: open_lth's preprocessing of {wanted!r} is not known to flowscan "
                                f"(known: {', '.join(OPEN_LTH)})")
        if model and name and model != name:
            notes.append(f"--model {model} replaces the archive's {name}")
        return Recipe("open_lth", model or name, data, OPEN_LTH[wanted], "test_accuracy"), notes
    if inferred and inferred[0].startswith("cifar-resnet") and run.format == "prune-style":
        if data is None:
            raise FlowscanError(f"{run.path}: a CIFAR ResNet of Chen et al.'s code; give the data with "
                                "--data cifar10:DIR or cifar100:DIR")
        if dataset not in CHEN:
            raise FlowscanError(f"{run.path}: Chen et al.'s recipe covers {', '.join(CHEN)}, not {dataset}")
        if inferred[1] != (100 if dataset == "cifar100" else 10):
            raise FlowscanError(f"{run.path}: the network has {inferred[1]} outputs, {dataset} has "
                                f"{100 if dataset == 'cifar100' else 10} classes")
        notes.append(f"model {inferred[0]} from the tensor names and shapes (Chen et al.'s CIFAR ResNet)")
        return Recipe("Chen et al. (CV_LTH_Pre-training)", model or inferred[0], data, CHEN[dataset],
                      "result.test_ta", 100.0), notes
    name = model or (inferred[0] if inferred else None)
    if not name or not data:
        raise FlowscanError(f"{run.path}: neither a flowscan produce run nor a known recipe (open_lth's "
                            "hparams.log, Chen et al.'s CIFAR ResNets); name the model and data with --model "
                            "and --data")
    if not model:
        notes.append(f"model {name} from the tensor names and shapes")
    notes.append("the archive does not say how its inputs were preprocessed: assumed per-channel "
                 "training-set mean and std; errors are meaningful only if the network was trained so")
    return Recipe("assumed", name, data, None, "test_accuracy"), notes


def _steps(text: str | None, per_epoch: int) -> float | None:
    """open_lth's step strings ('160ep', '50000it', '2ep100it') in epochs."""
    m = re.fullmatch(r"(?:(\d+)ep)?(?:(\d+)it)?", (text or "").strip())
    if not text or not m or not any(m.groups()):
        return None
    return int(m.group(1) or 0) + int(m.group(2) or 0) / per_epoch


def open_lth_retraining(run: Run, recipe: Recipe, n_train: int) -> tuple[dict, Path, list[str]]:
    """How to retrain a round of an open_lth run as open_lth did: produce's IMPConfig arguments from
    hparams.log, the rewind weights file (level 0's earliest model_ep*_it*.pth), and notes on what
    produce's trainer does differently. FlowscanError when hparams.log lacks what is needed."""
    found = open_lth_hparams(run)
    if found is None:
        raise FlowscanError(f"{run.path}: no hparams.log; --probe needs open_lth's training hyper-parameters")
    hp, where = found
    batch = int(hp.get("batch_size", 0) or 0)
    if batch <= 0 or "lr" not in hp:
        raise FlowscanError(f"{where}: no batch_size or lr; --probe cannot retrain as the run did")
    per_epoch = max(1, n_train // batch)
    epochs = _steps(hp.get("training_steps"), per_epoch)
    if epochs is None:
        raise FlowscanError(f"{where}: training_steps {hp.get('training_steps')!r} is not open_lth's NepMit form")
    optimizer = {"sgd": "sgd", "adam": "adamw"}.get(hp.get("optimizer_name", "sgd"))
    if optimizer is None:
        raise FlowscanError(f"{where}: optimizer {hp.get('optimizer_name')!r} is not one flowscan trains with")
    rewinds = sorted(Path(where).parent.glob("model_ep*_it*.pth"),
                     key=lambda p: tuple(int(v) for v in re.findall(r"\d+", p.name)))
    if not rewinds:
        raise FlowscanError(f"{Path(where).parent}: no model_ep*_it*.pth rewind weights")
    e, i = (int(v) for v in re.findall(r"\d+", rewinds[0].name))
    ignore = [n.strip() for n in (hp.get("pruning_layers_to_ignore") or "").split(",")
              if n.strip() and n.strip() != "None"]
    args = dict(model=recipe.model, data=recipe.data, rounds=len(run.rounds), epochs=epochs, batch_size=batch,
                lr=float(hp["lr"]), momentum=float(hp.get("momentum", 0) or 0),
                weight_decay=float(hp.get("weight_decay", 0) or 0) if hp.get("weight_decay") != "None" else 0.0,
                optimizer=optimizer, augment=bool(recipe.norm and recipe.norm.augment),
                rewind=float(e * per_epoch + i),
                exclude=f"^({'|'.join(map(re.escape, ignore))})$" if ignore else None)
    notes = [f"retraining as {where} says: {epochs:g} epochs of batch {batch}, lr {args['lr']:g}, momentum "
             f"{args['momentum']:g}, weight decay {args['weight_decay']:g}, rewind to step {e * per_epoch + i}"
             + (f", {', '.join(ignore)} never pruned" if ignore else "")]
    if hp.get("milestone_steps") or hp.get("warmup_steps"):
        notes.append("open_lth's step-wise learning-rate drops and warm-up are replaced by produce's cosine "
                     "schedule from the same initial rate (the retrained errors are close to, not equal to, "
                     "open_lth's)")
    return args, rewinds[0], notes
