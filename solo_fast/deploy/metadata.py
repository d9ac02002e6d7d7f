"""The ``"solo_fast"`` entry of an exported ONNX file's ``metadata_props``: what the predictor needs
to prepare the images and read the outputs, written by the exporter as one JSON object."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["GRAPHS", "METADATA_KEY", "SHAPES", "ExportMetadata"]

# the one home of these names: the exporter (solo_fast.export) writes what the predictor reads
METADATA_KEY = "solo_fast"
GRAPHS = ("end2end", "raw", "postprocess")
SHAPES = ("dynamic", "static")


class _Invalid(ValueError):
    pass


@dataclass(frozen=True, kw_only=True)
class ExportMetadata:
    """An export's description (the exporter writes every field).

    Attributes:
        version: solo_fast version that exported the model.
        preset: The model's preset name.
        family: ``"solo"``, ``"decoupled_solo"`` or ``"solov2"``.
        num_classes: Number of classes (labels are ``0 .. num_classes - 1``).
        class_names: A name per label, or None.
        graph: ``"end2end"`` (images -> instances), ``"raw"`` (images -> head outputs) or
            ``"postprocess"`` (head outputs -> instances).
        shapes: ``"dynamic"`` or ``"static"`` input shapes.
        mean: 3 RGB normalisation means, 0..255 scale.
        std: 3 RGB normalisation standard deviations, 0..255 scale.
        size_divisor: The padded canvas is a multiple of this.
        test_scale: ``(long edge, short edge)`` of the keep-ratio resize.
        score_thr: Class-score threshold used in the graph.
        mask_thr: Soft-mask threshold of the final masks.
        max_per_img: Most instances per image (K of the outputs).
        mask_stride: The mask outputs are at 1 / mask_stride of the canvas.
        mask_output: ``"soft"``: the mask outputs are probabilities.
    """

    version: str
    preset: str
    family: str
    num_classes: int
    class_names: tuple[str, ...] | None
    graph: str
    shapes: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size_divisor: int
    test_scale: tuple[int, int]
    score_thr: float
    mask_thr: float
    max_per_img: int
    mask_stride: int
    mask_output: str

    @classmethod
    def from_json(cls, text: str | None, *, source: str) -> ExportMetadata:
        """Parses and checks the metadata entry.

        Args:
            text: The entry's JSON string; None where the file has no entry.
            source: The file it came from, for error messages.

        Returns:
            The metadata.

        Raises:
            ValueError: a missing, malformed or incomplete entry (the message names ``source``).
        """
        if text is None:
            raise ValueError(f"{source} is not a solo_fast export: its metadata_props have no "
                             f"{METADATA_KEY!r} entry")
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source}: the {METADATA_KEY!r} metadata entry is not valid JSON "
                             f"({error})") from error
        if not isinstance(raw, dict):  # a bad file, not a bad argument: a ValueError
            raise ValueError(  # noqa: TRY004
                f"{source}: the {METADATA_KEY!r} metadata entry must be a JSON object, "
                f"got {type(raw).__name__}")
        missing = sorted(set(cls.__dataclass_fields__) - set(raw))
        if missing:
            raise ValueError(f"{source}: the {METADATA_KEY!r} metadata entry lacks {missing}")
        try:
            return cls._parse(raw)
        except _Invalid as error:
            raise ValueError(f"{source}: the {METADATA_KEY!r} metadata entry has {error}") \
                from None

    @classmethod
    def _parse(cls, raw: dict[str, Any]) -> ExportMetadata:
        num_classes = _integer(raw, "num_classes", 1)
        names = raw["class_names"]
        if names is not None and (not isinstance(names, list) or len(names) != num_classes
                                  or not all(isinstance(n, str) for n in names)):
            raise _Invalid(f"class_names {names!r}, expected null or {num_classes} strings")
        std = _floats(raw, "std", 3)
        if min(std) <= 0:
            raise _Invalid(f"std {list(std)}, expected 3 positive numbers")
        scale = _sequence(raw, "test_scale", 2)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in scale):
            raise _Invalid(f"test_scale {scale!r}, expected 2 positive integers")
        return cls(version=str(raw["version"]), preset=_choice(raw, "preset", None),
                   family=_choice(raw, "family", None), num_classes=num_classes,
                   class_names=None if names is None else tuple(names),
                   graph=_choice(raw, "graph", GRAPHS), shapes=_choice(raw, "shapes", SHAPES),
                   mean=_floats(raw, "mean", 3), std=std,
                   size_divisor=_integer(raw, "size_divisor", 1), test_scale=tuple(scale),
                   score_thr=_number(raw["score_thr"], "score_thr"),
                   mask_thr=_number(raw["mask_thr"], "mask_thr"),
                   max_per_img=_integer(raw, "max_per_img", 0),
                   mask_stride=_integer(raw, "mask_stride", 1),
                   mask_output=_choice(raw, "mask_output", ("soft",)))


def _integer(raw: dict[str, Any], key: str, least: int) -> int:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise _Invalid(f"{key} {value!r}, expected an integer >= {least}")
    return value


def _sequence(raw: dict[str, Any], key: str, length: int) -> list[Any]:
    value = raw[key]
    if not isinstance(value, list) or len(value) != length:
        raise _Invalid(f"{key} {value!r}, expected a list of {length}")
    return value


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Invalid(f"{key} {value!r}, expected a finite number")
    return float(value)


def _floats(raw: dict[str, Any], key: str, length: int) -> tuple[float, ...]:
    return tuple(_number(v, f"{key}[{i}]") for i, v in enumerate(_sequence(raw, key, length)))


def _choice(raw: dict[str, Any], key: str, allowed: tuple[str, ...] | None) -> str:
    value = raw[key]
    if not isinstance(value, str) or (allowed is not None and value not in allowed):
        expected = "a string" if allowed is None else f"one of {list(allowed)}"
        raise _Invalid(f"{key} {value!r}, expected {expected}")
    return value
