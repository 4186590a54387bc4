"""Samplers: the training epochs' order, resumable mid-epoch with a seed per sample, and the
distributed sampling of ``--cache_mode``.

:class:`ResumableSampler` deals each process its share of an epoch as ``(dataset index, seed)``
pairs, from any position on; the seed makes each sample's augmentation a function of the run's
seed, the epoch and the sample's place in the epoch alone (see
:class:`~datasets.loaders.SeededSamples`), whatever worker or process loads it.

In cache mode, :class:`datasets.coco.CocoDetection` on node-local rank ``r`` of ``L`` local
processes keeps dataset index ``i`` in memory iff ``i % L == r``.
:class:`NodeDistributedSampler` hands each process only such indices, so every read hits the
cache. Without cache mode the order is :class:`torch.utils.data.DistributedSampler`'s.
"""
import math
from collections.abc import Iterator, Sized

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DistributedSampler, Sampler

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


class ResumableSampler(Sampler[tuple[int, int]]):
    """This process's share of each training epoch, as ``(dataset index, sample seed)`` pairs,
    from a given position on.

    The share is that of ``inner`` (a :class:`~torch.utils.data.DistributedSampler`, one with
    ``num_replicas=1`` for a single process, or a :class:`NodeDistributedSampler`): the order of
    the original's distributed training, a permutation seeded by the epoch alone. The ``k``-th
    sample of rank ``r`` holds the epoch's place ``r + k * num_replicas``, and its seed is the
    place's entry of a list drawn for the epoch from ``seed``, so it does not depend on which
    worker, or how many, loads it.

    Args:
        inner: the sampler of dataset indices, with ``set_epoch``.
        rank, num_replicas: this process's place in the job.
        seed: the run's seed (``--seed``), which the sample seeds derive from.
    """

    def __init__(self, inner: DistributedSampler | NodeDistributedSampler, rank: int = 0, num_replicas: int = 1,
                 seed: int = 0):
        self.inner = inner
        self.rank = rank
        self.num_replicas = num_replicas
        self.seed = seed
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Go through ``epoch``, leaving out the first ``skip`` samples of this process's share
        (those a resumed run already trained on)."""
        if not 0 <= skip <= len(self.inner):
            raise ValueError(f"cannot skip {skip} of the {len(self.inner)} samples of this process's share")
        self.inner.set_epoch(epoch)
        self.epoch = epoch
        self.skip = skip

    def sample_seeds(self) -> Tensor:
        """``(places,)`` int64: the seed of each place of the current epoch."""
        entropy = np.random.SeedSequence([self.seed, self.epoch]).generate_state(2, np.uint32)
        generator = torch.Generator().manual_seed(int(entropy[0]) << 32 | int(entropy[1]))
        return torch.randint(2 ** 62, (len(self.inner) * self.num_replicas,), generator=generator)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        seeds = self.sample_seeds().tolist()
        share = list(self.inner)
        for k in range(self.skip, len(share)):
            yield share[k], seeds[self.rank + k * self.num_replicas]

    def __len__(self) -> int:
        return len(self.inner) - self.skip


def epoch_order(dataset_size: int, epoch: int) -> Tensor:
    """``(dataset_size,)`` int64: the permutation the training samplers deal from in ``epoch``
    (:class:`~torch.utils.data.DistributedSampler`'s, seeded by the epoch), for checking on
    resume that a data set still gives the order it gave."""
    sampler = DistributedSampler(range(dataset_size), num_replicas=1, rank=0, shuffle=True)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.int64)
