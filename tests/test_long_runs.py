"""Long runs that survive anything: mid-epoch checkpoints resumed exactly after a SIGKILL, a stop on
Slurm's signals, torchrun's elastic restart, two nodes on one machine, and no hang when a process
dies. Every run is compared, weight for weight, with an uninterrupted one."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from datasets.samplers import epoch_order
from tools.make_tiny_coco import make_tiny_coco
from util.checkpoint import load_checkpoint
from util.preemption import resumed_skip

from helpers import REPO, SMALL_MODEL, free_port, subprocess_env

# 8 training images of batch 1: 8 iterations an epoch in one process, 4 in each of two
TRAIN_IMAGES, EPOCHS = 8, 2


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_tiny_coco(tmp_path_factory.mktemp("coco"), num_train=TRAIN_IMAGES, num_val=2, seed=1)


def argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [*SMALL_MODEL, "--coco_path", str(data), "--batch_size", "1", "--epochs", str(EPOCHS),
            "--print_freq", "1", "--output_dir", str(out), *extra]


def launch(args: list[str], log: Path, processes: int = 1, **env: str) -> subprocess.Popen:
    """main.py ARGS in one process, or in ``processes`` under tools/run_dist_launch.sh (torchrun,
    gloo); stdout and stderr to ``log``."""
    if processes == 1:
        command = [sys.executable, "-u", "main.py", *args]
    else:
        command = ["tools/run_dist_launch.sh", str(processes), sys.executable, "-u", "main.py", *args]
        env = {"MASTER_PORT": str(free_port()), "PYTHON": sys.executable, **env}
    with open(log, "w") as f:
        return subprocess.Popen(command, cwd=REPO, env=subprocess_env(**env), stdout=f, stderr=subprocess.STDOUT)


def children(pid: int) -> list[int]:
    return [int(child) for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                                   text=True).stdout.split()]


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the launch and every process under it at once, as when a node is lost (torchrun
    starts its workers in sessions of their own)."""
    pids, todo = [], [proc.pid]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += children(pid)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    proc.wait()


def finish(proc: subprocess.Popen, log: Path, expected: int = 0, timeout: float = 600) -> str:
    status = proc.wait(timeout=timeout)
    text = log.read_text()
    assert status == expected, text[-4000:]
    return text


def wait_for(log: Path, pattern: str, proc: subprocess.Popen, timeout: float = 300) -> re.Match:
    deadline = time.time() + timeout
    while time.time() < deadline:
        match = re.search(pattern, log.read_text(), re.MULTILINE)
        if match:
            return match
        assert proc.poll() is None, f"ended before {pattern!r}:\n{log.read_text()[-4000:]}"
        time.sleep(0.02)
    raise AssertionError(f"no {pattern!r} within {timeout} s:\n{log.read_text()[-4000:]}")


def assert_same_run(reference: Path, run: Path) -> None:
    """The same final weights, bit for bit, and the same log.txt."""
    a, b = load_checkpoint(reference / "checkpoint.pth"), load_checkpoint(run / "checkpoint.pth")
    assert a["epoch"] == b["epoch"] == EPOCHS - 1 and "mid_epoch" not in b
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    logs = [[json.loads(line) for line in (out / "log.txt").read_text().splitlines()] for out in (reference, run)]
    assert logs[0] == logs[1]


@pytest.fixture(scope="module")
def references(data, tmp_path_factory) -> dict[int, Path]:
    """Uninterrupted runs in one process and in two, without mid-epoch checkpoints (the default)."""
    runs = {}
    for processes in (1, 2):
        out = tmp_path_factory.mktemp(f"reference{processes}")
        finish(launch(argv(data, out, "--num_workers", "0"), out.with_suffix(".log"), processes),
               out.with_suffix(".log"))
        runs[processes] = out
    return runs


def test_the_data_and_augmentation_do_not_depend_on_the_workers(data, references, tmp_path):
    """One process with two loader workers trains to the weights of the run without workers:
    each sample is seeded by its place in the epoch, not by the worker that loads it."""
    out = tmp_path / "workers"
    finish(launch(argv(data, out, "--num_workers", "2"), tmp_path / "log"), tmp_path / "log")
    assert_same_run(references[1], out)


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("workers", ["0", "2"])
def test_killed_between_save_points_and_resumed_ends_with_the_same_weights(data, references, tmp_path,
                                                                             processes, workers):
    every = 3 if processes == 1 else 2
    iterations = TRAIN_IMAGES // processes
    run, log = tmp_path / "run", tmp_path / "log"
    flags = ["--num_workers", workers, "--save_every_iters", str(every)]
    proc = launch(argv(data, run, *flags), log, processes)
    # iteration every + 1 done (printed from 0): past a save point, before the next
    wait_for(log, rf"^Epoch: \[0\]  \[ ?{every}/{iterations}\]", proc)
    kill_job(proc)
    done = max(int(i) for i in re.findall(rf"^Epoch: \[0\]  \[ ?(\d+)/{iterations}\]", log.read_text(), re.M)) + 1
    assert done % every != 0, "killed at a save point"
    saved = load_checkpoint(run / "checkpoint.pth")["mid_epoch"]
    assert saved["epoch"] == 0 and done - saved["iteration"] <= every  # lost at most --save_every_iters

    resumed = finish(launch(argv(data, run, *flags, "--auto_resume"), tmp_path / "log2", processes),
                     tmp_path / "log2")
    assert (f"resumed from {run / 'checkpoint.pth'}: continuing epoch 0 of {EPOCHS} after its iteration "
            f"{saved['iteration']}") in resumed
    assert_same_run(references[processes], run)


@pytest.mark.slow
@pytest.mark.parametrize("processes, signum", [(1, signal.SIGUSR1), (2, signal.SIGTERM), (2, signal.SIGUSR1)])
def test_a_preemption_signal_saves_and_stops_and_auto_resume_finishes_the_same(data, references, tmp_path,
                                                                                 processes, signum):
    """Slurm's SIGUSR1 to the process itself; SIGTERM or SIGUSR1 to torchrun, which passes it to
    its workers and waits for them (without being told to, torchrun dies of SIGUSR1 at once)."""
    run, log = tmp_path / "run", tmp_path / "log"
    proc = launch(argv(data, run), log, processes)
    iterations = TRAIN_IMAGES // processes
    wait_for(log, rf"^Epoch: \[0\]  \[ ?1/{iterations}\]", proc)
    os.kill(proc.pid, signum)
    text = finish(proc, log, expected=128 + signum if processes == 1 else 1)
    saved = load_checkpoint(run / "checkpoint.pth")
    stopped = re.search(rf"stopped by {signal.Signals(signum).name} after iteration (\d+) of {iterations} of epoch 0; "
                        rf"{re.escape(str(run / 'checkpoint.pth'))} holds the run", text)
    assert stopped, text[-3000:]
    assert saved["mid_epoch"]["iteration"] == int(stopped.group(1)) and saved["epoch"] == -1
    assert text.count("stopped by") == 1  # from the main process only
    if processes == 2:
        assert not children(proc.pid)  # torchrun ended after its workers
    finish(launch(argv(data, run, "--auto_resume"), tmp_path / "log2", processes), tmp_path / "log2")
    assert_same_run(references[processes], run)


@pytest.mark.slow
def test_loader_workers_leave_a_signal_to_the_process_group_to_the_training_process(data, tmp_path):
    """Slurm signals every process of a task: the loader workers neither stop nor report it."""
    run, log = tmp_path / "run", tmp_path / "log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-u", "main.py", *argv(data, run, "--num_workers", "2")], cwd=REPO,
                                env=subprocess_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(log, r"^Epoch: \[0\]  \[2/8\]", proc)
    os.killpg(proc.pid, signal.SIGUSR1)
    text = finish(proc, log, expected=128 + signal.SIGUSR1)
    assert text.count("received SIGUSR1") == 1 and text.count("stopped by SIGUSR1") == 1, text[-3000:]
    assert "Traceback" not in text
    assert load_checkpoint(run / "checkpoint.pth")["mid_epoch"]["epoch"] == 0


@pytest.mark.slow
def test_torchrun_restarts_the_group_after_a_worker_dies_and_it_continues_exactly(data, references, tmp_path):
    run, log = tmp_path / "run", tmp_path / "log"
    proc = launch(argv(data, run, "--save_every_iters", "2", "--auto_resume"), log, 2, MAX_RESTARTS="1")
    wait_for(log, r"^Epoch: \[0\]  \[2/4\]", proc)
    workers = children(proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    text = finish(proc, log)
    assert "continuing epoch 0 of 2 after its iteration 2" in text  # the restarted group resumed
    assert_same_run(references[2], run)


@pytest.mark.slow
def test_two_nodes_of_one_process_train_like_one_node_of_two(data, references, tmp_path):
    run = tmp_path / "run"
    port = str(free_port())
    # OMP_NUM_THREADS: torchrun sets 1 with several processes a node (the reference), not with one
    nodes = [launch(argv(data, run), tmp_path / f"node{rank}.log", 2, GPUS_PER_NODE="1", NODE_RANK=str(rank),
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1") for rank in (0, 1)]
    for rank, proc in enumerate(nodes):
        finish(proc, tmp_path / f"node{rank}.log")
    assert_same_run(references[2], run)


def start_rank(data: Path, out: Path, rank: int, port: int, log: Path, *extra: str, **env: str) -> subprocess.Popen:
    """One process of a two-process job without a launcher that supervises it (as srun starts them)."""
    env = {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), **env}
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-u", "main.py", *argv(data, out, *extra)], cwd=REPO,
                                env=subprocess_env(**env), stdout=f, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_no_process_exits_on_a_signal_before_the_checkpoint_is_written(data, tmp_path):
    """srun --kill-on-bad-exit (tools/submit_slurm.sh) kills a job's processes as soon as one of
    them exits: on a stop signal, process 1 must not exit before process 0 has written the
    checkpoint, here made slow (3 s) with a stand-in for os.replace."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import os, time\n"
        "_replace = os.replace\n"
        "def _slow(src, dst, *args, **kwargs):\n"
        "    if str(dst).endswith('checkpoint.pth'):\n"
        "        time.sleep(3)\n"
        "    return _replace(src, dst, *args, **kwargs)\n"
        "os.replace = _slow\n")
    port = free_port()
    logs = [tmp_path / f"rank{rank}.log" for rank in (0, 1)]
    run = tmp_path / "run"
    ranks = [start_rank(data, run, rank, port, logs[rank], PYTHONPATH=f"{shim}{os.pathsep}{REPO}") for rank in (0, 1)]
    wait_for(logs[0], r"^Epoch: \[0\]  \[1/4\]", ranks[0])
    for proc in ranks:
        proc.send_signal(signal.SIGUSR1)
    deadline = time.time() + 120
    while all(proc.poll() is None for proc in ranks) and time.time() < deadline:
        time.sleep(0.01)
    for proc in ranks:  # what kill-on-bad-exit does to the others
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    # process 0 may be killed as it exits, but not before the checkpoint is whole
    assert ranks[1].returncode == 138, logs[1].read_text()[-2000:]
    assert "stopped by SIGUSR1" in logs[0].read_text()
    saved = load_checkpoint(run / "checkpoint.pth")
    assert saved["mid_epoch"]["epoch"] == 0 and saved["mid_epoch"]["world_size"] == 2


@pytest.mark.slow
def test_one_process_continues_the_last_iteration_of_two_with_uneven_shares(tmp_path):
    """9 images in two processes: the sampler repeats one to even out the shares. Killed during
    the evaluation after a checkpoint of the epoch's last iteration, the run continues in one
    process with nothing of the epoch left to train (the repeated image counts as trained on)."""
    data = make_tiny_coco(tmp_path / "coco", num_train=9, num_val=2, seed=1)
    port = free_port()
    logs = [tmp_path / f"rank{rank}.log" for rank in (0, 1)]
    run = tmp_path / "run"
    ranks = [start_rank(data, run, rank, port, logs[rank], "--save_every_iters", "100") for rank in (0, 1)]
    wait_for(logs[0], r"^Test:", ranks[0])
    for proc in ranks:
        proc.kill()
        proc.wait()
    assert load_checkpoint(run / "checkpoint.pth")["mid_epoch"]["iteration"] == 5
    resumed = subprocess.run([sys.executable, "-u", "main.py", *argv(data, run, "--auto_resume")], cwd=REPO,
                             env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "continuing epoch 0, each process leaving out the first 9 samples of its share" in resumed.stdout
    assert [json.loads(line)["epoch"] for line in (run / "log.txt").read_text().splitlines()] == [0, 1]


def test_the_samples_a_resumed_epoch_leaves_out():
    """Counted in the epoch's order whatever the number of processes, at most the whole order."""
    progress = {"epoch": 1, "iteration": 5, "batch_size": 1, "world_size": 2, "order": epoch_order(9, 1)}
    assert resumed_skip(progress, 2, 1) == 5  # the same processes and batch: iterations x batch
    assert resumed_skip(progress, 1, 1) == 9  # 10 places dealt, of 9 images
    assert resumed_skip(progress, 3, 1) == 3
    assert resumed_skip({**progress, "iteration": 2}, 1, 2) == 4
    assert resumed_skip({**progress, "iteration": 3, "batch_size": 2}, 4, 1) == 2  # 6 of 9, in 4 shares


@pytest.mark.slow
def test_when_a_process_dies_the_other_stops_within_the_timeout_with_one_line(data, tmp_path):
    port = free_port()
    logs = [tmp_path / f"rank{rank}.log" for rank in (0, 1)]
    ranks = [start_rank(data, tmp_path / "run", rank, port, logs[rank], "--dist_timeout", "0.5") for rank in (0, 1)]
    wait_for(logs[0], r"^Epoch: \[0\]  \[1/4\]", ranks[0])
    ranks[1].kill()
    killed = time.time()
    status = ranks[0].wait(timeout=120)
    assert time.time() - killed < 30 + 15  # --dist_timeout 0.5 minutes, and a margin
    text = logs[0].read_text()
    assert status == 1, text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith(("stopping:", "error:", "Traceback"))]
    assert len(lines) == 1 and lines[0].startswith("stopping: lost contact with the other processes of the job ("), \
        text[-3000:]


@pytest.mark.slow
def test_bad_input_met_by_one_process_stops_all_and_is_reported_once(data, tmp_path):
    """Under torchrun: process 1 meets an undecodable image (its share of the data), the launch
    ends non-zero, and the error line appears once."""
    damaged = tmp_path / "coco"
    subprocess.run(["cp", "-r", str(data), str(damaged)], check=True)
    # the second image of process 1's share of epoch 0 (the dataset is ordered by image id)
    images = sorted(json.loads((damaged / "annotations" / "instances_train2017.json").read_text())["images"],
                    key=lambda image: image["id"])
    image = damaged / "train2017" / images[int(epoch_order(len(images), 0)[1::2][1])]["file_name"]
    image.write_bytes(image.read_bytes()[:200])
    proc = launch(argv(damaged, tmp_path / "run", "--dist_timeout", "0.5"), tmp_path / "log", 2)
    text = finish(proc, tmp_path / "log", expected=1, timeout=180)
    assert len(re.findall(r"^error: ", text, re.M)) == 1, text[-3000:]
    assert re.search(r"^error: image .*cannot read it: .*--skip_bad_images skips such images$", text, re.M)


def test_slurm_submission_requeues_the_job_when_a_signal_stopped_the_run(tmp_path):
    """tools/submit_slurm.sh with stand-ins for sbatch, srun and scontrol."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"

    def fake(name: str, body: str) -> None:
        path = bin_dir / name
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(0o755)

    fake("sbatch", f'printf "%s\\n" "$@" > {tmp_path}/sbatch_args\ncat > {tmp_path}/script')
    fake("scontrol", f'echo "scontrol $*" >> {calls}')
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    proc = subprocess.run(["tools/submit_slurm.sh", "gpu", "ddetr", "16", "./configs/r50_deformable_detr.sh",
                           "--coco_path", "/data/my coco"], cwd=REPO, capture_output=True, text=True,
                          env=subprocess_env(PATH=path, TIME="24:00:00"))
    assert proc.returncode == 0, proc.stderr
    options = (tmp_path / "sbatch_args").read_text().splitlines()
    for option in ("--partition=gpu", "--job-name=ddetr", "--nodes=2", "--ntasks-per-node=8", "--gres=gpu:8",
                   "--requeue", "--signal=USR1@120", "--open-mode=append", "--time=24:00:00"):
        assert option in options, options

    script = tmp_path / "script"
    for status, requeued in ((138, True), (143, True), (0, False), (1, False)):
        calls.unlink(missing_ok=True)
        fake("srun", f'printf "%s\\n" "$@" > {tmp_path}/srun_args\nexit {status}')
        run = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                             env=subprocess_env(PATH=path, SLURM_JOB_ID="4242"))
        assert run.returncode == status
        assert (calls.read_text().strip() if calls.exists() else "") == ("scontrol requeue 4242" if requeued else "")
        assert (tmp_path / "srun_args").read_text().splitlines() == [
            "--kill-on-bad-exit=1", "./configs/r50_deformable_detr.sh", "--coco_path", "/data/my coco",
            "--auto_resume"]


@pytest.mark.slow
def test_the_average_the_best_checkpoint_and_the_curves_survive_a_kill_exactly(data, tmp_path):
    """With --ema and TensorBoard: killed between save points and resumed, the averaged weights,
    the best checkpoint and every curve (but the timings) are those of an uninterrupted run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    flags = ["--num_workers", "0", "--ema", "--ema_decay", "0.8", "--ema_warmup", "0", "--save_every_iters", "3"]
    straight, run = tmp_path / "straight", tmp_path / "run"
    finish(launch(argv(data, straight, *flags), tmp_path / "straight.log"), tmp_path / "straight.log")
    proc = launch(argv(data, run, *flags), tmp_path / "log")
    wait_for(tmp_path / "log", rf"^Epoch: \[0\]  \[4/{TRAIN_IMAGES}\]", proc)
    kill_job(proc)
    finish(launch(argv(data, run, *flags, "--auto_resume"), tmp_path / "log2"), tmp_path / "log2")

    assert_same_run(straight, run)
    a, b = load_checkpoint(straight / "checkpoint.pth"), load_checkpoint(run / "checkpoint.pth")
    assert a["ema"]["updates"] == b["ema"]["updates"] == EPOCHS * TRAIN_IMAGES
    assert all(torch.equal(a["ema"]["model"][k], b["ema"]["model"][k]) for k in a["ema"]["model"])
    best = [load_checkpoint(out / "checkpoint_best.pth") for out in (straight, run)]
    assert best[0]["best"] == best[1]["best"] and best[0]["epoch"] == best[1]["epoch"]
    assert all(torch.equal(best[0]["ema"]["model"][k], best[1]["ema"]["model"][k]) for k in a["ema"]["model"])

    events = []
    for out in (straight, run):
        accumulator = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
        accumulator.Reload()
        events.append(accumulator)
    tags = events[0].Tags()["scalars"]
    assert sorted(tags) == sorted(events[1].Tags()["scalars"])
    timings = ("train/seconds_per_iteration", "epoch/seconds")
    for tag in tags:
        series = [[(e.step, e.value) for e in accumulator.Scalars(tag)] for accumulator in events]
        if tag in timings:
            assert [s for s, _ in series[0]] == [s for s, _ in series[1]], tag
        else:
            assert series[0] == series[1], tag
    assert [len(accumulator.Scalars("train/loss")) for accumulator in events] == [EPOCHS * TRAIN_IMAGES] * 2


@pytest.mark.slow
def test_the_checkpoint_benchmark_prints_the_size_of_what_main_py_saves():
    from tools.benchmark_checkpoint import training_checkpoint

    variant = "r50_deformable_detr_single_scale"
    proc = subprocess.run([sys.executable, "tools/benchmark_checkpoint.py", "--variants", variant, "--rounds", "1"],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    name, size, seconds = proc.stdout.splitlines()[-1].split()
    checkpoint = training_checkpoint(variant)
    tensors = list(checkpoint["model"].values()) + [t for state in checkpoint["optimizer"]["state"].values()
                                                     for t in state.values() if torch.is_tensor(t)]
    # the tensors' bytes, and what torch.save adds around them (well under 1%)
    assert name == variant and float(size) == pytest.approx(sum(t.nbytes for t in tensors) / 2 ** 20, rel=0.01)
    assert float(seconds) > 0


@pytest.mark.slow
def test_a_distributed_evaluation_with_a_process_left_without_images(data, references, tmp_path):
    """Two processes evaluate a validation set of two images, one image each; process 1's is
    undecodable and left out (--skip_bad_images): the evaluation ends, with the COCO numbers of a
    one-process evaluation of the same damaged set. (The losses differ, as in any distributed
    evaluation: the criterion divides by the number of boxes averaged over the processes.)"""
    damaged = tmp_path / "coco"
    subprocess.run(["cp", "-r", str(data), str(damaged)], check=True)
    images = sorted(json.loads((damaged / "annotations" / "instances_val2017.json").read_text())["images"],
                    key=lambda image: image["id"])
    image = damaged / "val2017" / images[1]["file_name"]
    image.write_bytes(image.read_bytes()[:200])
    checkpoint = str(references[1] / "checkpoint.pth")
    results = []
    for processes in (1, 2):
        out = tmp_path / f"eval{processes}"
        text = finish(launch(argv(damaged, out, "--eval", "--resume", checkpoint, "--skip_bad_images",
                                 "--dist_timeout", "0.5"), tmp_path / f"{processes}.log", processes),
                      tmp_path / f"{processes}.log", timeout=180)
        results.append([line for line in text.splitlines() if line.startswith(" Average")])
        assert "1 of 2 images left out of the evaluation" in text
    assert len(results[0]) == 12 and results[0] == results[1]
