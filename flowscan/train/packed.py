"""Several models of one architecture trained as one: the seeds of an IMP round share a GPU.

The models of IMP research are small; one of them leaves most of a GPU idle. Packing puts S
copies side by side in the channel dimension: a convolution becomes a grouped one (groups x S),
a batch norm normalises S x C channels (each its own), and a linear layer multiplies each
seed's slice of the features by that seed's weights. Every packed tensor is the seeds' tensors
concatenated along dimension 0, so packing and unpacking is a concatenation and a split, and the
parameter names stay the model's own (masks, optimiser groups and weight decay carry over).

Each seed keeps its own data order and augmentation (its batch fills its own input channels), and
the loss is the sum of the seeds' losses, so every seed's gradient, SGD step and mask are its
own: packed training is one-at-a-time training computed together, up to floating-point
summation order (tests/test_packed.py compares both).

A model packs when every module with parameters or buffers is a Conv2d, Linear or BatchNorm and
the packed forward pass reproduces each seed's outputs (`pack` checks this on random inputs, so
forward code that mixes channels is refused rather than trained wrongly).
"""

from __future__ import annotations

import copy
import time
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from flowscan.train.trainer import Trainer


class NotPackable(ValueError):
    """The model cannot be trained packed (named reason); train its seeds one at a time."""


class PackedLinear(nn.Module):
    """S linear layers over the S seed slices of the features: (N, S*in) -> (N, S*out).
    The weight is the seeds' weights concatenated, (S*out, in), as an nn.Linear's would be."""

    def __init__(self, layer: nn.Linear, seeds: int):
        super().__init__()
        self.seeds, self.in_features, self.out_features = seeds, layer.in_features, layer.out_features
        self.weight = nn.Parameter(layer.weight.detach().repeat(seeds, 1))
        self.bias = nn.Parameter(layer.bias.detach().repeat(seeds)) if layer.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.seeds, self.in_features)
        w = self.weight.view(self.seeds, self.out_features, self.in_features)
        out = torch.einsum("nsi,soi->nso", x, w).reshape(*lead, self.seeds * self.out_features)
        return out + self.bias if self.bias is not None else out


def _packed_module(module: nn.Module, seeds: int) -> nn.Module:
    if type(module) is nn.Conv2d:
        if module.padding_mode != "zeros":
            raise NotPackable(f"Conv2d with padding_mode={module.padding_mode!r}")
        c = module
        return nn.Conv2d(c.in_channels * seeds, c.out_channels * seeds, c.kernel_size, c.stride, c.padding,
                         c.dilation, c.groups * seeds, c.bias is not None, device=c.weight.device,
                         dtype=c.weight.dtype)
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d):
        b = module
        return type(b)(b.num_features * seeds, b.eps, b.momentum, b.affine, b.track_running_stats,
                       device=b.weight.device if b.weight is not None else None)
    if type(module) is nn.Linear:
        return PackedLinear(module, seeds)
    raise NotPackable(f"{type(module).__name__} layers")


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def pack_state(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The packed state of S models' states: tensors concatenated along dimension 0; scalars
    (BatchNorm's step count) are equal across seeds trained together and taken from the first."""
    return {k: torch.cat([s[k] for s in states]) if v.dim() else v.clone() for k, v in states[0].items()}


def unpack_state(packed: dict[str, torch.Tensor], seeds: int) -> list[dict[str, torch.Tensor]]:
    return [{k: (v.chunk(seeds)[s] if v.dim() else v).clone() for k, v in packed.items()} for s in range(seeds)]


class PackedModel(nn.Module):
    """S copies of a model side by side; input (N, S*C, ...) with seed s in channels s*C..,
    output (N, S, classes)."""

    def __init__(self, model: nn.Module, seeds: int):
        super().__init__()
        self.seeds = seeds
        self.inner = copy.deepcopy(model)
        for name, module in list(self.inner.named_modules()):
            if name and _has_state(module):
                parent_name, _, child = name.rpartition(".")
                parent = self.inner.get_submodule(parent_name) if parent_name else self.inner
                setattr(parent, child, _packed_module(module, self.seeds))
        if _has_state(self.inner):
            raise NotPackable(f"{type(model).__name__} holds parameters of its own")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return out.reshape(out.shape[0], self.seeds, -1)

    def load_seeds(self, models: Sequence[nn.Module]) -> None:
        self.inner.load_state_dict(pack_state([m.state_dict() for m in models]))

    def store_seeds(self, models: Sequence[nn.Module]) -> None:
        for model, state in zip(models, unpack_state(self.inner.state_dict(), self.seeds)):
            model.load_state_dict(state)


def pack_inputs(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The seeds' batches, (N, C, ...) each, as one packed input (N, S*C, ...)."""
    return torch.cat(list(xs), dim=1)


def pack(models: Sequence[nn.Module], example: torch.Tensor, tolerance: float = 1e-4) -> PackedModel:
    """A packed model of `models` (same architecture), checked to give each one's outputs on
    random inputs shaped like `example` (one input per model). Raises NotPackable."""
    first = models[0]
    if any(type(m) is not type(first) or m.state_dict().keys() != first.state_dict().keys() for m in models):
        raise NotPackable("the models differ in architecture")
    if not example.is_floating_point():
        raise NotPackable("inputs are not images or features (token inputs)")
    packed = PackedModel(first, len(models)).to(example.device)
    packed.load_seeds(models)
    generator = torch.Generator().manual_seed(0)
    xs = [torch.randn((4, *example.shape[1:]), generator=generator).to(example.device) for _ in models]
    modes = [m.training for m in models]
    try:
        with torch.no_grad():
            for m in (*models, packed):
                m.eval()
            together = packed(pack_inputs(xs))
            for s, (model, x) in enumerate(zip(models, xs)):
                alone = model(x).reshape(len(x), -1)
                scale = float(alone.abs().max()) + 1e-6
                if together.shape[-1] != alone.shape[-1] or float((together[:, s] - alone).abs().max()) > tolerance * scale:
                    raise NotPackable("its forward pass mixes the seeds' channels")
    except RuntimeError as exc:
        raise NotPackable(f"its forward pass does not take packed inputs ({str(exc).splitlines()[0]})") from None
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return packed


class PackedTrainer(Trainer):
    """Trains S models together under their own masks and data orders (see the module docstring).

    `models` keep their own parameters between rounds: `train` packs them, trains, and writes the
    result back, so everything else (rewinding, pruning, evaluation, writing rounds) stays per seed."""

    def __init__(self, models: Sequence[nn.Module], masks: Sequence[dict[str, torch.Tensor]], data, cfg, device):
        self.models = list(models)
        packed = pack(self.models, data.x_test[:1].to(device))
        super().__init__(packed, {f"inner.{k}": v for k, v in pack_state(list(masks)).items()}, data, cfg, device)

    def set_seed_masks(self, masks: Sequence[dict[str, torch.Tensor]]) -> None:
        self.set_masks({f"inner.{k}": v.to(self.device) for k, v in pack_state(list(masks)).items()})

    def _batches(self, seeds: Sequence[int]):
        sources = [super(PackedTrainer, self)._batches(seed) for seed in seeds]

        def next_batch():
            xs, ys = zip(*(source() for source in sources))
            return pack_inputs(xs), torch.stack(ys, dim=1)
        return next_batch

    def _losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda):
            logits = self.forward(self._inputs(x))            # (N, S, classes)
            # per seed the mean over its batch, as alone: the sum's gradient is each seed's own
            return F.cross_entropy(logits.permute(0, 2, 1), y, reduction="none").mean(0)

    def train_seeds(self, start: int, stop: int, seeds: Sequence[int],
                    progress: Callable[[int], None] | None = None) -> list[dict]:
        """Steps start..stop-1 for every seed (`seeds[s]` seeds the data order of model s); the
        models are updated in place. Returns each seed's cost: its share of the wall time."""
        self.model.load_seeds(self.models)
        self.apply_masks()
        losses, seconds = self._run_steps(start, stop, self._batches(seeds), progress)
        self.model.store_seeds(self.models)
        n = len(self.models)
        batch = min(self.cfg.batch_size, len(self.data.y_train))
        return [{"train_steps": stop - start, "train_seconds": seconds / n, "train_images": (stop - start) * batch,
                 "train_loss": float(losses[:, s].mean()) if losses is not None else float("nan"),
                 "packed_seeds": float(n)} for s in range(n)]


def try_pack(models: Sequence[nn.Module], masks, data, cfg, device) -> tuple[PackedTrainer | None, str]:
    """A PackedTrainer, or None and why the seeds must be trained one at a time."""
    began = time.perf_counter()
    try:
        trainer = PackedTrainer(models, masks, data, cfg, device)
    except NotPackable as exc:
        return None, f"seeds trained one at a time: the model cannot be packed ({exc})"
    return trainer, (f"{len(models)} seeds trained together, packed into one model "
                     f"(checked against each seed's own outputs in {time.perf_counter() - began:.1f} s)")
