"""Runs that survive preemption: the signals that ask a run to stop, the mid-epoch checkpoints, and
the random state an exact resume needs."""
import random
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import numpy as np
import torch

from engine import StepRequests
from util.dist import any_process, is_main_process
from util.logger import MetricLogger, print_main
from util.misc import epoch_seed, seed_everything

# What Slurm sends before it kills or requeues a job (`#SBATCH --signal=USR1@120`, preemption),
# and what torchrun, Kubernetes and `kill` send.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingStopped(Exception):
    """Training stopped early on a signal, after writing the checkpoint it resumes from; the
    process exits with ``128 + signal number``, as a process ended by that signal would.
    ``main_process``: raised on the main process (the one that reports it)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_status = 128 + signum
        self.main_process = is_main_process()


class StopSignals:
    """While entered, :data:`STOP_SIGNALS` do not end the process but are recorded in
    :attr:`received` (the first one), for the training loop to stop at the next step; the previous
    handlers come back on exit."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            print_main(f"received {signal.Signals(signum).name}: stopping after the training step in progress "
                       f"(or the next one)", flush=True)

    def __enter__(self) -> "StopSignals":
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def rng_state(device: torch.device) -> dict[str, Any]:
    """The state of this process's random generators (torch's CPU generator and ``device``'s if it
    is a GPU, NumPy's, Python's), in types ``torch.load(weights_only=True)`` reads back."""
    _, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Put back what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum is not None else "a signal to another process of the job"


class MidEpochCheckpoints:
    """Decides when a training epoch writes a checkpoint, and stops training on a signal: the
    :class:`~engine.EpochControl` of :func:`~engine.train_one_epoch`.

    Within an epoch, :meth:`begin_epoch` names the save function: a checkpoint is written, by
    ``save(iterations done)``, after every ``every_iters``-th iteration of the epoch, after the
    first step that ends ``every_minutes`` after the last write (timed on the main process), and,
    when either is set, after the epoch's last iteration (so that a run stopped during the
    evaluation resumes there); and after a step at which any process had received one of the
    :data:`STOP_SIGNALS`, which then ends training with :class:`TrainingStopped`. The processes
    agree on the time and the signals at the step's reduction (:class:`~engine.StepRequests`), so
    that they all save and stop after the same step. ``path`` is the checkpoint's, for messages;
    ``device`` that of the processes' collectives.
    """

    def __init__(self, every_iters: int, every_minutes: float, signals: StopSignals, path: str,
                 main_process: bool, device: torch.device):
        self.every_iters = every_iters
        self.device = device
        self.every_minutes = every_minutes
        self.signals = signals
        self.path = path
        self.main_process = main_process
        self.last_save = time.monotonic()
        self.epoch, self.iterations = 0, 0
        self.save: Callable[[int, MetricLogger], None] | None = None

    def begin_epoch(self, epoch: int, iterations: int, save: Callable[[int, MetricLogger], None]) -> None:
        """Epoch ``epoch``, of ``iterations`` in all, saves through ``save``."""
        self.epoch, self.iterations, self.save = epoch, iterations, save

    def _stopped(self, where: str) -> TrainingStopped:
        signum = self.signals.received
        return TrainingStopped(f"stopped by {_signal_name(signum)} {where}; {self.path} holds the run: continue it "
                               f"with --resume {self.path} or --auto_resume", signum or signal.SIGTERM)

    def requests(self) -> StepRequests:
        due = (self.every_minutes > 0 and self.main_process
               and time.monotonic() - self.last_save >= 60 * self.every_minutes)
        return StepRequests(save=due, stop=self.signals.received is not None)

    def after_step(self, iteration: int, agreed: StepRequests, logger: MetricLogger) -> None:
        done = iteration + 1
        scheduled = ((self.every_iters > 0 and done % self.every_iters == 0)
                     or (done == self.iterations and (self.every_iters > 0 or self.every_minutes > 0)))
        if agreed.save or agreed.stop or scheduled:
            self.save(done, logger)
            self.last_save = time.monotonic()
        if agreed.stop:
            # No process exits before the main one has written the checkpoint: a launcher that
            # ends a job when one of its processes exits (srun --kill-on-bad-exit) would cut it short.
            any_process(False, self.device)
            raise self._stopped(f"after iteration {done} of {self.iterations} of epoch {self.epoch}")

    def after_epoch(self, epoch: int) -> None:
        """Stop (all processes alike) if a signal came during the epoch's evaluation, now that its
        checkpoint is written."""
        if any_process(self.signals.received is not None, self.device):
            raise self._stopped(f"after epoch {epoch}")


def ignore_stop_signals(worker_id: int) -> None:
    """A data loader's ``worker_init_fn``: its workers leave :data:`STOP_SIGNALS` to the training
    process (a signal sent to the whole process group, as Slurm sends it, reaches them too), which
    stops the loader itself."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def resumed_skip(progress: dict[str, Any], world_size: int, batch_size: int) -> int:
    """How many samples of its share each process leaves out to continue the epoch of a mid-epoch
    checkpoint's ``progress`` with ``world_size`` processes of ``batch_size``: those trained on,
    counted in the epoch's order and divided among the processes (with the checkpoint's own
    processes and batch size, its iterations times the batch size)."""
    iteration = progress["iteration"]
    if progress["world_size"] == world_size and progress["batch_size"] == batch_size:
        return iteration * batch_size
    # at most the whole order: the samples the sampler repeats to even out the processes' shares
    # count as trained on
    done = min(iteration * progress["batch_size"] * progress["world_size"], len(progress["order"]))
    return done // world_size


def resume_within_epoch(progress: dict[str, Any], order: torch.Tensor, rank: int, world_size: int, batch_size: int,
                        seed: int, device: torch.device) -> tuple[int, dict[str, tuple] | None]:
    """Where this process continues the epoch a mid-epoch checkpoint was written in (its
    ``progress``, see :func:`~util.checkpoint.mid_epoch_progress`): the samples of its share
    already trained on, and the meters of that part of the epoch. Call it after the epoch's
    seeding: it restores this process's random state.

    With the checkpoint's number of processes and batch size, the run continues exactly as an
    uninterrupted one. With others, it continues at the same place in the epoch's order (each
    process skips its share of the samples trained on), the main process taking the meters of
    all, and the random generators are seeded afresh: the data are those of an uninterrupted run,
    the dropout draws are not.
    """
    epoch, iteration = progress["epoch"], progress["iteration"]
    if not torch.equal(progress["order"].to(torch.int64), order):
        print_main(f"note: the training set differs from the one the checkpoint was written with "
                   f"({len(progress['order'])} images then, {len(order)} now): the rest of epoch {epoch} follows "
                   f"the new order")
    processes = progress["processes"]
    skip = resumed_skip(progress, world_size, batch_size)
    if progress["world_size"] == world_size and progress["batch_size"] == batch_size:
        restore_rng_state(processes[rank]["rng"], device)
        return skip, processes[rank]["meters"]

    def processes_of(count: int, batch: int) -> str:
        return f"{count} process{'es' if count > 1 else ''} of batch {batch}"

    print_main(f"note: the checkpoint was written by {processes_of(progress['world_size'], progress['batch_size'])}, "
               f"this run has {processes_of(world_size, batch_size)}: continuing epoch {epoch}, each process leaving "
               f"out the first {skip} samples of its share (trained on), with fresh random draws")
    seed_everything(epoch_seed(seed, rank, world_size, epoch) + 104729 * iteration)
    meters = None
    if rank == 0:  # the sums of all, and the main process's recent values
        meters = {}
        for process in processes:
            for name, (count, total, _) in process["meters"].items():
                previous = meters.get(name, (0, 0.0, processes[0]["meters"].get(name, (0, 0.0, []))[2]))
                meters[name] = (previous[0] + count, previous[1] + total, previous[2])
    return skip, meters
