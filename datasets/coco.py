"""COCO 2017 detection dataset returning ``(image, target)`` pairs ready for the detector."""
import contextlib
import io
import json
import math
import os
import stat
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from pycocotools.coco import COCO
from torch import Tensor

from util.dist import all_gather, get_local_rank, get_local_size
from util.errors import InputError, InputFileNotFoundError, InputValueError, MissingPathError, ParameterError

from .transforms import DEFAULT_SCALES, make_coco_transforms

Target = dict[str, Tensor]
PathLike = str | Path

_REQUIRED_ANNOTATION_KEYS = ("bbox", "category_id", "area")


def prepare_target(image_size: tuple[int, int], image_id: int,
                   annotations: Sequence[dict[str, Any]]) -> Target:
    """Turn the COCO annotations of one image into a target dict, as the original does.

    Crowd annotations (``iscrowd == 1``) are dropped; ``bbox`` ``(x, y, w, h)`` becomes
    ``(x0, y0, x1, y1)`` clipped to the image; boxes with ``x1 <= x0`` or ``y1 <= y0`` are removed.

    Args:
        image_size: ``(w, h)`` of the image in pixels (``PIL.Image.size``).
        image_id: the COCO image id.
        annotations: the image's COCO annotation dicts.

    Returns:
        ``boxes`` ``(N, 4)`` float32 absolute xyxy; ``labels`` ``(N,)`` int64 category ids;
        ``image_id`` ``(1,)`` int64; ``area`` ``(N,)`` float32, the annotation's own ``area``;
        ``iscrowd`` ``(N,)`` int64; ``orig_size`` and ``size`` ``(2,)`` int64 ``(h, w)``.
    """
    w, h = image_size
    for ann in annotations:
        for key in _REQUIRED_ANNOTATION_KEYS:
            if key not in ann:
                raise KeyError(f"annotation {ann.get('id', '?')} of image {image_id} has no '{key}'")
    annotations = [ann for ann in annotations if ann.get("iscrowd", 0) == 0]

    boxes = torch.tensor([ann["bbox"] for ann in annotations], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2].clamp_(min=0, max=w)
    boxes[:, 1::2].clamp_(min=0, max=h)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])

    labels = torch.tensor([ann["category_id"] for ann in annotations], dtype=torch.int64)
    area = torch.tensor([ann["area"] for ann in annotations], dtype=torch.float32)
    iscrowd = torch.tensor([ann.get("iscrowd", 0) for ann in annotations], dtype=torch.int64)
    return {
        "boxes": boxes[keep],
        "labels": labels[keep],
        "image_id": torch.tensor([image_id], dtype=torch.int64),
        "area": area[keep],
        "iscrowd": iscrowd[keep],
        "orig_size": torch.tensor([h, w], dtype=torch.int64),
        "size": torch.tensor([h, w], dtype=torch.int64),
    }


class BadImageError(InputError, RuntimeError):
    """An image file of the dataset is missing, empty, truncated or not an image; ``problem`` is
    what is wrong with it, without the file's name."""

    def __init__(self, message: str, problem: str = ""):
        super().__init__(message)
        self.problem = problem or message


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_image_entry(image: Any, i: int, ann_file: Path) -> None:
    """One entry of ``images``: an integer ``id``, a ``file_name``, and a positive integer
    ``width`` and ``height`` where given (they are compared with the decoded image)."""
    if not isinstance(image, dict):
        raise InputValueError(f"{ann_file}: images[{i}] is a {type(image).__name__}, not an object")
    for key in ("id", "file_name"):
        if key not in image:
            raise InputValueError(f"{ann_file}: images[{i}] has no '{key}'")
    if not _is_int(image["id"]):
        raise InputValueError(f"{ann_file}: images[{i}] has id {image['id']!r}; expected an integer")
    if not isinstance(image["file_name"], str) or not image["file_name"]:
        raise InputValueError(f"{ann_file}: image {image['id']} has file_name {image['file_name']!r}; "
                              f"expected a file name")
    for key in ("width", "height"):
        if key in image and not (_is_int(image[key]) and image[key] > 0):
            raise InputValueError(f"{ann_file}: image {image['id']} has {key} {image[key]!r}; expected a "
                                  f"positive integer (pixels)")


def _check_annotation_entry(ann: Any, i: int, ann_file: Path) -> str:
    """One entry of ``annotations``: the keys training and evaluation read, with their types.
    Returns how messages name it: ``annotation ID (image IMAGE_ID)``."""
    if not isinstance(ann, dict):
        raise InputValueError(f"{ann_file}: annotations[{i}] is a {type(ann).__name__}, not an object")
    for key in ("id", "image_id", "bbox", "category_id", "area"):
        if key not in ann:
            raise InputValueError(f"{ann_file}: annotations[{i}] has no '{key}'")
    if not _is_int(ann["id"]):
        raise InputValueError(f"{ann_file}: annotations[{i}] has id {ann['id']!r}; expected an integer")
    name = f"annotation {ann['id']} (image {ann['image_id']!r})"
    bbox = ann["bbox"]
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        raise InputValueError(f"{ann_file}: {name} has bbox {bbox}; expected [x, y, width, height]")
    if not all(math.isfinite(v) for v in bbox):
        raise InputValueError(f"{ann_file}: {name} has a non-finite value in bbox {bbox}")
    if bbox[2] < 0 or bbox[3] < 0:
        raise InputValueError(f"{ann_file}: {name} has a negative width or height in bbox {bbox}")
    area = ann["area"]
    if not (_is_number(area) and math.isfinite(area) and area >= 0):
        raise InputValueError(f"{ann_file}: {name} has area {area!r}; expected a finite number >= 0 (pixels)")
    # a truthy string would silently make the box a crowd region, left out of training and evaluation
    if "iscrowd" in ann and not (_is_int(ann["iscrowd"]) and ann["iscrowd"] in (0, 1)):
        raise InputValueError(f"{ann_file}: {name} has iscrowd {ann['iscrowd']!r}; expected 0 or 1")
    return name


def _check_annotations(data: Any, ann_file: Path) -> None:
    """Raise :class:`~util.errors.InputValueError` naming ``ann_file`` and the culprit if ``data``
    is not usable COCO: the lists, the keys and types of the fields read, unique ids, and
    references to known images and categories."""
    if not isinstance(data, dict):
        raise InputValueError(f"{ann_file}: expected a JSON object with 'images' and 'annotations', "
                              f"got a {type(data).__name__}")
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
    if missing:
        raise InputValueError(f"{ann_file}: no {' or '.join(repr(k) for k in missing)} list; is this a "
                              f"COCO instances file?")
    if not data["images"]:
        raise InputValueError(f"{ann_file}: 'images' is empty, so this split has nothing to train or evaluate on")
    category_ids = set()
    for i, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or not _is_int(category.get("id")):
            raise InputValueError(f"{ann_file}: categories[{i}] has no integer 'id'")
        category_ids.add(category["id"])
    image_ids = set()
    for i, image in enumerate(data["images"]):
        _check_image_entry(image, i, ann_file)
        if image["id"] in image_ids:
            raise InputValueError(f"{ann_file}: image id {image['id']} appears twice in 'images'")
        image_ids.add(image["id"])
    seen, duplicates = set(), set()
    for i, ann in enumerate(data["annotations"]):
        name = _check_annotation_entry(ann, i, ann_file)
        if ann["id"] in seen:
            duplicates.add(ann["id"])
        seen.add(ann["id"])
        if ann["image_id"] not in image_ids:
            raise InputValueError(f"{ann_file}: annotation {ann['id']} refers to image {ann['image_id']!r}, "
                                  f"which is not in 'images'")
        if ann["category_id"] not in category_ids:
            raise InputValueError(f"{ann_file}: {name} has category_id {ann['category_id']!r}, which is not in "
                                  f"'categories' (ids {sorted(category_ids)})")
    if duplicates:
        raise InputValueError(f"{ann_file}: annotation ids are not unique: {sorted(duplicates)[:10]} "
                              f"({len(duplicates)} repeated)")


def load_coco_annotations(ann_file: PathLike) -> COCO:
    """Read and check a COCO ``instances_*.json`` file; errors name the file and the culprit."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise InputFileNotFoundError(f"COCO annotation file {ann_file} does not exist")
    try:
        data = json.loads(ann_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputValueError(f"{ann_file} is not valid JSON: {err}") from err
    _check_annotations(data, ann_file)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its indexing progress
        coco.createIndex()
    return coco


def check_num_classes(coco: COCO, num_classes: int) -> None:
    """The classifier indexes classes by category id, so it needs more outputs than the largest id."""
    category_ids = coco.getCatIds()
    if category_ids and max(category_ids) >= num_classes:
        raise ParameterError("num_classes", num_classes, f"is too small: the annotations hold category id "
                                                         f"{max(category_ids)}; use {max(category_ids) + 1} or more")


def unusable_files(folder: Path, file_names: Sequence[str]) -> dict[int, str]:
    """``{position in file_names: problem}`` for each file under ``folder`` that is missing, is not
    a regular file (a folder, say) or is empty: one ``stat`` per file, no reading. Links are
    followed (an image folder of links is common)."""
    problems = {}
    for i, name in enumerate(file_names):
        try:
            info = os.stat(folder / name)
        except FileNotFoundError:
            problems[i] = "missing"
            continue
        except OSError as err:
            problems[i] = f"cannot be read ({err.strerror})"
            continue
        if not stat.S_ISREG(info.st_mode):
            problems[i] = "not a regular file"
        elif info.st_size == 0:
            problems[i] = "empty"
    return problems


BAD_IMAGE_POLICIES = ("raise", "replace", "omit")


class CocoDetection(torch.utils.data.Dataset):
    """COCO detection images and their targets (see :func:`prepare_target`), then ``transforms``.

    With :func:`~datasets.transforms.make_coco_transforms` an item is a ``(3, H, W)`` float32
    normalised image and a target whose ``boxes`` are relative ``(cx, cy, w, h)`` of that image and
    whose ``size`` is ``(H, W)``.

    Args:
        img_folder: directory holding the images named by ``file_name`` in ``ann_file``.
        ann_file: COCO ``instances_*.json``.
        transforms: ``(PIL image, target) -> (image, target)``, or None for the raw pair.
        cache_mode: keep encoded image bytes in memory. Only dataset indices ``i`` with
            ``i % local_size == local_rank`` are read up front (pair with
            :class:`~datasets.samplers.NodeDistributedSampler`); any other image read is cached on
            first use.
        local_rank, local_size: this process's rank within its node and the processes per node.
        bad_images: what an image that cannot be read (or whose size is not the annotation file's
            ``width`` x ``height``) does: ``"raise"`` :class:`BadImageError`; ``"replace"``: warn
            and give the next good image in its place (for training: batches stay full);
            ``"omit"``: warn and give ``None``, which :func:`~util.misc.collate_fn` leaves out of
            the batch (for evaluation: no image is counted twice).
    """

    def __init__(self, img_folder: PathLike, ann_file: PathLike,
                 transforms: Callable[[PIL.Image.Image, Target], tuple[Any, Target]] | None = None,
                 cache_mode: bool = False, local_rank: int = 0, local_size: int = 1,
                 bad_images: str = "raise"):
        self.img_folder = Path(img_folder)
        if not self.img_folder.is_dir():
            raise InputFileNotFoundError(f"COCO image folder {self.img_folder} does not exist")
        if not 0 <= local_rank < local_size:
            raise ValueError(f"local_rank {local_rank} is outside [0, local_size={local_size})")
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ParameterError("bad_images", bad_images, f"is not one of {', '.join(BAD_IMAGE_POLICIES)}")
        self.coco = load_coco_annotations(ann_file)
        self.bad_images = bad_images
        self.ids: list[int] = sorted(self.coco.imgs.keys())
        # Image ids left out because their files are unusable (only where bad_images allows it).
        self.left_out: list[int] = []
        self.transforms = transforms
        self.cache_mode = cache_mode
        self.local_rank = local_rank
        self.local_size = local_size
        self.cache: dict[str, bytes] = {}
        # Found now, with one stat per file, rather than when first read (on COCO, up to an epoch later).
        self.leave_out(unusable_files(self.img_folder, [self._file_name(i) for i in range(len(self.ids))]),
                       "missing, empty or not regular files")
        if cache_mode:
            for index in range(local_rank, len(self.ids), local_size):
                file_name = self._file_name(index)
                try:
                    self.cache[file_name] = self._read_bytes(file_name)
                except OSError as err:
                    if bad_images == "raise":
                        raise self._bad_image(index, f"cannot read it: {err}") from err

    def leave_out(self, problems: Mapping[int, str], what: str) -> None:
        """Deal with the images at the dataset indices of ``problems`` (``{index: problem}``), found
        bad before training: raise one :class:`BadImageError` naming the first few, or (where
        ``bad_images`` is not ``"raise"``) warn once and drop them from the dataset, their ids
        added to :attr:`left_out`."""
        if not problems:
            return
        named = [f"{self._file_name(i)} (image id {self.ids[i]}): {problem}" for i, problem in sorted(problems.items())]
        more = f" and {len(named) - 5} more" if len(named) > 5 else ""
        summary = (f"{len(problems)} of the {len(self.ids)} images under {self.img_folder} cannot be used "
                   f"({what}): {', '.join(named[:5])}{more}")
        if self.bad_images == "raise":
            raise BadImageError(f"{summary}; fix or remove them")
        if len(problems) == len(self.ids):
            # not a BadImageError: main.py would advise --skip_bad_images, which is what left them all out
            raise InputValueError(f"no image under {self.img_folder} can be read: {summary}")
        warnings.warn(f"{summary}; leaving them out", stacklevel=2)
        self.left_out += [self.ids[i] for i in problems]
        self.ids = [image_id for i, image_id in enumerate(self.ids) if i not in problems]

    def _file_name(self, index: int) -> str:
        return self.coco.imgs[self.ids[index]]["file_name"]

    def _read_bytes(self, file_name: str) -> bytes:
        return (self.img_folder / file_name).read_bytes()

    def decode(self, index: int, data: bytes | None = None) -> PIL.Image.Image:
        """The RGB image at dataset ``index``, decoded from ``data`` (its file's bytes) or else
        read from its file; :class:`BadImageError` if it cannot be decoded or its size is not the
        annotation file's."""
        try:
            source = io.BytesIO(data) if data is not None else self.img_folder / self._file_name(index)
            image = PIL.Image.open(source).convert("RGB")
        except OSError as err:  # missing, empty, truncated or not an image
            raise self._bad_image(index, f"cannot read it: {err}") from err
        info = self.coco.imgs[self.ids[index]]
        expected = (info.get("width", image.width), info.get("height", image.height))
        if image.size != expected:
            # The boxes are in the annotation file's coordinates and the predictions are scaled to
            # the real image, so such an image would give wrong losses and a wrong AP.
            raise self._bad_image(index, f"it is {image.width}x{image.height} but the annotation file says "
                                         f"{expected[0]}x{expected[1]}")
        return image

    def _load_image(self, index: int) -> PIL.Image.Image:
        if not self.cache_mode:
            return self.decode(index)
        file_name = self._file_name(index)
        if file_name not in self.cache:
            try:
                self.cache[file_name] = self._read_bytes(file_name)
            except OSError as err:
                raise self._bad_image(index, f"cannot read it: {err}") from err
        return self.decode(index, self.cache[file_name])

    def _bad_image(self, index: int, problem: str) -> BadImageError:
        return BadImageError(f"image {self.img_folder / self._file_name(index)} (image id {self.ids[index]}): "
                             f"{problem}", problem)

    def _load_good(self, index: int) -> tuple[int, PIL.Image.Image | None]:
        """``(index, image)``: per ``bad_images``, the image at ``index``, the first good one from
        ``index`` on, or ``None``."""
        for attempt in range(len(self.ids)):
            candidate = (index + attempt) % len(self.ids)
            try:
                return candidate, self._load_image(candidate)
            except BadImageError as err:
                if self.bad_images == "raise":
                    raise BadImageError(f"{err}; fix or remove it") from err.__cause__
                warnings.warn(f"skipping {err}", stacklevel=2)
                if self.bad_images == "omit":
                    return index, None
        raise InputValueError(f"no image under {self.img_folder} can be read")

    def __getitem__(self, index: int) -> tuple[Any, Target] | None:
        index, image = self._load_good(index)
        if image is None:
            return None
        image_id = self.ids[index]
        annotations = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id))
        target = prepare_target(image.size, image_id, annotations)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __len__(self) -> int:
        return len(self.ids)


class _Decoding(torch.utils.data.Dataset):
    """Item ``k``: ``(index, problem)`` for the ``k``-th of ``indices`` of a :class:`CocoDetection`,
    decoded from its file; ``problem`` is None for a good image."""

    def __init__(self, dataset: CocoDetection, indices: Sequence[int]):
        self.dataset = dataset
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[int, str | None]:
        index = self.indices[k]
        try:
            self.dataset.decode(index)
        except BadImageError as err:
            return index, err.problem
        return index, None


def check_images(dataset: CocoDetection, num_workers: int, rank: int = 0, world_size: int = 1,
                 report: Callable[[str], None] | None = None) -> None:
    """Decode every image of ``dataset`` now (``--check_images``), with ``num_workers`` loader
    processes, instead of finding an undecodable image when training reads it.

    Each of ``world_size`` processes decodes the indices ``rank::world_size``; the problems of all
    are gathered, so that every process raises, or leaves out the same images, through
    :meth:`CocoDetection.leave_out`. ``report`` gets about twenty progress lines.
    """
    indices = range(rank, len(dataset), world_size)
    # batch_size=None: items one by one, as they are
    loader = torch.utils.data.DataLoader(_Decoding(dataset, indices), batch_size=None, num_workers=num_workers)
    share = f" (this process's share of {len(dataset)})" if world_size > 1 else ""
    problems: dict[int, str] = {}
    every = max(1, len(indices) // 20)
    start = time.time()
    for done, (index, problem) in enumerate(loader, 1):
        if problem is not None:
            problems[index] = problem
        if report is not None and (done % every == 0 or done == len(indices)):
            report(f"checking the images under {dataset.img_folder}: {done}/{len(indices)} decoded{share}, "
                   f"{len(problems)} unusable, {time.time() - start:.0f} s")
    gathered = {index: problem for part in all_gather(problems) for index, problem in part.items()}
    dataset.leave_out(gathered, "undecodable, or not of the annotated size")


def build(image_set: str, coco_path: PathLike, cache_mode: bool = False,
          scales: Sequence[int] = DEFAULT_SCALES, val_size: int = 800, max_size: int = 1333,
          crop_resize_sizes: Sequence[int] = (400, 500, 600), crop_size_range: tuple[int, int] = (384, 600),
          skip_bad_images: bool = False) -> CocoDetection:
    """The ``"train"`` or ``"val"`` split of COCO 2017 under ``coco_path`` with the original's
    transforms; the sizes are those of :func:`~datasets.transforms.make_coco_transforms`
    (defaults the original's).

    Expects ``{train,val}2017/`` and ``annotations/instances_{train,val}2017.json`` under
    ``coco_path``. With ``skip_bad_images`` a bad image is replaced by the next good one in
    training and left out of evaluation (see :class:`CocoDetection`). In cache mode the node-local
    rank and size come from ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` when distributed.
    """
    if image_set not in ("train", "val"):
        raise ValueError(f"unknown image_set {image_set!r}; expected 'train' or 'val'")
    root = Path(coco_path)
    layout = "expected train2017/, val2017/ and annotations/instances_{train,val}2017.json"
    if not root.is_dir():
        raise MissingPathError("coco_path", str(root), f"does not exist ({layout} there)")
    missing = [name for name in (f"{image_set}2017", f"annotations/instances_{image_set}2017.json")
               if not (root / name).exists()]
    if missing:
        raise MissingPathError("coco_path", str(root), f"has no {' and no '.join(missing)} ({layout})")
    # Only cache mode needs the node layout (LOCAL_WORLD_SIZE may be unset otherwise).
    local_rank, local_size = (get_local_rank(), get_local_size()) if cache_mode else (0, 1)
    transforms = make_coco_transforms(image_set, scales=scales, max_size=max_size,
                                      crop_resize_sizes=crop_resize_sizes, crop_size_range=crop_size_range,
                                      val_size=val_size)
    return CocoDetection(root / f"{image_set}2017", root / "annotations" / f"instances_{image_set}2017.json",
                         transforms=transforms, cache_mode=cache_mode, local_rank=local_rank,
                         local_size=local_size,
                         bad_images=("replace" if image_set == "train" else "omit") if skip_bad_images else "raise")
