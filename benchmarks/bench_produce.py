"""IMP training throughput: flowscan's producer against an open_lth-style baseline, same run.

    python benchmarks/bench_produce.py                       # on a GPU: 50k CIFAR-shaped images
    python benchmarks/bench_produce.py --images 2048 --epochs 1 --rounds 2    # a quick CPU check

Both train ResNet-20 on the same synthetic CIFAR-shaped data (3x32x32, 10 classes) for
`--rounds` IMP rounds of `--epochs` epochs, pruning 20 % globally and rewinding to init:

  baseline   open_lth style: a torch DataLoader on the CPU (2 workers), eager fp32, batch 128,
             masks re-applied after each step
  flowscan   flowscan.produce: data resident on the device, bf16 autocast, channels_last,
             CUDA graphs (torch.compile reduce-overhead), fused SGD, foreach masking; batch 128
             and `--batch` (512 by default)

It prints images/s, wall seconds and final test accuracy per setting, and the throughput ratio
to the baseline.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flowscan.produce import models  # noqa: E402
from flowscan.produce.data import synthetic_images  # noqa: E402
from flowscan.produce.pruning import next_masks  # noqa: E402
from flowscan.produce.train import TrainConfig, Trainer  # noqa: E402


def baseline(data, device, rounds, epochs, batch=128):
    """open_lth-style loop: CPU DataLoader, eager fp32."""
    torch.manual_seed(0)
    model, spec = models.build("cifar-resnet20", data.input_shape, 10)
    model = model.to(device)
    names = models.prunable_names(model, spec)
    params = dict(model.named_parameters())
    init = {k: v.clone() for k, v in model.state_dict().items()}
    masks = {n: torch.ones_like(params[n]) for n in names}
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x_train, data.y_train),
                                         batch_size=batch, shuffle=True, drop_last=True, num_workers=2,
                                         pin_memory=device.type == "cuda", persistent_workers=True)
    images, began = 0, time.perf_counter()
    for _ in range(rounds):
        model.load_state_dict(init)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
        model.train()
        with torch.no_grad():
            for n in names:
                params[n].mul_(masks[n])
        for _epoch in range(epochs):
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for n in names:
                        params[n].mul_(masks[n])
                images += len(y)
        new = next_masks({n: params[n].detach().cpu() for n in names}, {n: m.bool().cpu() for n, m in masks.items()},
                         0.2)
        masks = {n: m.to(device).float() for n, m in new.items()}
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    return images / seconds, seconds, accuracy(model, data, device)


def flowscan_trainer(data, device, rounds, epochs, batch, compile=True):
    torch.manual_seed(0)
    model, spec = models.build("cifar-resnet20", data.input_shape, 10)
    model = model.to(device)
    names = models.prunable_names(model, spec)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    per_epoch = len(data.y_train) // batch
    cfg = TrainConfig(steps=per_epoch * epochs, batch_size=batch, lr=0.1 * batch / 128, compile=compile)
    gpu_data = data.to(device)
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if n in names}
    trainer = Trainer(model, masks, gpu_data, cfg, device)
    images, began = 0, time.perf_counter()
    for n in range(rounds):
        model.load_state_dict(init)
        trainer.set_masks(masks)
        cost = trainer.train(0, cfg.steps, seed=n)
        images += cost["train_images"]
        params = dict(model.named_parameters())
        masks = next_masks({k: params[k].detach().cpu() for k in names}, {k: v.cpu() for k, v in masks.items()}, 0.2)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    return images / seconds, seconds, trainer.evaluate()["test_accuracy"]


@torch.no_grad()
def accuracy(model, data, device):
    model.eval()
    correct = 0
    for i in range(0, len(data.y_test), 1000):
        correct += int((model(data.x_test[i:i + 1000].to(device)).argmax(1) == data.y_test[i:i + 1000].to(device)).sum())
    return correct / len(data.y_test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60_000, help="synthetic images (80 %% train)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    data = synthetic_images(f"3x32x32:{args.images}")
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, ResNet-20, {len(data.y_train)} training images, "
          f"{args.rounds} rounds x {args.epochs} epochs")
    rows = [("open_lth-style baseline, batch 128", *baseline(data, device, args.rounds, args.epochs))]
    rows.append(("flowscan, batch 128", *flowscan_trainer(data, device, args.rounds, args.epochs, 128)))
    if args.batch != 128:
        rows.append((f"flowscan, batch {args.batch}", *flowscan_trainer(data, device, args.rounds, args.epochs,
                                                                        args.batch)))
    base = rows[0][1]
    print(f"{'setting':<38} {'images/s':>10} {'seconds':>8} {'test acc':>8} {'ratio':>6}")
    for name, ips, seconds, acc in rows:
        print(f"{name:<38} {ips:>10.0f} {seconds:>8.1f} {acc:>8.4f} {ips / base:>6.2f}")


if __name__ == "__main__":
    main()
