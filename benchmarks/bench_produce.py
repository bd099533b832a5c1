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
  seeds      flowscan's trainer on `--seeds` seeds (3 by default), one after another and packed
             into one model (the seeds of a round trained together, flowscan/train/packed.py);
             images/s count every seed's images

It prints images/s, wall seconds and final test accuracy per setting, and the throughput ratio
to the baseline.

    python benchmarks/bench_produce.py --shared-cpu          # CPU threads on an idle and a shared machine

times LeNet training (images/s) and one Hessian-vector product of sharpness's power iteration on
the CPU, in fresh processes, with torch's defaults (one spinning thread per core), with
OMP_WAIT_POLICY=PASSIVE, with one thread, and with flowscan's choice (flowscan/cpu.py), first on
an idle machine and then with a second process spinning on one core; the median of `--repeats`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flowscan.train import models  # noqa: E402
from flowscan.train.data import synthetic_images  # noqa: E402
from flowscan.produce.pruning import next_masks  # noqa: E402
from flowscan.train.packed import PackedTrainer  # noqa: E402
from flowscan.train.trainer import TrainConfig, Trainer  # noqa: E402


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


def flowscan_trainer(data, device, rounds, epochs, batch, seeds=1, packed=False, compile=True):
    """flowscan's trainer on `seeds` seeds of ResNet-20, one after another or packed into one model
    (flowscan/train/packed.py): images/s over all seeds, seconds, mean final test accuracy."""
    nets, inits = [], []
    for seed in range(seeds):
        torch.manual_seed(seed)
        model, spec = models.build("cifar-resnet20", data.input_shape, 10)
        nets.append(model.to(device))
        inits.append({k: v.clone() for k, v in model.state_dict().items()})
    names = models.prunable_names(nets[0], spec)
    per_epoch = len(data.y_train) // batch
    cfg = TrainConfig(steps=per_epoch * epochs, batch_size=batch, lr=0.1 * batch / 128, compile=compile)
    gpu_data = data.to(device)
    masks = [{n: torch.ones_like(p, dtype=torch.bool) for n, p in net.named_parameters() if n in names}
             for net in nets]
    if packed:
        together = PackedTrainer(nets, masks, gpu_data, cfg, device)
    else:
        alone = [Trainer(net, mask, gpu_data, cfg, device) for net, mask in zip(nets, masks)]
    images, began = 0, time.perf_counter()
    for n in range(rounds):
        for net, init in zip(nets, inits):
            net.load_state_dict(init)
        if packed:
            together.set_seed_masks(masks)
            costs = together.train_seeds(0, cfg.steps, [n * 1000 + s for s in range(seeds)])
        else:
            costs = []
            for s, (trainer, mask) in enumerate(zip(alone, masks)):
                trainer.set_masks(mask)
                costs.append(trainer.train(0, cfg.steps, seed=n * 1000 + s))
        images += sum(c["train_images"] for c in costs)
        masks = [next_masks({k: dict(net.named_parameters())[k].detach().cpu() for k in names},
                            {k: v.cpu() for k, v in mask.items()}, 0.2) for net, mask in zip(nets, masks)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    return images / seconds, seconds, sum(accuracy(net, data, device) for net in nets) / seeds


@torch.no_grad()
def accuracy(model, data, device):
    model.eval()
    correct = 0
    for i in range(0, len(data.y_test), 1000):
        correct += int((model(data.x_test[i:i + 1000].to(device)).argmax(1) == data.y_test[i:i + 1000].to(device)).sum())
    return correct / len(data.y_test)


def cpu_child(threads: str, seconds: float) -> None:
    """One measurement (a fresh process, so OpenMP reads its environment): LeNet steps of batch 128
    for `seconds`, then one Hessian-vector product over 512 images; prints a JSON line."""
    import json
    import os

    from flowscan import cpu
    from flowscan.landscape import hessian

    if threads == "flowscan":
        cpu.configure_torch_threads()
    elif threads != "default":
        torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    model, _ = models.build("lenet", (1, 28, 28), 10)
    x, y = torch.randn(4096, 1, 28, 28), torch.randint(0, 10, (4096,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def step(i):
        at = (i * 128) % (4096 - 128)
        opt.zero_grad()
        F.cross_entropy(model(x[at:at + 128]), y[at:at + 128]).backward()
        opt.step()
    for i in range(10):
        step(i)
    began, n = time.perf_counter(), 0
    while time.perf_counter() - began < seconds:
        step(n)
        n += 1
    images = n * 128 / (time.perf_counter() - began)
    data = type("D", (), {"x_train": x, "y_train": y})()
    began = time.perf_counter()
    hessian.top_eigenvalue(model, data, {}, subset=512, tol=0.0, max_iter=3)
    print(json.dumps({"images_per_s": images, "hvp_s": (time.perf_counter() - began) / 3,
                      "threads": torch.get_num_threads(), "wait": os.environ.get("OMP_WAIT_POLICY", "default")}))


def shared_cpu(repeats: int, seconds: float) -> None:
    import json
    import os
    import statistics
    import subprocess

    settings = {"torch defaults (a spinning thread per core)": ("", "default"),
                "OMP_WAIT_POLICY=PASSIVE": ("PASSIVE", "default"),
                "one thread": ("", "1"),
                "flowscan (PASSIVE, threads = free cores)": ("PASSIVE", "flowscan")}
    print(f"{'machine':<8} {'setting':<42} {'images/s':>9} {'HVP s':>7} threads")
    for busy in (False, True):
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            time.sleep(0.5 if busy else 0)
            for name, (wait, threads) in settings.items():
                env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
                if wait:
                    env["OMP_WAIT_POLICY"] = wait
                runs = [json.loads(subprocess.run([sys.executable, __file__, "--cpu-child", threads, "--seconds",
                                                   str(seconds)], env=env, check=True, capture_output=True,
                                                  text=True).stdout.strip().splitlines()[-1]) for _ in range(repeats)]
                print(f"{'shared' if busy else 'idle':<8} {name:<42} "
                      f"{statistics.median(r['images_per_s'] for r in runs):>9.0f} "
                      f"{statistics.median(r['hvp_s'] for r in runs):>7.3f} {runs[0]['threads']}", flush=True)
        finally:
            if spinner:
                spinner.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared-cpu", action="store_true", help="CPU thread settings, idle and shared (see above)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="training time per --shared-cpu measurement")
    parser.add_argument("--cpu-child", help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, default=60_000, help="synthetic images (80 %% train)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--seeds", type=int, default=3, help="seeds for packed vs one at a time (0: skip)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.cpu_child:
        return cpu_child(args.cpu_child, args.seconds)
    if args.shared_cpu:
        return shared_cpu(args.repeats, args.seconds)
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
    if args.seeds > 1:
        for packed in (False, True):
            rows.append((f"flowscan, {args.seeds} seeds {'packed' if packed else 'one at a time'}, batch 128",
                         *flowscan_trainer(data, device, args.rounds, args.epochs, 128, args.seeds, packed)))
    base = rows[0][1]
    print(f"{'setting':<44} {'images/s':>10} {'seconds':>8} {'test acc':>8} {'ratio':>6}")
    for name, ips, seconds, acc in rows:
        print(f"{name:<44} {ips:>10.0f} {seconds:>8.1f} {acc:>8.4f} {ips / base:>6.2f}")


if __name__ == "__main__":
    main()
