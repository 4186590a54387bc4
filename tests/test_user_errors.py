"""Bad input never gives a silently wrong number: checkpoints of another variant, malformed data,
bad flags and files each stop with one ``error:`` line naming the culprit, exit status 2, no
traceback and nothing written; resumed runs keep true records; unreadable validation images are
left out of COCO evaluation, not counted twice."""
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import torch
from PIL import Image

from datasets import build_dataset
from datasets.coco import BadImageError
from datasets.loaders import build_loaders
from engine import evaluate
from models import build_model
from tools.make_tiny_coco import make_tiny_coco
from util.checkpoint import load_checkpoint
from util.flags import VARIANTS, check_checkpoint_args

from helpers import REPO, SMALL_MODEL, VARIANT_FLAGS, parse, run_main, subprocess_env


def train_argv(coco: Path, output_dir: Path, *extra: str) -> list[str]:
    return [*SMALL_MODEL, "--coco_path", str(coco), "--batch_size", "2", "--output_dir", str(output_dir), *extra]


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def expect_user_error(argv: list[str], watched: Path, *fragments: str) -> str:
    """Run main.py, expect status 2 and a one-line ``error:`` naming each fragment, and that
    ``watched`` (a folder that may not exist yet) is left exactly as it was."""
    before = snapshot(watched) if watched.exists() else None
    proc = run_main(argv)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert (snapshot(watched) if watched.exists() else None) == before
    return lines[0]


def edit_annotations(coco: Path, split: str, edit) -> Path:
    path = coco / "annotations" / f"instances_{split}2017.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


# ------------------------------------------------------------------------------------------
# A checkpoint of another variant

@pytest.mark.parametrize("trained", VARIANTS)
def test_every_variants_checkpoint_is_refused_under_every_other_variants_flags(trained):
    """The saved args are compared before anything is built: the message names each flag that
    differs, with both values, and the config the checkpoint was trained with."""
    checkpoint = {"model": {}, "args": parse(VARIANT_FLAGS[trained])}
    for given in VARIANTS:
        args = parse(VARIANT_FLAGS[given])
        if given == trained:
            check_checkpoint_args(checkpoint, args, "ckpt.pth")
            continue
        with pytest.raises(ValueError) as err:
            check_checkpoint_args(checkpoint, args, "ckpt.pth")
        message = str(err.value)
        assert message.startswith("ckpt.pth was trained with other architecture flags than these: ")
        for flag in ("num_feature_levels", "dilation", "with_box_refine", "two_stage"):
            if getattr(checkpoint["args"], flag) != getattr(args, flag):
                assert f"--{flag} (checkpoint: {getattr(checkpoint['args'], flag)}, here: " \
                       f"{getattr(args, flag)})" in message
            else:
                assert f"--{flag} " not in message
        assert message.endswith(f"It fits configs/{trained}.sh")


def test_finetune_allows_another_num_classes_but_no_other_architecture():
    checkpoint = {"model": {}, "args": parse(VARIANT_FLAGS["r50_deformable_detr"])}
    check_checkpoint_args(checkpoint, parse(["--num_classes", "12"]), "c.pth", finetune=True)
    with pytest.raises(ValueError, match=r"--num_classes \(checkpoint: 91, here: 12\)"):
        check_checkpoint_args(checkpoint, parse(["--num_classes", "12"]), "c.pth")
    fewer_queries = {"model": {}, "args": parse(["--num_queries", "100"])}
    with pytest.raises(ValueError, match=r"--num_queries \(checkpoint: 100, here: 300\)\. It fits configs/"
                                         r"r50_deformable_detr\.sh with --num_queries 100$"):
        check_checkpoint_args(fewer_queries, parse(["--num_classes", "12"]), "c.pth", finetune=True)


@pytest.fixture(scope="module")
def box_refine_checkpoint(tmp_path_factory) -> Path:
    """A tiny box-refinement model saved as main.py saves it."""
    args = parse(SMALL_MODEL + ["--with_box_refine"])
    torch.manual_seed(0)
    model, _, _ = build_model(args)
    path = tmp_path_factory.mktemp("ckpt") / "refine.pth"
    torch.save({"model": model.state_dict(), "args": args, "epoch": 4}, path)
    return path


def test_evaluating_a_checkpoint_with_the_wrong_variant_stops_before_anything(tiny_coco_root, box_refine_checkpoint,
                                                                              tmp_path):
    out = tmp_path / "out"
    expect_user_error(train_argv(tiny_coco_root, out, "--eval", "--resume", str(box_refine_checkpoint)), out,
                      f"{box_refine_checkpoint} was trained with other architecture flags",
                      "--with_box_refine (checkpoint: True, here: False)",
                      "configs/r50_deformable_detr_plus_iterative_bbox_refinement.sh")
    assert not out.exists()


def test_a_checkpoint_without_args_must_fit_in_both_directions(tiny_coco_root, box_refine_checkpoint, tmp_path):
    weights_only = tmp_path / "weights.pth"
    state = load_checkpoint(box_refine_checkpoint)["model"]
    torch.save({"model": state}, weights_only)
    # Without box refinement the model has one class head where the checkpoint has six distinct ones.
    line = expect_user_error(train_argv(tiny_coco_root, tmp_path / "out", "--eval", "--resume", str(weights_only)),
                             tmp_path / "out", f"{weights_only} does not fit the model")
    assert "keys the model does not have" in line and "transformer.decoder.bbox_embed" in line
    extra = dict(state, **{"extra.weight": torch.zeros(1)})
    torch.save({"model": extra}, weights_only)
    expect_user_error(train_argv(tiny_coco_root, tmp_path / "out", "--with_box_refine", "--eval", "--resume",
                                 str(weights_only)), tmp_path / "out", "keys the model does not have ['extra.weight']")


# ------------------------------------------------------------------------------------------
# Files and flags

def test_resume_of_a_text_file_gives_no_unpickling_advice(tiny_coco_root, tmp_path):
    log = tmp_path / "log.txt"
    log.write_text('{"epoch": 0}\n')
    line = expect_user_error(train_argv(tiny_coco_root, tmp_path / "out", "--resume", str(log)), tmp_path,
                             f"{log} ")
    assert "weights_only=False" not in line and "will likely succeed" not in line


def test_a_pickled_object_is_refused_not_loaded(tiny_coco_root, tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "args": PurePosixPath("x")}, evil)
    line = expect_user_error(train_argv(tiny_coco_root, tmp_path / "out", "--resume", str(evil)), tmp_path,
                             f"{evil} holds something other than tensors", "pathlib.PurePosixPath",
                             "never unpickled")
    assert "weights_only=False" not in line


def test_resume_of_a_folder(tiny_coco_root, tmp_path):
    expect_user_error(train_argv(tiny_coco_root, tmp_path / "out", "--resume", str(tmp_path)), tmp_path,
                      f"checkpoint {tmp_path} is a folder, not a checkpoint file")


def test_bad_device_names_the_flag(tiny_coco_root, tmp_path):
    argv = train_argv(tiny_coco_root, tmp_path / "out")
    argv[argv.index("--device") + 1] = "cup"
    expect_user_error(argv, tmp_path, "--device cup is not a device: use cpu, cuda or cuda:N")


def test_the_default_device_without_a_visible_gpu(tiny_coco_root, tmp_path):
    """--device cuda is the default, so a CPU user's first run meets this: a real main.py with
    every GPU hidden and no --device."""
    argv = train_argv(tiny_coco_root, tmp_path / "out")
    del argv[argv.index("--device"):argv.index("--device") + 2]
    proc = subprocess.run([sys.executable, "main.py", *argv], cwd=REPO, env=subprocess_env(CUDA_VISIBLE_DEVICES=""),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr == "error: --device cuda but no CUDA device is visible; pass --device cpu\n"
    assert not (tmp_path / "out").exists()


def test_a_cuda_device_past_the_visible_ones(tiny_coco_root, tmp_path, monkeypatch):
    argv = train_argv(tiny_coco_root, tmp_path / "out")
    argv[argv.index("--device") + 1] = "cuda:99"
    visible = torch.cuda.device_count()
    expect_user_error(argv, tmp_path, f"--device cuda:99 but only {visible} CUDA devices are visible" if visible else
                      "--device cuda:99 but no CUDA device is visible")
    # the first message's case on any machine: one GPU visible, cuda:1 asked for
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    argv[argv.index("--device") + 1] = "cuda:1"
    expect_user_error(argv, tmp_path, "--device cuda:1 but only 1 CUDA devices are visible")


@pytest.mark.parametrize("value, traceback", [("1", True), ("0", False)])
def test_ddetr_debug_shows_the_traceback(tiny_coco_root, tmp_path, monkeypatch, value, traceback):
    monkeypatch.setenv("DDETR_DEBUG", value)
    proc = run_main(train_argv(tiny_coco_root, tmp_path / "out", "--resume", str(tmp_path)))
    assert proc.returncode == 2
    assert ("Traceback" in proc.stderr) == traceback, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: checkpoint {tmp_path} is a folder, not a checkpoint file"


def test_output_dir_that_cannot_be_created(tiny_coco_root, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    expect_user_error(train_argv(tiny_coco_root, blocker / "run"), tmp_path,
                      f"--output_dir {blocker / 'run'} cannot be a folder: {blocker} is a file")


def test_library_parameter_errors_name_the_flag(tiny_coco_root, tmp_path):
    argv = train_argv(tiny_coco_root, tmp_path / "out")
    argv[argv.index("--backbone") + 1] = "resnet5"
    expect_user_error(argv, tmp_path, "--backbone resnet5 is not one of resnet10, resnet18")


def test_debug_shows_the_traceback(tiny_coco_root, tmp_path):
    # a real main.py process: its exit status and streams, not main()'s return value
    proc = run_main(train_argv(tiny_coco_root, tmp_path / "out", "--resume", str(tmp_path), "--debug"),
                    in_process=False)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("error: checkpoint")


def test_a_failed_start_creates_no_folder(tmp_path):
    out = tmp_path / "new_run"
    expect_user_error(train_argv(tmp_path / "nowhere", out), tmp_path, "--coco_path", "nowhere does not exist")
    assert not out.exists()


# ------------------------------------------------------------------------------------------
# Malformed data

@pytest.mark.parametrize("damage, fragments", [
    ("unknown_category", ["instances_train2017.json: annotation", "has category_id 99, which is not in 'categories'"]),
    ("duplicate_image", ["instances_train2017.json: image id", "appears twice in 'images'"]),
    ("nan_box", ["instances_train2017.json: annotation", "has a non-finite value in bbox [nan"]),
    ("infinite_box", ["instances_train2017.json: annotation", "has a non-finite value in bbox", "inf"]),
    ("empty_split", ["instances_val2017.json: 'images' is empty"]),
    ("image_without_id", ["instances_train2017.json: images[1] has no 'id'"]),
    ("image_without_file_name", ["instances_train2017.json: images[1] has no 'file_name'"]),
    *[(f"annotation_without_{key}", [f"instances_train2017.json: annotations[2] has no '{key}'"])
      for key in ("id", "image_id", "bbox", "category_id")],
    ("unknown_image", ["instances_train2017.json: annotation", "refers to image 777, which is not in 'images'"]),
    ("three_numbers_box", ["instances_train2017.json: annotation", "has bbox [1, 2, 3]; expected [x, y, width, "
                                                                   "height]"]),
    ("box_of_strings", ["instances_train2017.json: annotation", "has bbox ['1', '2', '3', '4']; expected"]),
])
def test_malformed_annotations_stop_at_start_up(coco, tmp_path, damage, fragments):
    def edit(data):
        if damage.startswith("image_without_"):
            del data["images"][1][damage.removeprefix("image_without_")]
        elif damage.startswith("annotation_without_"):
            del data["annotations"][2][damage.removeprefix("annotation_without_")]
        elif damage == "unknown_image":
            data["annotations"][0]["image_id"] = 777
        elif damage == "three_numbers_box":
            data["annotations"][0]["bbox"] = [1, 2, 3]
        elif damage == "box_of_strings":
            data["annotations"][0]["bbox"] = ["1", "2", "3", "4"]
        elif damage == "unknown_category":
            data["annotations"][0]["category_id"] = 99
        elif damage == "duplicate_image":
            data["images"].append(dict(data["images"][0]))
        elif damage == "nan_box":
            data["annotations"][0]["bbox"][0] = float("nan")
        elif damage == "infinite_box":
            data["annotations"][0]["bbox"][2] = float("inf")
        else:
            data["images"], data["annotations"] = [], []

    edit_annotations(coco, "val" if damage == "empty_split" else "train", edit)
    line = expect_user_error(train_argv(coco, tmp_path / "out"), tmp_path, *fragments)
    if damage in ("unknown_category", "nan_box", "infinite_box", "three_numbers_box", "box_of_strings"):
        annotation = json.loads((coco / "annotations" / "instances_train2017.json").read_text())["annotations"][0]
        assert f"annotation {annotation['id']} (image {annotation['image_id']})" in line


def test_batch_larger_than_the_training_split(tiny_coco_root, tmp_path):
    argv = train_argv(tiny_coco_root, tmp_path / "out")
    argv[argv.index("--batch_size") + 1] = "5"
    expect_user_error(argv, tmp_path, "--batch_size 5 is more than the 4 training images")


def test_image_whose_size_disagrees_with_the_annotation_file(coco, tmp_path):
    data = json.loads((coco / "annotations" / "instances_train2017.json").read_text())
    image = sorted(data["images"], key=lambda im: im["id"])[0]
    path = coco / "train2017" / image["file_name"]
    with Image.open(path) as pil:
        pil.resize((pil.width + 7, pil.height)).save(path)
    dataset = build_dataset("train", parse(train_argv(coco, tmp_path / "o")))
    message = (rf"{image['file_name']} \(image id {image['id']}\): it is {image['width'] + 7}x{image['height']} "
               rf"but the annotation file says {image['width']}x{image['height']}")
    with pytest.raises(BadImageError, match=message):
        dataset[0]
    skipping = build_dataset("train", parse(train_argv(coco, tmp_path / "o", "--skip_bad_images")))
    with pytest.warns(UserWarning, match=rf"skipping image .*{image['file_name']}"):
        _, target = skipping[0]
    assert int(target["image_id"]) != image["id"]
    line = expect_user_error(train_argv(coco, tmp_path / "out", "--epochs", "1"), tmp_path,
                             f"{image['file_name']} (image id {image['id']}): it is {image['width'] + 7}x")
    assert line.endswith("; fix or remove it; --skip_bad_images skips such images")


# ------------------------------------------------------------------------------------------
# Bad data found before the first step

def first_image(coco: Path, split: str, index: int = 0) -> dict:
    data = json.loads((coco / "annotations" / f"instances_{split}2017.json").read_text())
    return sorted(data["images"], key=lambda im: im["id"])[index]


def damage_file(path: Path, damage: str) -> None:
    if damage == "missing":
        path.unlink()
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "folder":
        path.unlink()
        path.mkdir()
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_text("this is not a JPEG")


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("damage, problem", [("missing", "missing"), ("empty", "empty"),
                                             ("folder", "not a regular file")])
def test_unusable_image_files_stop_the_run_before_anything_is_written(coco, tmp_path, split, damage, problem):
    image = first_image(coco, split, 1)
    damage_file(coco / f"{split}2017" / image["file_name"], damage)
    out = tmp_path / "out"
    line = expect_user_error(train_argv(coco, out), tmp_path,
                             f"1 of the {4 if split == 'train' else 3} images under {coco / f'{split}2017'} cannot "
                             f"be used", f"{image['file_name']} (image id {image['id']}): {problem}")
    assert line.endswith("; fix or remove them; --skip_bad_images skips such images")
    assert not out.exists()


def test_unusable_files_are_listed_first_five_and_counted(tmp_path):
    root = make_tiny_coco(tmp_path / "coco", num_train=8, num_val=1)
    images = sorted(json.loads((root / "annotations" / "instances_train2017.json").read_text())["images"],
                    key=lambda im: im["id"])
    for image in images[1:]:
        (root / "train2017" / image["file_name"]).unlink()
    with pytest.raises(BadImageError) as err:
        build_dataset("train", parse(train_argv(root, tmp_path / "o")))
    named = [f"{im['file_name']} (image id {im['id']}): missing" for im in images[1:6]]
    assert str(err.value) == (f"7 of the 8 images under {root / 'train2017'} cannot be used (missing, empty or not "
                              f"regular files): {', '.join(named)} and 2 more; fix or remove them")


def test_unusable_files_are_left_out_up_front_with_skip_bad_images(coco, tmp_path):
    bad_train, bad_val = first_image(coco, "train", 2), first_image(coco, "val", 0)
    damage_file(coco / "train2017" / bad_train["file_name"], "missing")
    damage_file(coco / "val2017" / bad_val["file_name"], "empty")
    with pytest.warns(UserWarning, match=rf"1 of the 4 images .* {bad_train['file_name']} \(image id "
                                         rf"{bad_train['id']}\): missing; leaving them out"):
        dataset = build_dataset("train", parse(train_argv(coco, tmp_path / "o", "--skip_bad_images")))
    assert bad_train["id"] not in dataset.ids and len(dataset) == 3 and dataset.left_out == [bad_train["id"]]
    assert all(int(dataset[i][1]["image_id"]) != bad_train["id"] for i in range(len(dataset)))

    out = tmp_path / "out"
    with pytest.warns(UserWarning) as warned:
        proc = run_main(train_argv(coco, out, "--epochs", "1", "--skip_bad_images"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [str(w.message) for w in warned]
    assert any(f"{bad_train['file_name']} (image id {bad_train['id']}): missing; leaving them out" in w
               for w in warnings), warnings
    assert any(f"{bad_val['file_name']} (image id {bad_val['id']}): empty; leaving them out" in w
               for w in warnings), warnings
    # the validation image is counted as left out of the evaluation; the training split lost one batch of 2
    (log,) = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert log["test_skipped_images"] == 1
    assert "[0/1]" in proc.stdout and "[1/2]" not in proc.stdout.split("Test:")[0]


@pytest.mark.parametrize("split, edit, fragments", [
    ("train", lambda d: d["images"][1].update(width="640"), ["image {id1} has width '640'", "a positive integer"]),
    ("val", lambda d: d["images"][0].update(height=0), ["image {id0} has height 0", "a positive integer"]),
    ("train", lambda d: d["images"][0].update(id="1"), ["images[0] has id '1'; expected an integer"]),
    ("train", lambda d: d["images"][0].update(file_name=""), ["image {id0} has file_name ''"]),
    ("train", lambda d: d["annotations"][0].update(iscrowd="no"), ["annotation {ann0} (image {img0}) has iscrowd "
                                                                   "'no'; expected 0 or 1"]),
    ("val", lambda d: d["annotations"][0].update(iscrowd=2), ["has iscrowd 2; expected 0 or 1"]),
    ("train", lambda d: d["annotations"][0].update(area=float("nan")), ["has area nan; expected a finite number"]),
    ("train", lambda d: d["annotations"][0].update(area="12"), ["has area '12'; expected a finite number"]),
    ("train", lambda d: d["annotations"][0].pop("area"), ["annotations[0] has no 'area'"]),
    ("train", lambda d: d["annotations"][0].update(bbox=[1, 2, True, 4]), ["has bbox [1, 2, True, 4]; expected [x, "
                                                                           "y, width, height]"]),
    ("train", lambda d: d["categories"][0].pop("id"), ["categories[0] has no integer 'id'"]),
])
def test_fields_of_the_wrong_type_stop_at_start_up(coco, tmp_path, split, edit, fragments):
    data = json.loads((coco / "annotations" / f"instances_{split}2017.json").read_text())
    names = {"id0": data["images"][0]["id"], "id1": data["images"][1]["id"],
             "ann0": data["annotations"][0]["id"], "img0": data["annotations"][0]["image_id"]}
    path = edit_annotations(coco, split, edit)
    expect_user_error(train_argv(coco, tmp_path / "out"), tmp_path,
                      f"{path}: ", *(fragment.format(**names) for fragment in fragments))


@pytest.mark.parametrize("num_workers", ["0", "2"])
@pytest.mark.parametrize("damage", ["truncated", "not_an_image", "wrong_size"])
def test_check_images_finds_undecodable_files_before_anything_is_written(coco, tmp_path, damage, num_workers):
    image = first_image(coco, "train", 3)
    path = coco / "train2017" / image["file_name"]
    if damage == "wrong_size":
        with Image.open(path) as pil:
            pil.resize((pil.width + 3, pil.height)).save(path)
        problem = f"it is {image['width'] + 3}x{image['height']} but the annotation file says"
    else:
        damage_file(path, damage)
        problem = "cannot read it: "
    out = tmp_path / "out"
    argv = train_argv(coco, out, "--check_images", "--num_workers", num_workers)
    expect_user_error(argv, tmp_path, f"1 of the 4 images under {coco / 'train2017'} cannot be used (undecodable, or "
                                      f"not of the annotated size): {image['file_name']} (image id {image['id']}): "
                                      f"{problem}")
    assert not out.exists()


def test_check_images_with_skip_bad_images_leaves_them_out_and_trains(coco, tmp_path):
    bad_train, bad_val = first_image(coco, "train", 0), first_image(coco, "val", 2)
    damage_file(coco / "train2017" / bad_train["file_name"], "truncated")
    damage_file(coco / "val2017" / bad_val["file_name"], "not_an_image")
    out = tmp_path / "out"
    with pytest.warns(UserWarning) as warned:
        proc = run_main(train_argv(coco, out, "--epochs", "1", "--check_images", "--skip_bad_images",
                                   "--num_workers", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [str(w.message) for w in warned]
    for split, image in (("train", bad_train), ("val", bad_val)):
        assert f"checking the images under {coco / f'{split}2017'}: " in proc.stdout
        assert any(f"{image['file_name']} (image id {image['id']}): cannot read it" in w and "leaving them out" in w
                   for w in warnings), warnings
    # found before training, so never met when read
    assert not any("skipping image" in w for w in warnings), warnings
    (log,) = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert log["test_skipped_images"] == 1


# ------------------------------------------------------------------------------------------
# Unreadable validation images are left out of the evaluation

class Oracle(torch.nn.Module):
    """Answers each image (batch of 1) with prepared outputs, found by the image's bytes."""

    def __init__(self, outputs_by_image: dict[str, dict[str, torch.Tensor]]):
        super().__init__()
        self.outputs_by_image = outputs_by_image

    def forward(self, samples):
        key = hashlib.sha256(samples.tensors[0].numpy().tobytes()).hexdigest()
        return self.outputs_by_image[key]


def oracle_for(dataset, num_queries: int, num_classes: int) -> Oracle:
    """Near-ground-truth outputs for every image of ``dataset``: each object's box jittered with a
    confident logit for its label, the other queries low-scored random boxes."""
    g = torch.Generator().manual_seed(0)
    outputs = {}
    for index in range(len(dataset)):
        image, target = dataset[index]
        logits = torch.rand(1, num_queries, num_classes, generator=g) * -6
        boxes = torch.rand(1, num_queries, 4, generator=g) * 0.4 + 0.2
        n = len(target["labels"])
        boxes[0, :n] = (target["boxes"] * (1 + 0.1 * (torch.rand(n, 4, generator=g) - 0.5))).clamp(0, 1)
        logits[0, torch.arange(n), target["labels"]] = 2 + 3 * torch.rand(n, generator=g)
        outputs[hashlib.sha256(image.numpy().tobytes()).hexdigest()] = {"pred_logits": logits, "pred_boxes": boxes}
    return Oracle(outputs)


def evaluate_split(coco: Path, oracle: Oracle, *flags: str) -> dict:
    args = parse(train_argv(coco, coco / "o", "--batch_size", "1", *flags))
    _, criterion, postprocessors = build_model(args)
    dataset = build_dataset("val", args)
    loader = build_loaders(dataset, dataset, 1, 0).val
    stats, _ = evaluate(oracle, criterion, postprocessors, loader, dataset.coco, torch.device("cpu"))
    return stats


# an empty file is found up front (and left out when the dataset is built), a truncated one when read
@pytest.mark.parametrize("damage, warning", [("empty", "cannot be used .*{name} .*: empty; leaving them out"),
                                             ("truncated", "skipping image .*{name}")])
def test_unreadable_validation_image_is_left_out_like_a_set_without_it(tiny_coco_root, tmp_path, capsys, damage,
                                                                        warning):
    args = parse(train_argv(tiny_coco_root, tmp_path / "o"))
    oracle = oracle_for(build_dataset("val", args), args.num_queries, args.num_classes)
    data = json.loads((tiny_coco_root / "annotations" / "instances_val2017.json").read_text())
    bad = sorted(data["images"], key=lambda im: im["id"])[1]

    damaged = Path(shutil.copytree(tiny_coco_root, tmp_path / "damaged"))
    path = damaged / "val2017" / bad["file_name"]
    path.write_bytes(b"" if damage == "empty" else path.read_bytes()[:200])
    without = Path(shutil.copytree(tiny_coco_root, tmp_path / "without"))
    (without / "val2017" / bad["file_name"]).unlink()

    def drop(d):
        d["images"] = [im for im in d["images"] if im["id"] != bad["id"]]
        d["annotations"] = [a for a in d["annotations"] if a["image_id"] != bad["id"]]

    edit_annotations(without, "val", drop)
    with pytest.warns(UserWarning, match=warning.format(name=bad["file_name"])):
        skipped = evaluate_split(damaged, oracle, "--skip_bad_images")
    assert f"1 of {len(data['images'])} images left out of the evaluation" in capsys.readouterr().out
    reference = evaluate_split(without, oracle)
    assert skipped["skipped_images"] == 1 and reference["skipped_images"] == 0
    assert skipped["coco_eval_bbox"][0] > 0.3  # good detections, so the comparison is not of zeros
    assert skipped["coco_eval_bbox"] == reference["coco_eval_bbox"]
    assert skipped["loss"] == pytest.approx(reference["loss"])


# ------------------------------------------------------------------------------------------
# Every image of a split unreadable, with --skip_bad_images

def damage_split(coco: Path, split: str, damage: str) -> list[dict]:
    images = sorted(json.loads((coco / "annotations" / f"instances_{split}2017.json").read_text())["images"],
                    key=lambda im: im["id"])
    for image in images:
        damage_file(coco / f"{split}2017" / image["file_name"], damage)
    return images


@pytest.mark.parametrize("split", ["train", "val"])
def test_every_image_missing_under_skip_bad_images_stops_at_start_up(coco, tmp_path, split):
    images = damage_split(coco, split, "missing")
    out = tmp_path / "out"
    folder = coco / f"{split}2017"
    line = expect_user_error(train_argv(coco, out, "--skip_bad_images"), tmp_path,
                             f"no image under {folder} can be read: {len(images)} of the {len(images)} images under "
                             f"{folder} cannot be used", f"{images[0]['file_name']} (image id {images[0]['id']}): "
                                                         f"missing")
    assert "--skip_bad_images skips" not in line  # it was given
    assert not out.exists()


def test_every_training_image_undecodable_under_skip_bad_images_stops_at_the_first_batch(coco, tmp_path):
    damage_split(coco, "train", "truncated")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="skipping image .* cannot read it"):
        proc = run_main(train_argv(coco, out, "--skip_bad_images", "--epochs", "1"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr == f"error: no image under {coco / 'train2017'} can be read\n"
    assert not list(out.glob("checkpoint*.pth")) and not (out / "log.txt").exists()


def test_every_validation_image_undecodable_under_skip_bad_images_is_an_error(coco, tmp_path):
    damage_split(coco, "val", "truncated")
    with pytest.warns(UserWarning, match="skipping image .* cannot read it"):
        proc = run_main(train_argv(coco, tmp_path / "out", "--skip_bad_images", "--eval"))
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert proc.stderr.startswith("error: ") and str(coco / "val2017") in proc.stderr


# ------------------------------------------------------------------------------------------
# Resume keeps its records true

@pytest.fixture(scope="module")
def two_epochs(tiny_coco_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    proc = run_main(train_argv(tiny_coco_root, out, "--epochs", "2", "--lr_drop", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_resumed_run_records_and_follows_the_schedule_it_used(two_epochs, tiny_coco_root, tmp_path):
    shutil.copy(two_epochs / "checkpoint.pth", tmp_path / "checkpoint.pth")
    # --lr_drop 3 would put a numbered copy after epoch 2; the saved schedule (2) does not.
    proc = run_main(train_argv(tiny_coco_root, tmp_path, "--epochs", "3", "--lr_drop", "3", "--auto_resume"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"resumed from {tmp_path / 'checkpoint.pth'}: epoch 1 completed, continuing with epoch 2 of 3"
            in proc.stdout)
    assert sorted(p.name for p in tmp_path.glob("checkpoint*.pth")) == ["checkpoint.pth"]
    saved = load_checkpoint(tmp_path / "checkpoint.pth")
    assert saved["epoch"] == 2 and saved["args"].lr_drop == 2 == saved["lr_scheduler"]["step_size"]


@pytest.mark.slow
def test_auto_resume_of_a_finished_run_says_so(two_epochs, tiny_coco_root):
    before = snapshot(two_epochs)
    proc = run_main(train_argv(tiny_coco_root, two_epochs, "--epochs", "2", "--auto_resume"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines() == [
        f"--auto_resume: continuing {two_epochs / 'checkpoint.pth'}",
        f"{two_epochs / 'checkpoint.pth'} completed epoch 1, the last of --epochs 2: nothing left to train"]
    assert snapshot(two_epochs) == before


@pytest.mark.slow
def test_eval_names_the_checkpoint_it_evaluates(two_epochs, tiny_coco_root, tmp_path):
    proc = run_main(train_argv(tiny_coco_root, tmp_path, "--eval", "--resume", str(two_epochs / "checkpoint.pth")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"evaluating {two_epochs / 'checkpoint.pth'} (after epoch 1)" in proc.stdout
