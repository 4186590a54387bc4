"""Distributed training: the launch environment (torchrun, Slurm), the launcher scripts, a
two-process CPU (gloo) run through tools/run_dist_launch.sh and a config, and the equivalence of
two processes of batch 1 with one process of batch 2.

Run as a script (``python tests/test_distributed.py OUT``, alone or under torchrun) this file is
the worker of that last test: one optimizer step, saved to OUT by rank 0.
"""
import datetime
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import train_step
from models import build_model
from util.dist import destroy_distributed, init_distributed, read_launch_env
from util.misc import nested_tensor_from_tensor_list
from util.optim import build_param_groups

from helpers import REPO, SMALL_MODEL, free_port, parse, subprocess_env

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODELIST", "SLURM_NTASKS_PER_NODE")


def _fake_command(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def clean_launch_env(monkeypatch):
    """No launcher variables during the test, and none left after it: init_distributed writes
    the ones it derives from Slurm's straight into os.environ, which monkeypatch does not undo."""
    saved = dict(os.environ)
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


# --------------------------------------------------------------------------------------------
# Launch environment

def test_no_launcher_means_one_process(clean_launch_env):
    assert read_launch_env() is None
    env = init_distributed("cpu", datetime.timedelta(minutes=1))
    assert (env.distributed, env.rank, env.world_size) == (False, 0, 1)


def test_torchrun_variables_give_the_ranks(clean_launch_env):
    clean_launch_env.setenv("RANK", "5")
    clean_launch_env.setenv("WORLD_SIZE", "8")
    clean_launch_env.setenv("LOCAL_RANK", "1")
    assert read_launch_env() == (5, 8, 1)
    clean_launch_env.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK='x'"):
        read_launch_env()


def test_slurm_variables_give_the_ranks_and_the_first_host_as_master(clean_launch_env, tmp_path):
    calls = tmp_path / "calls"
    _fake_command(tmp_path, "scontrol", f'echo "$@" >> {calls}\nprintf "gpu-node-07\\ngpu-node-08\\n"')
    clean_launch_env.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    for name, value in {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
                        "SLURM_NODELIST": "gpu-node-[07-08]", "SLURM_NTASKS_PER_NODE": "2"}.items():
        clean_launch_env.setenv(name, value)
    assert read_launch_env() == (3, 4, 1)
    assert calls.read_text().split() == ["show", "hostnames", "gpu-node-[07-08]"]
    assert os.environ["MASTER_ADDR"] == "gpu-node-07"
    assert os.environ["MASTER_PORT"] == "29500"
    assert [os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")] == ["3", "4", "1", "2"]

    clean_launch_env.setenv("MASTER_PORT", "12345")
    read_launch_env()
    assert os.environ["MASTER_PORT"] == "12345"


def test_a_single_slurm_task_runs_alone(clean_launch_env):
    clean_launch_env.setenv("SLURM_PROCID", "0")
    clean_launch_env.setenv("SLURM_NTASKS", "1")
    assert read_launch_env() is None


# --------------------------------------------------------------------------------------------
# Launcher scripts

def _run_script(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, env=subprocess_env(**env), capture_output=True, text=True,
                          timeout=600)


def test_run_dist_launch_runs_the_command_under_torchrun(tmp_path):
    record = tmp_path / "argv"
    python = _fake_command(tmp_path, "python", f'printf "%s\\n" "$@" > {record}')
    proc = _run_script(["tools/run_dist_launch.sh", "16", "./configs/r50_deformable_detr.sh", "--x", "a b"],
                       PYTHON=str(python), NODE_RANK="1", MASTER_ADDR="10.0.0.1")
    assert proc.returncode == 0, proc.stderr
    assert record.read_text().splitlines() == [
        "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.1",
        "--master_port", "29500", "--nproc_per_node", "8", "--max_restarts", "0",
        "--signals_to_handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--no-python",
        "./configs/r50_deformable_detr.sh", "--x", "a b"]
    proc = _run_script(["tools/run_dist_launch.sh", "2", "python", "main.py"], PYTHON=str(python), MAX_RESTARTS="3")
    assert proc.returncode == 0 and record.read_text().splitlines()[12:14] == ["--max_restarts", "3"]

    proc = _run_script(["tools/run_dist_launch.sh", "2", "python", "main.py"], PYTHON=str(python), MAX_RESTARTS="3")
    assert proc.returncode == 0, proc.stderr
    assert record.read_text().splitlines()[2:14] == [
        "--nnodes", "1", "--node_rank", "0", "--master_addr", "127.0.0.1", "--master_port", "29500",
        "--nproc_per_node", "2", "--max_restarts", "3"]

    proc = _run_script(["tools/run_dist_launch.sh", "12", "python"], PYTHON=str(python), GPUS_PER_NODE="8")
    assert proc.returncode == 2 and "not a multiple" in proc.stderr


def test_run_dist_slurm_passes_the_original_srun_options(tmp_path):
    record = tmp_path / "argv"
    _fake_command(tmp_path, "srun", f'printf "%s\\n" "$@" > {record}')
    path = f"{tmp_path}{os.pathsep}{os.environ['PATH']}"
    proc = _run_script(["tools/run_dist_slurm.sh", "dev", "ddetr", "16", "./configs/r50_deformable_detr.sh",
                        "--batch_size", "4"], PATH=path, SRUN_ARGS="--qos high --time 1:00:00")
    assert proc.returncode == 0, proc.stderr
    assert record.read_text().splitlines() == [
        "-p", "dev", "--job-name=ddetr", "--gres=gpu:8", "--ntasks=16", "--ntasks-per-node=8",
        "--cpus-per-task=4", "--kill-on-bad-exit=1", "--qos", "high", "--time", "1:00:00",
        "./configs/r50_deformable_detr.sh", "--batch_size", "4"]

    proc = _run_script(["tools/run_dist_slurm.sh", "dev", "ddetr", "2", "python", "main.py"], PATH=path,
                       CPUS_PER_TASK="6")
    assert proc.returncode == 0, proc.stderr
    assert record.read_text().splitlines()[3:7] == ["--gres=gpu:2", "--ntasks=2", "--ntasks-per-node=2",
                                                    "--cpus-per-task=6"]


def test_configs_hold_the_original_variants():
    expected = {
        "r50_deformable_detr.sh": [],
        "r50_deformable_detr_single_scale.sh": ["--num_feature_levels", "1"],
        "r50_deformable_detr_single_scale_dc5.sh": ["--num_feature_levels", "1", "--dilation"],
        "r50_deformable_detr_plus_iterative_bbox_refinement.sh": ["--with_box_refine"],
        "r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage.sh": ["--with_box_refine",
                                                                                     "--two_stage"],
    }
    assert sorted(p.name for p in (REPO / "configs").glob("r50_*.sh")) == sorted(expected)
    for name, flags in expected.items():
        text = (REPO / "configs" / name).read_text()
        assert f"EXP_DIR=exps/{name[:-3]}\n" in text
        command = text[text.index('"${PYTHON:-python}" -u main.py'):].replace("\\\n", " ").split()
        assert command == ['"${PYTHON:-python}"', "-u", "main.py", "--output_dir", '"${EXP_DIR}"', *flags,
                           '"${PY_ARGS[@]}"']
        assert os.access(REPO / "configs" / name, os.X_OK)


def test_a_config_runs_the_interpreter_python_names(tmp_path):
    record = tmp_path / "argv"
    python = _fake_command(tmp_path, "my_python", f'printf "%s\\n" "$@" > {record}')
    proc = _run_script(["./configs/r50_deformable_detr_single_scale.sh", "--epochs", "1"], PYTHON=str(python))
    assert proc.returncode == 0, proc.stderr
    assert record.read_text().splitlines() == ["-u", "main.py", "--output_dir", "exps/r50_deformable_detr_single_scale",
                                               "--num_feature_levels", "1", "--epochs", "1"]


# --------------------------------------------------------------------------------------------
# Two processes on the CPU

@pytest.mark.slow
def test_launcher_trains_and_evaluates_with_two_cpu_processes(tiny_coco_root, tmp_path):
    out = tmp_path / "out"
    argv = ["tools/run_dist_launch.sh", "2", "./configs/r50_deformable_detr.sh", *SMALL_MODEL,
            "--coco_path", str(tiny_coco_root), "--batch_size", "1", "--epochs", "1", "--output_dir", str(out)]
    python_dir = str(Path(sys.executable).parent)
    proc = _run_script(argv, MASTER_PORT=str(free_port()), PYTHON=sys.executable,
                       PATH=f"{python_dir}{os.pathsep}{os.environ['PATH']}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        assert f"distributed init (rank {rank} of 2, local rank {rank}, gloo)" in proc.stdout
    # Only the main process prints progress and the COCO summary.
    assert proc.stdout.count("IoU metric: bbox") == 1
    assert proc.stdout.count("Epoch: [0]  [1/2]") == 1  # 4 images, 2 processes, batch 1
    (entry,) = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert entry["epoch"] == 0 and len(entry["test_coco_eval_bbox"]) == 12
    assert (out / "checkpoint.pth").is_file() and (out / "eval" / "latest.pth").is_file()


def _fixed_batch(num_images: int):
    """Same-size images (no padding) and their targets, the same in every process. At 128x96 the
    smallest feature map is 2x2, so its GroupNorm is not computed over just two values (which makes
    gradients too sensitive to rounding for a tight comparison)."""
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(3, 128, 96, generator=g) for _ in range(num_images)]
    targets = []
    for i in range(num_images):
        n = 2 + i
        centers = torch.rand(n, 2, generator=g) * 0.5 + 0.25
        sizes = torch.rand(n, 2, generator=g) * 0.3 + 0.1
        targets.append({"boxes": torch.cat([centers, sizes], dim=1),
                        "labels": torch.randint(1, 8, (n,), generator=g),
                        "image_id": torch.tensor(i), "orig_size": torch.tensor([128, 96]),
                        "size": torch.tensor([128, 96])})
    return images, targets


def one_step_worker(out_path: str) -> None:
    """One SGD step on a fixed batch of 2, split over the processes; rank 0 saves the result."""
    env = init_distributed("cpu", datetime.timedelta(minutes=5))
    try:
        args = parse(SMALL_MODEL + ["--dropout", "0"])
        torch.manual_seed(0)
        model, criterion, _ = build_model(args)
        images, targets = _fixed_batch(2)
        share = 2 // env.world_size
        mine = slice(env.rank * share, (env.rank + 1) * share)
        samples = nested_tensor_from_tensor_list(images[mine])
        before = {k: v.clone() for k, v in model.state_dict().items()}
        groups = build_param_groups(model, 1e-2, 1e-3, args.lr_backbone_names, args.lr_linear_proj_names,
                                    args.lr_linear_proj_mult)
        optimizer = torch.optim.SGD(groups, lr=1e-2, momentum=0.9)
        module = model
        if env.distributed:
            model = torch.nn.parallel.DistributedDataParallel(model)
        values = train_step(model, criterion, samples, targets[mine], optimizer, max_norm=0)
        if env.rank == 0:
            torch.save({"before": before, "after": module.state_dict(), "values": values,
                        "grads": {n: p.grad for n, p in module.named_parameters() if p.grad is not None}},
                       out_path)
    finally:
        destroy_distributed()


@pytest.mark.slow
def test_two_processes_of_batch_1_step_like_one_process_of_batch_2(tmp_path):
    single, pair = tmp_path / "single.pt", tmp_path / "pair.pt"
    script = str(Path(__file__).resolve())
    proc = _run_script([sys.executable, script, str(single)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run_script([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(free_port()), script, str(pair)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(single, weights_only=True)
    b = torch.load(pair, weights_only=True)

    assert a["values"]["loss"] == pytest.approx(b["values"]["loss"], rel=1e-5)
    assert a["values"]["grad_norm"] == pytest.approx(b["values"]["grad_norm"], rel=1e-5)
    assert a["grads"].keys() == b["grads"].keys()
    for name, grad in a["grads"].items():
        torch.testing.assert_close(b["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    moved = max(float((a["after"][k].float() - a["before"][k].float()).abs().max()) for k in a["grads"])
    assert moved > 1e-3  # the step is large against the tolerance below
    for key, value in a["after"].items():
        torch.testing.assert_close(b["after"][key], value, rtol=0, atol=1e-5, msg=key)


if __name__ == "__main__":
    one_step_worker(sys.argv[1])
