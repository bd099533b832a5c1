"""IMP archives written by PyTorch Lightning itself, as its users write them: `ModelPruning` with
`use_lottery_ticket_hypothesis=True` prunes 20 % at the end of every epoch and `ModelCheckpoint`
saves `epoch=E-step=S.ckpt` each epoch (and `last.ckpt`). With `make_pruning_permanent=True` the
saved weights carry zeros (masks inferred); with False the state dict holds
`weight_orig`/`weight_mask` (torch.nn.utils.prune's layout). Needs `pip install lightning`.

    python tests/lightning_archives.py OUT      writes both archives below OUT
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path


def write(out: Path, permanent: bool, epochs: int = 4) -> Path:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint, ModelPruning
    from torch import nn

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))

        def training_step(self, batch, _index):
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    x, y = torch.randn(256, 20), torch.randint(0, 4, (256,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    net = Net()
    pruning = ModelPruning("l1_unstructured", amount=0.2, use_global_unstructured=True,
                           use_lottery_ticket_hypothesis=True, make_pruning_permanent=permanent, verbose=0,
                           parameters_to_prune=[(net.model[0], "weight"), (net.model[2], "weight")])
    checkpoints = ModelCheckpoint(dirpath=out, save_top_k=-1, every_n_epochs=1, save_last=True)
    trainer = L.Trainer(max_epochs=epochs, callbacks=[pruning, checkpoints], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(net, loader)
    return out


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "lightning-archives")
    for permanent in (True, False):
        write(root / ("permanent" if permanent else "reparametrized"), permanent)
    print(f"two Lightning IMP archives in {root}")
