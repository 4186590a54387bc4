"""Box conversions and IoU, on top of ``torchvision.ops``."""
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou

__all__ = ["box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "generalized_box_iou"]


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``(..., 4)`` centre-size boxes to corner boxes ``(x0, y0, x1, y1)``."""
    return box_convert(boxes, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``(..., 4)`` corner boxes to centre-size boxes ``(cx, cy, w, h)``."""
    return box_convert(boxes, "xyxy", "cxcywh")
