"""The training and validation DataLoaders, with the original's samplers, and the per-sample
seeding of the training augmentation."""
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, SequentialSampler

from util.misc import collate_fn

from .samplers import NodeDistributedSampler, ResumableSampler


class SeededSamples(Dataset):
    """``dataset`` indexed by ``(index, seed)`` pairs (from :class:`~datasets.samplers.ResumableSampler`):
    ``dataset[index]`` drawn with Python's and torch's (CPU) random generators seeded by ``seed``,
    and left as they were afterwards.

    Those are the generators the transforms draw from (:mod:`datasets.transforms`), so a sample's
    augmentation is the same whichever loader worker, or the main process, draws it, and whatever
    that process drew before: what makes a run resumable mid-epoch, and its data the same for any
    ``--num_workers``. (A transform drawing from NumPy's generator would not be: it stays seeded per
    worker, by the loader.)
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        python_state, torch_state = random.getstate(), torch.get_rng_state()
        random.seed(seed)
        # the CPU generator alone: torch.manual_seed would seed every device's, 70x slower
        torch.default_generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            random.setstate(python_state)
            torch.set_rng_state(torch_state)


@dataclass
class Loaders:
    """``train`` draws full batches through ``train_sampler``, whose ``set_epoch`` is called
    before every epoch; ``val`` goes through the validation set in order, the last batch possibly
    smaller. ``train`` is None for an evaluation alone."""
    train: DataLoader | None
    val: DataLoader
    train_sampler: ResumableSampler | None


def build_loaders(dataset_train: Dataset | None, dataset_val: Dataset, batch_size: int, num_workers: int,
                  distributed: bool = False, node_local: bool = False, pin_memory: bool = False,
                  rank: int = 0, world_size: int = 1, seed: int = 0,
                  worker_init_fn: Callable[[int], None] | None = None) -> Loaders:
    """DataLoaders of ``batch_size`` images per process over the two splits (the training split
    left out when None).

    Distributed, process ``rank`` of ``world_size`` reads its share of each split
    (``node_local``: the shares of a node's processes together cover only the images that node
    holds, for cached images); otherwise the whole splits. Training goes in the order of the
    original's distributed sampler (:class:`~datasets.samplers.ResumableSampler`, its sample
    seeds from ``seed``), validation in order. ``worker_init_fn`` runs first in every loader worker.
    """
    train, sampler_train = None, None
    if dataset_train is not None:
        if node_local and distributed:
            inner = NodeDistributedSampler(dataset_train)
        else:
            inner = DistributedSampler(dataset_train, num_replicas=world_size, rank=rank, shuffle=True)
        sampler_train = ResumableSampler(inner, rank=rank, num_replicas=world_size, seed=seed)
        # generator: the loader draws its workers' base seed from it, not from the global generator
        # that dropout draws from (and the samples are seeded anyway)
        train = DataLoader(SeededSamples(dataset_train), batch_sampler=BatchSampler(sampler_train, batch_size, True),
                           collate_fn=collate_fn, num_workers=num_workers, pin_memory=pin_memory,
                           generator=torch.Generator(), worker_init_fn=worker_init_fn)
    if distributed:
        sampler_val = (NodeDistributedSampler if node_local else DistributedSampler)(dataset_val, shuffle=False)
    else:
        sampler_val = SequentialSampler(dataset_val)
    val = DataLoader(dataset_val, batch_size, sampler=sampler_val, drop_last=False, collate_fn=collate_fn,
                     num_workers=num_workers, pin_memory=pin_memory, worker_init_fn=worker_init_fn)
    return Loaders(train=train, val=val, train_sampler=sampler_train)
