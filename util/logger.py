"""Console logging for training and evaluation: smoothed meters, periodic progress lines, and
printing from the main process only (without replacing ``builtins.print``)."""
import datetime
import resource
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from util.dist import get_world_size, is_dist_avail_and_initialized, is_main_process

T = TypeVar("T")

_MB = 1024.0 * 1024.0


def print_main(*values: Any, **kwargs: Any) -> None:
    """``print`` on the main process; a no-op on the others."""
    if is_main_process():
        print(*values, **kwargs)


_PROC_STATUS = Path("/proc/self/status")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MB since the start or the last :func:`reset_peak_memory`:
    ``torch.cuda.max_memory_allocated`` on CUDA, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / _MB
    if _PROC_STATUS.exists():  # Linux: VmHWM, in kB, is the peak RSS and can be reset
        line = next(line for line in _PROC_STATUS.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux, bytes on macOS


def reset_peak_memory(device: torch.device) -> None:
    """Start :func:`peak_memory_mb` afresh (on the CPU where Linux allows resetting the peak RSS)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif _PROC_STATUS.exists():
        Path("/proc/self/clear_refs").write_text("5")


def top_costs(run: Callable[[], object], device: torch.device, k: int = 5) -> list[tuple[str, float, int]]:
    """Profile ``run()`` with ``torch.profiler`` and return its ``k`` most expensive operators by
    their own (self) time, on the CUDA device where ``device`` is one, else on the CPU: each as
    (name, share of the total self time, calls)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        run()
    events = list(prof.key_averages())
    cost = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(cost(e) for e in events) or 1.0
    ranked = sorted(events, key=cost, reverse=True)[:k]
    return [(e.key, cost(e) / total, e.count) for e in ranked]


def format_costs(costs: list[tuple[str, float, int]]) -> str:
    """``top_costs``' list as one line: ``name share% (calls)``, comma separated."""
    return ", ".join(f"{name} {100 * share:.1f}% ({calls})" for name, share, calls in costs)


class SmoothedValue:
    """A series of floats: the last ``window_size`` values for median/avg/max, and the running total
    for the global average."""

    def __init__(self, window_size: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})"):
        self.window: deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value: float, n: int = 1) -> None:
        self.window.append(value)
        self.count += n
        self.total += value * n

    @property
    def median(self) -> float:
        ordered = sorted(self.window)
        # The lower median, like torch.median.
        return ordered[(len(ordered) - 1) // 2]

    @property
    def avg(self) -> float:
        return sum(self.window) / len(self.window)

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else float("nan")

    @property
    def max(self) -> float:
        return max(self.window)

    @property
    def value(self) -> float:
        return self.window[-1]

    def __str__(self) -> str:
        if not self.window:
            return "n/a"
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


class MetricLogger:
    """Named :class:`SmoothedValue` meters, printed in insertion order and joined by ``delimiter``."""

    def __init__(self, delimiter: str = "  "):
        self.meters: dict[str, SmoothedValue] = {}
        self.delimiter = delimiter

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def update(self, **values: float) -> None:
        for name, value in values.items():
            if not isinstance(value, (float, int)):
                raise TypeError(f"meter {name!r} takes a Python number, got {type(value).__name__}; "
                                "move values to the host once per step, not one by one")
            self.meters.setdefault(name, SmoothedValue()).update(float(value))

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self, device: torch.device) -> None:
        """Sum every meter's count and total over all processes (one all-reduce; windows stay local).

        ``device`` must be one the process group's backend can reduce on (CUDA for NCCL).
        """
        if not is_dist_avail_and_initialized() or get_world_size() < 2:
            return
        names = sorted(self.meters)
        packed = torch.tensor([[self.meters[n].count, self.meters[n].total] for n in names],
                              dtype=torch.float64, device=device)
        dist.all_reduce(packed)
        for name, (count, total) in zip(names, packed.tolist()):
            self.meters[name].count = int(count)
            self.meters[name].total = total

    def state(self) -> dict[str, tuple[int, float, list[float]]]:
        """Each meter's ``(count, total, recent values)``: what :meth:`global_averages` and the
        printed medians are computed from."""
        return {name: (meter.count, meter.total, list(meter.window)) for name, meter in self.meters.items()}

    def restore(self, state: Mapping[str, tuple[int, float, Sequence[float]]]) -> None:
        """Continue from a :meth:`state`."""
        for name, (count, total, recent) in state.items():
            meter = self.meters.setdefault(name, SmoothedValue())
            meter.count, meter.total = int(count), float(total)
            meter.window.clear()
            meter.window.extend(float(v) for v in recent)

    def global_averages(self) -> dict[str, float]:
        return {name: meter.global_avg for name, meter in self.meters.items()}

    def log_every(self, iterable: Iterable[T], print_freq: int, header: str,
                  device: torch.device | None = None, start: int = 0) -> Iterator[tuple[int, T]]:
        """Yield ``(i, item)`` from ``iterable``, ``i`` counting from ``start`` (the items already
        done, for a resumed pass whose ``iterable`` holds the rest); every ``print_freq`` items and
        at the last one, print (main process)
        ``header  [i/n]  eta: ...  <meters>  time: ...  data: ...  max mem: ...``.

        ``time`` is the mean seconds per item, ``data`` the mean seconds spent waiting for the
        iterable; ``max mem`` (MB) is :func:`peak_memory_mb` of ``device`` and is left out when
        ``device`` is None.
        """
        if not isinstance(iterable, Sized):
            raise TypeError("log_every needs an iterable with a length, e.g. a DataLoader")
        total = start + len(iterable)
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        width = len(str(total))
        began = end = time.time()
        for i, item in enumerate(iterable, start):
            data_time.update(time.time() - end)
            yield i, item
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i)))
                fields = [header, f"[{i:>{width}}/{total}]", f"eta: {eta}", str(self),
                          f"time: {iter_time}", f"data: {data_time}"]
                if device is not None:
                    fields.append(f"max mem: {peak_memory_mb(device):.0f}")
                print_main(self.delimiter.join(fields))
                sys.stdout.flush()
            end = time.time()
        elapsed = time.time() - began
        print_main(f"{header} Total time: {datetime.timedelta(seconds=int(elapsed))} "
                   f"({elapsed / max(total - start, 1):.4f} s / it)")
