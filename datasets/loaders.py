"""The training and validation DataLoaders, with the original's samplers."""
from dataclasses import dataclass

from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from util.misc import collate_fn

from .samplers import NodeDistributedSampler


@dataclass
class Loaders:
    """``train`` draws shuffled, full batches through ``train_sampler`` (whose ``set_epoch`` a
    distributed run calls every epoch); ``val`` goes through the validation set in order, the last
    batch possibly smaller."""
    train: DataLoader
    val: DataLoader
    train_sampler: Sampler


def build_loaders(dataset_train: Dataset, dataset_val: Dataset, batch_size: int, num_workers: int,
                  distributed: bool = False, node_local: bool = False, pin_memory: bool = False) -> Loaders:
    """DataLoaders of ``batch_size`` images per process over the two splits.

    Distributed, each process reads its share of each split (``node_local``: the shares of a
    node's processes together cover only the images that node holds, for cached images); otherwise
    random order for training and sequential for validation.
    """
    if distributed:
        sampler_type = NodeDistributedSampler if node_local else DistributedSampler
        sampler_train, sampler_val = sampler_type(dataset_train), sampler_type(dataset_val, shuffle=False)
    else:
        sampler_train, sampler_val = RandomSampler(dataset_train), SequentialSampler(dataset_val)
    batch_sampler = BatchSampler(sampler_train, batch_size, drop_last=True)
    loader_train = DataLoader(dataset_train, batch_sampler=batch_sampler, collate_fn=collate_fn,
                              num_workers=num_workers, pin_memory=pin_memory)
    loader_val = DataLoader(dataset_val, batch_size, sampler=sampler_val, drop_last=False, collate_fn=collate_fn,
                            num_workers=num_workers, pin_memory=pin_memory)
    return Loaders(train=loader_train, val=loader_val, train_sampler=sampler_train)
