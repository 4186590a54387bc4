"""Distributed helpers: rank queries, cross-process reductions and gathers."""
import datetime
import os
import subprocess
from dataclasses import dataclass
from typing import Any

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


def all_gather(data: Any) -> list[Any]:
    """Gather a picklable object from every process; a one-element list when not distributed."""
    if get_world_size() == 1:
        return [data]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, data)
    return gathered


@torch.no_grad()
def reduce_dict(input_dict: dict[str, torch.Tensor], average: bool = True) -> dict[str, torch.Tensor]:
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


def any_process(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is True on any process (one all-reduce on ``device`` when distributed)."""
    if get_world_size() < 2:
        return flag
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value)
    return bool(value.item() > 0)


def lost_contact(err: BaseException) -> bool:
    """Whether ``err`` says that a collective lost the other processes (one died, or hangs past
    the timeout): torch.distributed's own errors, and the RuntimeErrors of gloo's transport,
    which name its sources."""
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and "gloo/transport" in str(err))


@dataclass
class DistributedEnv:
    """Where this process sits in the job; ``distributed`` is False for a single process."""
    distributed: bool
    rank: int
    world_size: int
    local_rank: int
    backend: str


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise RuntimeError(f"cannot expand SLURM_NODELIST={nodelist!r} with 'scontrol show hostnames' "
                           f"to find the master node; is scontrol on PATH? ({err})") from err
    hosts = out.split()
    if not hosts:
        raise RuntimeError(f"'scontrol show hostnames {nodelist}' printed no host name")
    return hosts[0]


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise RuntimeError(f"the environment variable {name} is not set; launch with torchrun "
                           f"(tools/run_dist_launch.sh) or srun (tools/run_dist_slurm.sh), which set it")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def get_local_rank() -> int:
    """Rank of this process within its node (``LOCAL_RANK``); 0 when not distributed."""
    return _env_int("LOCAL_RANK") if is_dist_avail_and_initialized() else 0


def get_local_size() -> int:
    """Number of processes on this node (``LOCAL_WORLD_SIZE``); 1 when not distributed."""
    return _env_int("LOCAL_WORLD_SIZE") if is_dist_avail_and_initialized() else 1


def read_launch_env() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from the launcher's environment, or None for one process.

    torchrun (and ``tools/run_dist_launch.sh``) set ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``.
    Under ``srun`` with several tasks they come from ``SLURM_PROCID``, ``SLURM_NTASKS`` and
    ``SLURM_LOCALID``; then ``MASTER_ADDR`` is set to the first host of ``SLURM_NODELIST``,
    ``MASTER_PORT`` defaults to 29500, and ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (and
    ``LOCAL_WORLD_SIZE`` from ``SLURM_NTASKS_PER_NODE``, for ``--cache_mode``) are exported for the
    ``env://`` rendezvous and the samplers.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
        return _env_int("RANK"), _env_int("WORLD_SIZE"), local_rank
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ and _env_int("SLURM_NTASKS") > 1:
        rank, world_size = _env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS")
        local_rank = _env_int("SLURM_LOCALID")
        os.environ["MASTER_ADDR"] = _first_slurm_host(os.environ["SLURM_NODELIST"])
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ["RANK"] = str(rank)
        os.environ["WORLD_SIZE"] = str(world_size)
        os.environ["LOCAL_RANK"] = str(local_rank)
        if "SLURM_NTASKS_PER_NODE" in os.environ:
            os.environ["LOCAL_WORLD_SIZE"] = str(_env_int("SLURM_NTASKS_PER_NODE"))
        return rank, world_size, local_rank
    return None


def init_distributed(device_type: str, timeout: datetime.timedelta) -> DistributedEnv:
    """Join the process group that the environment describes (see :func:`read_launch_env`), if any.

    The backend is NCCL for ``device_type == "cuda"``, each process taking GPU ``LOCAL_RANK``, and
    gloo otherwise. ``timeout`` bounds how long a collective waits for the other processes. Under
    torchrun, each start of the group (``TORCHELASTIC_RESTART_COUNT``) rendezvouses afresh.
    """
    launch = read_launch_env()
    if launch is None:
        return DistributedEnv(distributed=False, rank=0, world_size=1, local_rank=0, backend="")
    rank, world_size, local_rank = launch
    backend = "nccl" if device_type == "cuda" else "gloo"
    device_id = None
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA "
                               "devices are visible; start at most one process per GPU")
        torch.cuda.set_device(local_rank)
        device_id = torch.device("cuda", local_rank)
    print(f"| distributed init (rank {rank} of {world_size}, local rank {local_rank}, {backend})",
          flush=True)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None:
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                                timeout=timeout, device_id=device_id)
    else:
        # torchrun's store outlives a restart of the group (--max_restarts): without a prefix of
        # their own, the new processes would read the addresses the dead ones published there.
        store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
        dist.init_process_group(backend=backend, store=dist.PrefixStore(f"restart{restart}", store), rank=rank,
                                world_size=world_size, timeout=timeout, device_id=device_id)
    return DistributedEnv(distributed=True, rank=rank, world_size=world_size, local_rank=local_rank,
                          backend=backend)


def destroy_distributed() -> None:
    """Leave the process group, if this process joined one."""
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()
