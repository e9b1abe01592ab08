"""`make bench`: vanishlab's speed against baselines measured in the same run.

Needs the real MNIST files (DATA_DIR, default <project>/data). Prints one ratio per target:
- Lightning epoch / plain loop over the same in-memory tensors     (target <= 1.25)
- DataLoader + ToTensor/Normalize epoch / Lightning epoch           (target >= 6)
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from vanishlab.config import CONFIG_DIR, PROJECT_ROOT
from vanishlab.train import build, build_trainer

DATA_DIR = os.environ.get("DATA_DIR", str(PROJECT_ROOT / "data"))
EPOCHS = 3  # the median epoch is reported; the first one warms up


class EpochTimer(pl.Callback):
    """Times each training epoch's batches (not validation or checkpointing)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        if batch_idx == trainer.num_training_batches - 1:
            self.seconds.append(time.perf_counter() - self.start)


def lightning_epoch(overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as out, initialize_config_dir(str(CONFIG_DIR), "1.3"):
        cfg = compose(
            "train",
            [
                f"paths.output_dir={out}",
                f"paths.data_dir={DATA_DIR}",
                f"trainer.max_epochs={EPOCHS}",
                *overrides,
            ],
        )
        pl.seed_everything(0, verbose=False)
        datamodule, module = build(cfg)
        timer = EpochTimer()
        trainer = build_trainer(cfg)
        trainer.callbacks.append(timer)
        trainer.fit(module, datamodule=datamodule)
        return statistics.median(timer.seconds)


def plain_epoch(batches) -> float:
    """The same model, init, loss and optimizer in a hand-written loop: the baseline."""
    with tempfile.TemporaryDirectory() as out, initialize_config_dir(str(CONFIG_DIR), "1.3"):
        cfg = compose("train", [f"paths.output_dir={out}", f"paths.data_dir={DATA_DIR}"])
        pl.seed_everything(0, verbose=False)
        _, module = build(cfg)
    net, loss_fn, optimizer = module.net, module.loss_fn, module.optimizer(module.parameters())
    seconds = []
    for _ in range(EPOCHS):
        start = time.perf_counter()
        for x, y in batches():
            optimizer.zero_grad()
            loss_fn(net(x), y).backward()
            optimizer.step()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def tensor_batches():
    """Batches sliced from in-memory tensors, as vanishlab's data module serves them."""
    with tempfile.TemporaryDirectory() as out, initialize_config_dir(str(CONFIG_DIR), "1.3"):
        cfg = compose("train", [f"paths.output_dir={out}", f"paths.data_dir={DATA_DIR}"])
        datamodule, _ = build(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return lambda: iter(datamodule.train_dataloader())


def dataloader_batches():
    """The original course pipeline: PIL images through ToTensor + Normalize, one at a time."""
    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]
    )
    dataset = datasets.MNIST(DATA_DIR, train=True, transform=transform)
    loader = DataLoader(dataset, batch_size=200, shuffle=True)
    return lambda: ((x.flatten(1), y) for x, y in loader)


def report(name: str, ratio: float, target: str, ok: bool) -> None:
    print(f"{name:<62} {ratio:6.2f}x  (target {target}) {'OK' if ok else 'MISSED'}")


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    plain = plain_epoch(tensor_batches())
    lightning = lightning_epoch(["experiment=seed"])
    course = plain_epoch(dataloader_batches())
    print(
        f"epoch seconds: plain loop {plain:.3f}, vanishlab {lightning:.3f}, "
        f"DataLoader+transforms {course:.3f}"
    )
    report(
        "vanishlab epoch / plain loop on in-memory tensors",
        lightning / plain,
        "<= 1.25",
        lightning / plain <= 1.25,
    )
    report(
        "DataLoader+transforms epoch / vanishlab epoch",
        course / lightning,
        ">= 6",
        course / lightning >= 6,
    )


if __name__ == "__main__":
    main()
