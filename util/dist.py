"""Distributed helpers: rank queries, cross-process reductions and gathers."""
from typing import Any, Dict, List

import torch
import torch.distributed as dist


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def all_gather(data: Any) -> List[Any]:
    """Gather a picklable object from every process; a one-element list when not distributed."""
    if get_world_size() == 1:
        return [data]
    gathered: List[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, data)
    return gathered


@torch.no_grad()
def reduce_dict(input_dict: Dict[str, torch.Tensor], average: bool = True) -> Dict[str, torch.Tensor]:
    """Sum (or average) each scalar tensor of ``input_dict`` over all processes."""
    world_size = get_world_size()
    if world_size < 2:
        return input_dict
    names = sorted(input_dict.keys())
    values = torch.stack([input_dict[k] for k in names])
    dist.all_reduce(values)
    if average:
        values /= world_size
    return dict(zip(names, values))
