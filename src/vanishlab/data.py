"""MNIST-family data held as normalised tensors on the training device.

torchvision reads (or downloads) the IDX files once per process; batches are then slices of one
tensor per split, taken by a shuffled index each epoch. This skips per-sample PIL conversion,
transforms and worker processes, which would otherwise cost more than the small MLPs we train.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor
from torchvision import datasets

from vanishlab import ConfigError

DATASETS: dict[str, type[datasets.MNIST]] = {
    "mnist": datasets.MNIST,
    "fashion_mnist": datasets.FashionMNIST,
}
TRAIN_SIZE = 60_000
TEST_SIZE = 10_000
SAMPLE_SHAPE = (1, 28, 28)  # one image, channels first: what the network gets per example


class TensorBatches:
    """An iterable of `(x, y)` batches over tensors already on their device.

    Lightning accepts any sized iterable as a dataloader. Each pass draws its order from
    `generator` (None = the stored order), so successive epochs continue one random sequence.
    `batch_size` is global: under DDP each of the `world_size` ranks takes its own equal share of
    every batch, and DDP's gradient average over the shares is the mean over the whole batch, so
    a run on 2 devices takes the steps a run on one takes. A last, partial batch is dropped
    under DDP, where it could not be shared out equally (ranks that run unequal numbers of steps
    hang).
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        generator: torch.Generator | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.generator = generator
        self.rank, self.world_size = rank, world_size
        self.share = batch_size // world_size

    def __len__(self) -> int:
        full, rest = divmod(len(self.x), self.batch_size)
        return full + (rest > 0 and self.world_size == 1)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # index_select gathers the rows as they lie; indexing (x[batch]) takes a general
        # gather's path, twice as slow on the CPU
        for batch in self.batch_indices():
            yield self.x.index_select(0, batch), self.y.index_select(0, batch)

    def batch_indices(self) -> Iterator[Tensor]:
        """Each batch's indices into `x` and `y`, in this pass's order (a fused stack gathers
        its jobs' batches at once from them)."""
        n = len(self.x)
        if self.generator is None:
            order = torch.arange(n, device=self.x.device)
        else:
            order = torch.randperm(n, generator=self.generator).to(self.x.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch = order[start : start + self.batch_size]
            if self.world_size > 1:
                batch = batch[self.rank * self.share : (self.rank + 1) * self.share]
            yield batch


@lru_cache(maxsize=4)
def load_split(
    dataset: str, data_dir: str, train: bool, download: bool, mean: float, std: float
) -> tuple[Tensor, Tensor]:
    """One split as normalised float images `(n, 1, 28, 28)` and int64 labels.

    Cached, so the jobs of a sweep that run in one process decode and normalise it only once.
    """
    cls = DATASETS[dataset]
    raw = Path(data_dir) / cls.__name__ / "raw"
    prefix = "train" if train else "t10k"
    files = f"{prefix}-images-idx3-ubyte and {prefix}-labels-idx1-ubyte"
    try:
        ds = cls(data_dir, train=train, download=download)
    except RuntimeError as err:
        if "Dataset not found" in str(err):
            raise _missing(data_dir, cls, raw, "data.download=false") from None
        if "Error downloading" in str(err):
            reason = f"downloading them failed: {' '.join(str(err).split())}"
            raise _missing(data_dir, cls, raw, reason) from None
        raise _corrupt(
            data_dir, raw, files, err
        ) from None  # a payload that does not fit its header
    except (AssertionError, ValueError, TypeError) as err:  # a bad magic number or dtype
        raise _corrupt(data_dir, raw, files, err) from None
    images, labels = ds.data, ds.targets
    bad_label = labels.max() >= len(cls.classes)
    if images.shape[1:] != SAMPLE_SHAPE[1:] or len(images) != len(labels) or bad_label:
        raise _corrupt(data_dir, raw, files, f"{tuple(images.shape)} images, {len(labels)} labels")
    # In place: each new 188 MB tensor would cost its page faults, three times over.
    return images.unsqueeze(1).float().div_(255).sub_(mean).div_(std), labels


def _missing(data_dir: str, cls: type, raw: Path, reason: str) -> ConfigError:
    return ConfigError(
        f"data.data_dir={data_dir!r} has no {cls.__name__} files: they are not there and {reason}. "
        f"The files must be at {raw}/ and are named train-images-idx3-ubyte, "
        f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte "
        f"(uncompressed IDX, as torchvision stores them). "
        f"Fix: set DATA_DIR (or data.data_dir=...) to the folder that holds {cls.__name__}/raw/, "
        f"or set data.download=true on a machine with internet access."
    )


def _corrupt(data_dir: str, raw: Path, files: str, detail: object) -> ConfigError:
    return ConfigError(
        f"data.data_dir={data_dir!r} holds corrupt or truncated IDX files: {files} in {raw}/ "
        f"do not match their headers ({detail or 'bad magic number'}). "
        f"Fix: delete them and run again with data.download=true, or copy intact files there."
    )


def split_train_val(n: int, val_size: int) -> tuple[Tensor, Tensor]:
    """A fixed split (its own seed), so every run of a sweep validates on the same images."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return order[val_size:], order[:val_size]


@lru_cache(maxsize=4)
def load_splits(
    dataset: str,
    data_dir: str,
    download: bool,
    mean: float,
    std: float,
    val_size: int,
    device: torch.device,
) -> dict[str, tuple[Tensor, Tensor]]:
    """The train, val and test splits on `device`. Cached, so the jobs of a sweep or a stack that
    run in one process share one copy: the training split alone is 170 MB of floats.
    `val_size=0` validates on the test split."""
    train_x, train_y = load_split(dataset, data_dir, True, download, mean, std)
    splits = {"test": load_split(dataset, data_dir, False, download, mean, std)}
    if val_size:
        train_idx, val_idx = split_train_val(len(train_x), val_size)
        splits["train"] = (train_x[train_idx], train_y[train_idx])
        splits["val"] = (train_x[val_idx], train_y[val_idx])
    else:
        splits["train"] = (train_x, train_y)
        splits["val"] = splits["test"]
    return {name: (x.to(device), y.to(device)) for name, (x, y) in splits.items()}


class MNISTDataModule(pl.LightningDataModule):
    """MNIST or Fashion-MNIST, normalised, with an optional validation split from train.

    `val_size=0` evaluates the test split each epoch instead, as the original course code did.
    `train_subset=n` trains on the first n images of the training split, in its fixed order (so
    a random but fixed subset, the same in every run, never a validation image; with
    `val_size=0`, the first n of the file): `batch_size=n` makes each step full-batch gradient
    descent.
    The training order comes from one generator seeded by `seed`; its state is saved in
    checkpoints (`state_dict`), so a resumed run's epoch k sees the batches an uninterrupted
    run's epoch k sees. Under `trainer.overfit_batches` the order is fixed, as Lightning asks.
    """

    sample_shape = SAMPLE_SHAPE

    def __init__(
        self,
        data_dir: str,
        dataset: str = "mnist",
        batch_size: int = 200,
        val_size: int = 5000,
        train_subset: int | None = None,
        download: bool = True,
        mean: float = 0.1307,
        std: float = 0.3081,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.dataset = dataset
        self.num_classes = len(DATASETS[dataset].classes)
        self.data_dir = str(Path(data_dir).expanduser().resolve())
        self.batch_size = batch_size
        self.val_size = val_size
        self.train_subset = train_subset
        self.download = download
        self.mean, self.std = mean, std
        self.shuffle = torch.Generator().manual_seed(seed)
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}  # set up by `setup`

    def state_dict(self) -> dict[str, Tensor]:
        return {"shuffle": self.shuffle.get_state()}

    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        self.shuffle.set_state(state_dict["shuffle"])

    def prepare_data(self) -> None:
        """Read both splits (missing or corrupt files fail here) and check `train_subset`
        against the training split they give, before any trainer exists."""
        train_x, _ = self._load(train=True)
        self._load(train=False)
        available = len(train_x) - self.val_size
        if self.train_subset is not None and self.train_subset > available:
            raise ConfigError(
                f"data.train_subset={self.train_subset} is not allowed: the training split has "
                f"{available} images ({len(train_x)} less data.val_size={self.val_size}). Fix: "
                f"set data.train_subset to at most {available}, or null to train on them all."
            )

    def setup(self, stage: str | None = None) -> None:
        world_size = self.trainer.world_size if self.trainer else 1
        if self.batch_size % world_size:
            raise ConfigError(
                f"data.batch_size={self.batch_size} is not allowed: it is the global batch, "
                f"shared out equally among the {world_size} DDP processes. Fix: set "
                f"data.batch_size to a multiple of {world_size}, e.g. {world_size * 100}."
            )
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        splits = load_splits(
            self.dataset, self.data_dir, self.download, self.mean, self.std, self.val_size, device
        )
        train_x, train_y = splits["train"]
        n = self.train_subset  # None: all of them
        self.splits = {**splits, "train": (train_x[:n], train_y[:n])}  # a view, not a copy

    def _load(self, train: bool) -> tuple[Tensor, Tensor]:
        return load_split(self.dataset, self.data_dir, train, self.download, self.mean, self.std)

    def _batches(self, split: str, generator: torch.Generator | None = None) -> TensorBatches:
        x, y = self.splits[split]
        rank, world = (
            (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        )
        return TensorBatches(x, y, self.batch_size, generator, rank, world)

    def train_dataloader(self) -> TensorBatches:
        overfitting = self.trainer is not None and self.trainer.overfit_batches > 0
        return self._batches("train", None if overfitting else self.shuffle)

    def val_dataloader(self) -> TensorBatches:
        return self._batches("val")

    def test_dataloader(self) -> TensorBatches:
        return self._batches("test")
