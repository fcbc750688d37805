"""Program values and the builder that emits program nodes for one traced operation at a time."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from asyncfgd.runtime.dual.program import Node


class UnsupportedLayerError(ValueError):
    """A layer or operation has no dual rule, or is used in a way the program cannot express."""


@dataclass(frozen=True)
class Val:
    """A program value: ``shape`` is per sample when ``batched``; else the value's full shape
    (a weight-derived value, whose batch axis in the rules' layout is 1)."""

    name: str
    shape: tuple[int, ...]
    batched: bool = True

    @property
    def torch_rank(self) -> int:
        return len(self.shape) + (1 if self.batched else 0)

    def axis(self, dim: int) -> int:
        """torch's ``dim`` of this value as an axis of the rules' layout (batch first)."""
        rank = self.torch_rank
        if not -rank <= dim < rank:
            raise UnsupportedLayerError(f"dim {dim} is out of range for a {rank}-d tensor")
        d = dim % rank
        return d if self.batched else d + 1


@dataclass(frozen=True)
class ParamRef:
    """A parameter read with ``self.weight``: layers take it as their weight; other uses make it a value."""

    qualname: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class BatchSized:
    """A Python number or size that depends on the batch size (``x.size(0)``, ``x.shape``)."""

    at_2: Any
    at_3: Any


@dataclass
class Site:
    """Where the operation being converted comes from, for node names and error messages."""

    fx_name: str
    scopes: list[str]
    line: str = ""

    def describe(self) -> str:
        where = f" in '{self.scopes[-1]}'" if self.scopes else ""
        return f"'{self.fx_name}'{where}" + (f" ({self.line})" if self.line else "")


@dataclass
class Builder:
    """Emits program nodes; ``observed`` is the current operation's output as the traced run saw it."""

    program: list[Node] = field(default_factory=list)
    site: Site = field(default_factory=lambda: Site("", []))
    observed: Val | None = None
    _taken: set[str] = field(default_factory=set)

    def fail(self, message: str) -> UnsupportedLayerError:
        return UnsupportedLayerError(f"{self.site.describe()}: {message}")

    def emit(self, op: str, inputs: Sequence[Val | str], shape: tuple[int, ...], batched: bool | None = None,
             attrs: dict[str, Any] | None = None, params: dict[str, str] | None = None,
             buffers: dict[str, str] | None = None, name: str | None = None) -> Val:
        """One node; ``name`` (a layer's qualified name) or a unique name from the scope and op."""
        ins = [i if isinstance(i, str) else i.name for i in inputs]
        if batched is None:
            batched = any(isinstance(i, Val) and i.batched for i in inputs)
        base = name or (f"{self.site.scopes[-1]}.{op}" if self.site.scopes else op)
        out, k = base, 1
        while out in self._taken or out == "input":
            out, k = f"{base}_{k}", k + 1
        self._taken.add(out)
        self.program.append(Node(name=out, op=op, inputs=ins, attrs=dict(attrs or {}), params=dict(params or {}),
                                 buffers=dict(buffers or {}), shape=[int(d) for d in shape],
                                 scopes=list(self.site.scopes), source=self.site.fx_name, batched=batched))
        return Val(out, tuple(int(d) for d in shape), batched)

    def value(self, v: Any) -> Val:
        """A tensor operand as a value (a parameter read directly becomes a ``param`` node)."""
        if isinstance(v, Val):
            return v
        if isinstance(v, ParamRef):
            return self.emit("param", [], v.shape, batched=False, params={"value": v.qualname})
        raise self.fail(f"expected a tensor, got {type(v).__name__}")

    def reshape(self, v: Val, shape: tuple[int, ...], name: str | None = None) -> Val:
        return v if tuple(shape) == v.shape else self.emit("reshape", [v], tuple(shape), v.batched,
                                                           {"shape": list(shape)}, name=name)

    def align(self, v: Val, torch_rank: int, batched_out: bool) -> Val:
        """``v`` reshaped so that it broadcasts against a value of ``torch_rank`` axes axis by axis
        in the rules' layout: a weight-derived value loses leading 1s or gains them."""
        if v.batched:
            if v.torch_rank != torch_rank:
                raise self.fail("broadcasting here would not keep the batch as the first axis")
            return v
        rank = torch_rank - 1 if batched_out else torch_rank
        s = v.shape
        if len(s) > rank:
            if any(d != 1 for d in s[:len(s) - rank]):
                raise self.fail(f"a weight of shape {s} would broadcast against the batch axis")
            s = s[len(s) - rank:]
        return self.reshape(v, (1,) * (rank - len(s)) + s)
