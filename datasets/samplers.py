"""Distributed sampling for ``--cache_mode``, where each process holds only part of the images.

In cache mode, :class:`datasets.coco.CocoDetection` on node-local rank ``r`` of ``L`` local
processes keeps dataset index ``i`` in memory iff ``i % L == r``.
:class:`NodeDistributedSampler` hands each process only such indices, so every read hits the
cache. Without cache mode use :class:`torch.utils.data.DistributedSampler`.
"""
import math
from collections.abc import Iterator, Sized

import torch
from torch.utils.data import Sampler

from util.dist import get_local_rank, get_local_size, get_rank, get_world_size


class NodeDistributedSampler(Sampler[int]):
    """Like :class:`torch.utils.data.DistributedSampler`, but rank ``rank`` only gets indices
    ``i`` with ``i % local_size == local_rank``.

    Ranks are assumed laid out node by node, as torchrun does: ``rank = node * local_size +
    local_rank``. Each epoch the dataset is permuted (seeded by ``seed + epoch``, see
    :meth:`set_epoch`) or kept in order; the indices of this local-rank share, in that order, are
    padded by repeating them from the start to ``num_samples * num_nodes`` and dealt round-robin to
    the nodes. Every rank yields ``num_samples = ceil(len(dataset) / num_replicas)`` indices, as
    datasets/samplers.py of the original does.

    Args:
        dataset: a sized dataset.
        num_replicas: world size; default from the initialised process group.
        rank: global rank; default from the initialised process group.
        local_rank: rank within the node; default ``LOCAL_RANK`` (0 when not distributed).
        local_size: processes per node; default ``LOCAL_WORLD_SIZE`` (1 when not distributed).
        shuffle: permute the indices each epoch.
        seed: added to the epoch to seed the permutation (0 in the original).
    """

    def __init__(self, dataset: Sized, num_replicas: int | None = None, rank: int | None = None,
                 local_rank: int | None = None, local_size: int | None = None,
                 shuffle: bool = True, seed: int = 0):
        self.num_replicas = get_world_size() if num_replicas is None else num_replicas
        self.rank = get_rank() if rank is None else rank
        self.local_rank = get_local_rank() if local_rank is None else local_rank
        self.local_size = get_local_size() if local_size is None else local_size
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is outside [0, {self.num_replicas})")
        if self.local_size < 1 or self.num_replicas % self.local_size != 0:
            raise ValueError(f"world size {self.num_replicas} is not a multiple of the local size "
                             f"{self.local_size}")
        if self.rank % self.local_size != self.local_rank:
            raise ValueError(f"rank {self.rank} is not local rank {self.local_rank} of a node with "
                             f"{self.local_size} processes (expected rank % local_size == local_rank)")
        if len(dataset) < self.local_size:
            raise ValueError(f"dataset of {len(dataset)} items cannot be shared by {self.local_size} "
                             f"local processes")
        self.dataset = dataset
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.num_nodes = self.num_replicas // self.local_size
        self.num_samples = math.ceil(len(dataset) / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        share = [i for i in order if i % self.local_size == self.local_rank]
        share_size = self.num_samples * self.num_nodes
        share = (share * math.ceil(share_size / len(share)))[:share_size]
        node = self.rank // self.local_size
        return iter(share[node::self.num_nodes])

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Use a different permutation for ``epoch``; call before each epoch's iteration."""
        self.epoch = epoch
