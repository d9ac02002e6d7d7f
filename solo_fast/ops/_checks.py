"""Each op's input contract, declared once and checked by one piece of code.

A :class:`Contract` lists an op's tensor arguments (:class:`Arg`): the shape as letters, the
allowed dtypes, index tensors' value ranges. ``Contract.check`` verifies everything that is
metadata (types, ranks, sizes, dtypes, one device) and returns the sizes the letters name;
``Contract.check_ranges`` verifies the index ranges, which are data: one device-to-host copy for
all of a call's index tensors. Errors name the op and the argument, say what was given and what
was expected; dtypes raise TypeError, everything else ValueError.

Who checks what, per call of a public op (``solo_fast/ops/<op>.py``):

* the public function checks its contract's metadata, always;
* the op it calls checks the op-level contract (flattened shapes, byte targets): the compiled
  ops in ``csrc/op_checks.h``, the Triton custom ops with their ``_OP_CONTRACT``; on the Triton
  path the metadata is thus read twice, which costs microseconds and no synchronisation, and
  keeps direct ``torch.ops.solo_fast`` calls safe;
* the index ranges are checked once, by whatever reads the indices: the public function for the
  ``reference`` backend, the compiled ops (``check_index_ranges``) for ``cpu`` and ``cuda``, the
  Triton custom op for ``triton`` (``dynamic_mask_scores``' launcher, in the copy that reads its
  grid size); ``batched_matrix_nms`` checks image_ids itself, its kernels never read them.
  ``check_index=False`` skips the range check everywhere: for callers that built the indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FLOATING", "INDEX", "MASK", "Arg", "Contract", "Sizes", "describe_dtypes"]

Sizes = dict[str, int]

# Dtype sets: a torch.dtype, "floating" / "integer" (any such dtype), or the name of another
# argument (that argument's dtype).
FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX = (torch.int64,)
MASK = (torch.bool, torch.uint8, "floating")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _possessive(name: str) -> str:
    return name + ("'" if name.endswith("s") else "'s")


def describe_dtypes(allowed: Sequence, dtypes: dict[str, torch.dtype]) -> str:
    """``"float16, bfloat16, float32 or float64"``-style text for a dtype set."""
    words = []
    for entry in allowed:
        if isinstance(entry, torch.dtype):
            words.append(_dtype_name(entry))
        elif entry in ("floating", "integer"):
            words.append(entry)
        else:
            words.append(f"{_possessive(entry)} dtype {dtypes.get(entry)}")
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _spell(form: list[str]) -> str:
    return "(" + ", ".join(form) + (",)" if len(form) == 1 else ")")


def _dtype_allowed(dtype: torch.dtype, allowed: Sequence, dtypes: dict[str, torch.dtype]) -> bool:
    for entry in allowed:
        if isinstance(entry, torch.dtype):
            if dtype == entry:
                return True
        elif entry == "floating":
            if dtype.is_floating_point:
                return True
        elif entry == "integer":
            if not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool):
                return True
        elif dtype == dtypes.get(entry):
            return True
    return False


@dataclass(frozen=True)
class Arg:
    """One tensor argument of an op.

    Attributes:
        name: the argument's name, as the messages spell it.
        shape: space-separated letters, one per dimension (``"N S H W"``); a digit is a fixed
            size; ``|`` separates alternative ranks (``"N H W|N P"``). A letter named by an
            earlier argument must have that size. Empty: any shape.
        dtypes: the allowed dtypes (see the module's dtype sets); empty: any.
        like: the name of an earlier argument whose exact shape this one must have (instead of
            ``shape``).
        below: for an index tensor, the letter (or ``Contract.check_ranges`` limit name) that
            bounds its values: all must lie in [0, that size).
        dtype_text: the expected dtypes in words, where the generated text would not do.
        note: words appended to a shape message (``", one entry per mask"``).
        optional: None is accepted (and skipped).
    """

    name: str
    shape: str = ""
    dtypes: tuple = ()
    like: str | None = None
    below: str | None = None
    dtype_text: str | None = None
    note: str = ""
    optional: bool = False


@dataclass(frozen=True)
class Contract:
    """The tensor arguments of one op, checked in the order given.

    Attributes:
        op: the op's name, which starts every message.
        args: the arguments; all must be on the first one's device.
        spell_letters: name the letters in shape messages (``"(K,) = (3,)"``) or only the sizes.
    """

    op: str
    args: tuple[Arg, ...]
    spell_letters: bool = True

    def check(self, *, ranges: bool = False, **tensors: object) -> Sizes:
        """Checks every argument's type, shape, dtype and device; returns the letters' sizes.

        Args:
            ranges: also check the index ranges (:meth:`check_ranges`).
            **tensors: the arguments, by name.

        Raises:
            TypeError: an argument is not a tensor, or has a dtype outside its set.
            ValueError: a shape breaks the contract, the tensors are on different devices, or
                (with ``ranges``) an index is out of its range.
        """
        sizes: Sizes = {}
        dtypes: dict[str, torch.dtype] = {}
        first: tuple[str, Tensor] | None = None
        for arg in self.args:
            value = tensors[arg.name]
            if value is None and arg.optional:
                continue
            if not isinstance(value, Tensor):
                raise TypeError(f"{self.op}: {arg.name} must be a torch.Tensor, got "
                                f"{type(value).__name__}")
            if arg.like is not None:
                like = tensors[arg.like]
                if value.shape != like.shape:
                    raise ValueError(f"{self.op}: {arg.name} must have {_possessive(arg.like)} "
                                     f"shape {tuple(like.shape)}, got {tuple(value.shape)}")
            elif arg.shape:
                self._check_shape(arg, value, sizes)
            if arg.dtypes and not _dtype_allowed(value.dtype, arg.dtypes, dtypes):
                if len(arg.dtypes) == 1 and arg.dtypes[0] in dtypes:
                    raise TypeError(f"{self.op}: {arg.name} must have "
                                    f"{_possessive(arg.dtypes[0])} dtype {dtypes[arg.dtypes[0]]}"
                                    f", got {value.dtype}")
                text = arg.dtype_text or describe_dtypes(arg.dtypes, dtypes)
                raise TypeError(f"{self.op}: {arg.name} must be {text}, got {value.dtype}")
            dtypes[arg.name] = value.dtype
            if first is None:
                first = (arg.name, value)
            elif value.device != first[1].device:
                raise ValueError(f"{self.op}: {arg.name} is on {value.device} but {first[0]} is "
                                 f"on {first[1].device}; all must be on the same device")
        if ranges:
            self.check_ranges(sizes, **tensors)
        return sizes

    def _check_shape(self, arg: Arg, value: Tensor, sizes: Sizes) -> None:
        alternatives = [form.split() for form in arg.shape.split("|")]
        for form in alternatives:
            if len(form) == value.dim() and all(
                    size == (int(letter) if letter.isdigit() else sizes.get(letter, size))
                    for letter, size in zip(form, value.shape)):
                for letter, size in zip(form, value.shape):
                    sizes.setdefault(letter, size)
                return
        got = tuple(value.shape)
        forms = " or ".join(_spell(form) for form in alternatives)
        form = alternatives[0]
        if not any(letter in sizes for letter in form):  # this argument sets its letters
            rank = f"{len(form)}-D " if len(alternatives) == 1 and (
                len(form) == 1 or not self.spell_letters) else ""
            raise ValueError(f"{self.op}: {arg.name} must be {rank}{forms}, got shape {got}"
                             + ("" if rank else f" ({value.dim()}-D)"))
        if all(letter in sizes or letter.isdigit() for letter in form):
            expected = tuple(int(letter) if letter.isdigit() else sizes[letter] for letter in form)
            spelled = f"{forms} = " if self.spell_letters else ""
            raise ValueError(f"{self.op}: {arg.name} must have shape {spelled}{expected}"
                             f"{arg.note}, got {got}")
        known = ", ".join(f"{letter} = {sizes[letter]}" for letter in form if letter in sizes)
        raise ValueError(f"{self.op}: {arg.name} must be {forms} with {known}{arg.note}, got "
                         f"shape {got}")

    def check_ranges(self, sizes: Sizes, **tensors: object) -> None:
        """Checks that every index argument lies in [0, its bound): one device-to-host copy.

        ``sizes`` is what :meth:`check` returned, plus any named limit an ``Arg.below`` refers
        to. Nothing is read while torch.compile traces (the ops check again when they run), on
        meta tensors (which hold no values) or for empty indices.

        Raises:
            ValueError: an index is out of its range; the message gives the values' range.
        """
        if torch.compiler.is_compiling():
            return
        checked = [(arg, tensors[arg.name]) for arg in self.args if arg.below is not None]
        checked = [(arg, index) for arg, index in checked
                   if isinstance(index, Tensor) and index.numel() > 0
                   and index.device.type != "meta"]
        if not checked:
            return
        bounds = torch.stack([value for _, index in checked
                              for value in (index.min(), index.max())]).tolist()
        for (arg, _), low, high in zip(checked, bounds[0::2], bounds[1::2]):
            limit = sizes[arg.below]
            if low < 0 or high >= limit:
                raise ValueError(f"{self.op}: {arg.name} must lie in [0, {arg.below}) = "
                                 f"[0, {limit}), got values in [{low}, {high}]")
