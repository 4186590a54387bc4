"""Deformable DETR models."""
from .deformable_detr import build


def build_model(args):
    """``(model, criterion, postprocessors)`` for the parsed ``main.py`` arguments."""
    return build(args)
