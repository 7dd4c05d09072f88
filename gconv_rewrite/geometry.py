"""The one description of a conv: `ConvSpec` (an N-d ONNX Conv's geometry, with the shapes and costs
derived from it), `Probe` (a ConvSpec at a concrete input shape: what a measurement keys on, with
its text key), and the names of the exact forms a grouped conv can be written in."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
from onnx import helper

Dim = int | str | None  # a static size, a symbolic dim name, or unknown
Form = Literal["native", "dw", "split", "dense"]
FORMS = ("native", "dw", "split", "dense")  # every exact form of a grouped conv, native first


@dataclass(frozen=True)
class ConvSpec:
    """Geometry of one Conv: channels, groups, kernel and the spatial attributes.

    `input_shape`/`output_shape` hold ints for static dims and symbol names (or None)
    for dynamic ones; they are informative and never needed for exactness.
    """

    c_in: int
    c_out: int
    group: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...] | None  # begin..., end... ; None when auto_pad decides
    auto_pad: str
    dtype: str
    input_shape: tuple[Dim, ...] | None = field(default=None, compare=False)
    output_shape: tuple[Dim, ...] | None = field(default=None, compare=False)

    @property
    def rank(self) -> int:
        """Number of spatial dimensions (1, 2 or 3)."""
        return len(self.kernel)

    @property
    def cig(self) -> int:
        """Input channels per group."""
        return self.c_in // self.group

    @property
    def cog(self) -> int:
        """Output channels per group (the depthwise emulation's channel multiplier)."""
        return self.c_out // self.group

    @property
    def is_grouped(self) -> bool:
        """True for 1 < group < C_in: the convs this tool rewrites."""
        return 1 < self.group < self.c_in

    @property
    def is_depthwise(self) -> bool:
        """True for group == C_in (one input channel per group)."""
        return self.group == self.c_in and self.c_in > 0

    def describe(self, shapes: bool = False) -> str:
        """Channels, groups, kernel, strides/dilations when not 1 (and spatial in -> out), in one line."""
        k = "x".join(map(str, self.kernel))
        s = "x".join(map(str, self.strides))
        text = f"Cin={self.c_in} Cout={self.c_out} G={self.group} (Cig={self.cig}, Cog={self.cog}) k={k}"
        if any(v != 1 for v in self.strides):
            text += f" s={s}"
        if any(v != 1 for v in self.dilations):
            text += " d=" + "x".join(map(str, self.dilations))
        if shapes and (self.input_shape or self.output_shape):
            def dims(shape):
                if not shape or len(shape) != self.rank + 2:
                    return "?"
                return "x".join("?" if d is None else str(d) for d in shape[2:])
            text += f", {dims(self.input_shape)} -> {dims(self.output_shape)}"
        return text

    def at_input(self, input_shape: tuple[Dim, ...]) -> "ConvSpec":
        """This conv applied to an input of `input_shape` (N, C, spatial...): the output shape follows
        from the attributes; a dim stays symbolic where the input's is."""
        if len(input_shape) != self.rank + 2 or not all(isinstance(d, int) for d in input_shape[2:]):
            return replace(self, input_shape=tuple(input_shape))
        spatial = conv_output_dims(input_shape[2:], self.kernel, self.strides, self.dilations, self.pads,
                                   self.auto_pad)
        return replace(self, input_shape=tuple(input_shape),
                       output_shape=(input_shape[0], self.c_out) + spatial)

    def output_spatial_size(self) -> int | None:
        """Product of the static output spatial dims, or None when any is dynamic."""
        if not self.output_shape or len(self.output_shape) != self.rank + 2:
            return None
        dims = self.output_shape[2:]
        if not all(isinstance(d, int) for d in dims):
            return None
        return int(math.prod(dims))  # type: ignore[arg-type]

    def macs_per_image(self) -> int | None:
        """Multiply-accumulates of the grouped conv for one batch element."""
        spatial = self.output_spatial_size()
        if spatial is None:
            return None
        return spatial * self.c_out * self.cig * int(math.prod(self.kernel))

    def emulation_intermediate_elements(self) -> int | None:
        """Elements of the depthwise emulation's intermediate per image: Cig times the output."""
        spatial = self.output_spatial_size()
        if spatial is None:
            return None
        return spatial * self.c_in * self.cog


def conv_output_dims(spatial, kernel, strides, dilations, pads, auto_pad: str) -> tuple[int, ...]:
    """Output spatial dims of a Conv (ONNX arithmetic): explicit pads, or SAME_* (ceil(size / stride)) / VALID."""
    out = []
    for i, (size, k, s, d) in enumerate(zip(spatial, kernel, strides, dilations)):
        if pads is None:
            out.append(-(-size // s) if auto_pad.startswith("SAME") else (size - (k - 1) * d - 1) // s + 1)
        else:
            out.append((size + pads[i] + pads[i + len(spatial)] - (k - 1) * d - 1) // s + 1)
    return tuple(out)


def conv_attributes(node) -> dict:
    """Conv attributes as plain Python values (lists of ints, strings, ints)."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def spec_from_conv(node, weight_shape: tuple[int, ...], dtype: np.dtype,
                   input_shape=None, output_shape=None) -> ConvSpec:
    """Build a ConvSpec from a Conv NodeProto and its weight's shape."""
    attrs = conv_attributes(node)
    group = int(attrs.get("group", 1))
    c_out, cig = int(weight_shape[0]), int(weight_shape[1])
    kernel = tuple(int(k) for k in attrs.get("kernel_shape", weight_shape[2:]))
    rank = len(kernel)
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    pads = attrs.get("pads")
    return ConvSpec(
        c_in=cig * group,
        c_out=c_out,
        group=group,
        kernel=kernel,
        strides=tuple(int(s) for s in attrs.get("strides", [1] * rank)),
        dilations=tuple(int(d) for d in attrs.get("dilations", [1] * rank)),
        pads=(tuple(int(p) for p in pads) if pads is not None
              else (None if auto_pad not in ("NOTSET", "") else (0,) * (2 * rank))),
        auto_pad=auto_pad or "NOTSET",
        dtype=np.dtype(dtype).name,
        input_shape=tuple(input_shape) if input_shape is not None else None,
        output_shape=tuple(output_shape) if output_shape is not None else None,
    )


class Probe(ConvSpec):
    """A ConvSpec at a concrete input shape (static batch and spatial sizes): everything that decides
    a conv's run time, and the text key (`key()`) under which measurements and calibration rows of
    it are stored. Built from the same fields a calibration row names, in the key's order."""

    def __init__(self, c_in: int, c_out: int, group: int, spatial: tuple[int, ...], kernel: tuple[int, ...],
                 strides: tuple[int, ...], dilations: tuple[int, ...], pads: tuple[int, ...] | None, auto_pad: str,
                 dtype: str, batch: int):
        spatial = tuple(spatial)
        out = conv_output_dims(spatial, kernel, strides, dilations, pads, auto_pad)
        super().__init__(c_in, c_out, group, tuple(kernel), tuple(strides), tuple(dilations), pads, auto_pad, dtype,
                         input_shape=(int(batch), c_in) + spatial, output_shape=(int(batch), c_out) + out)

    @classmethod
    def from_spec(cls, spec: ConvSpec, batch: int | None = None) -> "Probe | None":
        """The probe of a candidate's spec; None when its spatial size is not static. A symbolic batch is 1."""
        shape = spec.input_shape
        if not shape or len(shape) != spec.rank + 2 or not all(isinstance(d, int) and d > 0 for d in shape[2:]):
            return None
        if batch is None:
            batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else 1
        return cls(spec.c_in, spec.c_out, spec.group, tuple(shape[2:]), spec.kernel, spec.strides, spec.dilations,
                   spec.pads, spec.auto_pad, spec.dtype, int(batch))

    def __eq__(self, other) -> bool:
        """Same geometry at the same input shape (a ConvSpec alone compares geometry only)."""
        return isinstance(other, Probe) and super().__eq__(other) and self.input_shape == other.input_shape

    def __hash__(self) -> int:
        return hash(self.key())

    def __repr__(self) -> str:
        return f"Probe({self.key()!r})"

    @property
    def batch(self) -> int:
        """The batch size the probe is measured at."""
        return self.input_shape[0]  # type: ignore[index,return-value]

    @property
    def spatial(self) -> tuple[int, ...]:
        """The input spatial size."""
        return self.input_shape[2:]  # type: ignore[index,return-value]

    def output_spatial(self) -> tuple[int, ...]:
        """The output spatial size (ONNX arithmetic, see conv_output_dims)."""
        return self.output_shape[2:]  # type: ignore[index,return-value]

    def key(self) -> str:
        """A stable text key (cache, CSV): the shipped profile's data and users' tune caches use it."""
        pads = "x".join(map(str, self.pads)) if self.pads is not None else self.auto_pad
        join = lambda v: "x".join(map(str, v))  # noqa: E731
        return (f"{self.dtype} N{self.batch} Cin{self.c_in} Cout{self.c_out} G{self.group} in{join(self.spatial)} "
                f"k{join(self.kernel)} s{join(self.strides)} d{join(self.dilations)} p{pads}")

    def intermediate_bytes(self) -> int:
        """Bytes of the depthwise emulation's intermediate (C_in*Cog channels at the output size)."""
        return self.batch * self.emulation_intermediate_elements() * np.dtype(self.dtype).itemsize


def parse_probe(key: str) -> Probe:
    """The inverse of Probe.key()."""
    parts = key.split()
    dtype, fields = parts[0], {}
    for part in parts[1:]:
        for tag in ("Cin", "Cout", "in", "N", "G", "k", "s", "d", "p"):
            if part.startswith(tag) and (part[len(tag):][:1].isdigit() or tag == "p"):
                fields.setdefault(tag, part[len(tag):])
                break
    dims = lambda v: tuple(int(x) for x in v.split("x"))  # noqa: E731
    pads = fields["p"]
    pad_tuple = dims(pads) if pads[:1].isdigit() else None
    return Probe(int(fields["Cin"]), int(fields["Cout"]), int(fields["G"]), dims(fields["in"]), dims(fields["k"]),
                 dims(fields["s"]), dims(fields["d"]), pad_tuple, "NOTSET" if pad_tuple is not None else pads,
                 dtype, int(fields["N"]))
