"""The three export graphs of a model, as ``torch.nn.Module`` s of plain torch ops:

* ``raw``: images -> the head's outputs, flattened (:func:`~.common.flatten_outputs`);
* ``postprocess``: those outputs and the image sizes -> :class:`~.common.Detections`;
* ``end2end``: images and image sizes -> :class:`~.common.Detections` (the two above in one).
"""

# N=images, H, W=the padded canvas (multiples of 32)

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from solo_fast.config import ModelConfig
from solo_fast.deploy.metadata import GRAPHS
from solo_fast.export.common import (
    Detections,
    GraphMasks,
    PostprocessGraph,
    flatten_outputs,
    output_names,
)
from solo_fast.export.decoupled_solo import DecoupledGraphMasks
from solo_fast.export.solo import SOLOGraphMasks
from solo_fast.export.solov2 import SOLOv2GraphMasks

__all__ = ["GRAPHS", "End2EndGraph", "RawGraph", "build_graph", "family_masks", "io_names"]

_MASKS: dict[str, type[GraphMasks]] = {
    "solo": SOLOGraphMasks, "decoupled_solo": DecoupledGraphMasks,
    "decoupled_solo_light": DecoupledGraphMasks, "solov2": SOLOv2GraphMasks}


class RawGraph(nn.Module):
    """Images -> the head's raw outputs as a flat tuple (the ``raw`` graph).

    Args:
        backbone, neck, head: The model's parts (shared, not copied).
    """

    def __init__(self, *, backbone: nn.Module, neck: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.neck, self.head = backbone, neck, head

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        """Args: images: (N, 3, H, W) float32, normalised and padded to multiples of 32."""
        return flatten_outputs(self.head(self.neck(self.backbone(images))))


class End2EndGraph(nn.Module):
    """Images and image sizes -> :class:`~.common.Detections` (the ``end2end`` graph).

    Args:
        raw: The model's :class:`RawGraph`.
        postprocess: Its family's :class:`~.common.PostprocessGraph`.
    """

    def __init__(self, *, raw: RawGraph, postprocess: PostprocessGraph) -> None:
        super().__init__()
        self.raw, self.postprocess = raw, postprocess

    def forward(self, images: Tensor, image_sizes: Tensor) -> Detections:
        """Args:
            images: (N, 3, H, W) float32, normalised and padded to multiples of 32.
            image_sizes: (N, 2) int64 (h, w) of each resized image inside the canvas.
        """
        return self.postprocess(self.raw(images), image_sizes)


def family_masks(cfg: ModelConfig) -> GraphMasks:
    """The :class:`~.common.GraphMasks` of a config's family."""
    return _MASKS[cfg.head.family](num_grids=cfg.head.num_grids)


def build_graph(cfg: ModelConfig, model: Any = None, *, graph: str = "end2end",
                cap: int | None = None) -> nn.Module:
    """One export graph of a model, in eval mode.

    Args:
        cfg: The model's config.
        model: The detector (its ``backbone``, ``neck`` and ``head``); not needed for
            ``"postprocess"``.
        graph: ``"end2end"``, ``"raw"`` or ``"postprocess"``.
        cap: Candidate columns per image of the post-processing (see
            :class:`~.common.PostprocessGraph`); None: every candidate.

    Returns:
        The graph module.

    Raises:
        ValueError: an unknown graph, or no model for a graph that needs one.
    """
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    post = PostprocessGraph(cfg=cfg, masks=family_masks(cfg), cap=cap)
    if graph == "postprocess":
        return post.eval()
    if model is None:
        raise ValueError(f"graph={graph!r} needs the model (its backbone, neck and head)")
    raw = RawGraph(backbone=model.backbone, neck=model.neck, head=model.head)
    return (raw if graph == "raw" else End2EndGraph(raw=raw, postprocess=post)).eval()


def io_names(cfg: ModelConfig, graph: str) -> tuple[list[str], list[str]]:
    """(input names, output names) of a graph."""
    raw = output_names(family_masks(cfg).output_type, len(cfg.head.num_grids))
    detections = list(Detections._fields)
    return {"raw": (["images"], raw),
            "postprocess": ([*raw, "image_sizes"], detections),
            "end2end": (["images", "image_sizes"], detections)}[graph]
