"""Static memory planning for microcontroller builds.

Every buffer a model needs while it runs (an intermediate tensor between two kernels, or the
workspace one kernel asks for with ``TVMBackendAllocWorkspace``) has a lifetime: the interval of
steps of the call sequence from the kernel that writes it to the last kernel that reads it (a
kernel's workspace lives during that kernel only). Two buffers whose lifetimes overlap must not
share bytes; all others may. The planner places every buffer at an offset in one arena:

* greedy by size (the strategy TensorFlow Lite Micro uses): the largest buffers are placed first,
  each at the lowest aligned offset where it does not collide with an already placed buffer whose
  lifetime overlaps its own;
* the arena size is the highest end offset.

The result is never larger than the sum of all buffers, and for a chain of layers it is about the
two largest neighbouring tensors. :func:`plan` is pure Python, independent of TVM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Byte alignment of every buffer in the arena (enough for any scalar and for 128-bit vector loads).
ALIGN = 16


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class Buffer:
    """One buffer to place: ``size`` bytes live from step ``first`` to step ``last`` (inclusive)."""

    name: str
    size: int
    first: int
    last: int
    kind: str = "tensor"  # "tensor" (an intermediate between kernels) or "workspace"

    def overlaps(self, other: "Buffer") -> bool:
        return self.first <= other.last and other.first <= self.last


@dataclass
class MemoryPlan:
    """Offsets of every buffer in one arena of ``arena_bytes``."""

    buffers: list[Buffer]
    offsets: dict[str, int]
    arena_bytes: int
    align: int = ALIGN
    notes: list[str] = field(default_factory=list)

    @property
    def tensor_bytes(self) -> int:
        """Sum of the (aligned) sizes of all intermediate tensors: the arena without reuse."""
        return sum(align_up(b.size, self.align) for b in self.buffers if b.kind == "tensor")

    @property
    def workspace_bytes(self) -> int:
        """The largest workspace any one kernel needs (each lives only during its kernel)."""
        return max((b.size for b in self.buffers if b.kind == "workspace"), default=0)

    @property
    def unplanned_bytes(self) -> int:
        """Sum of every buffer: what a planner without reuse would need."""
        return sum(align_up(b.size, self.align) for b in self.buffers)

    def check(self) -> None:
        """Assert that no two buffers with overlapping lifetimes share a byte (a self-test)."""
        bs = self.buffers
        for i, a in enumerate(bs):
            oa = self.offsets[a.name]
            assert oa % self.align == 0 and oa + a.size <= self.arena_bytes, a
            for b in bs[i + 1:]:
                if a.overlaps(b):
                    ob = self.offsets[b.name]
                    assert oa + a.size <= ob or ob + b.size <= oa, (a, b, oa, ob)


def plan(buffers: list[Buffer], align: int = ALIGN) -> MemoryPlan:
    """Place ``buffers`` greedily by size (see the module docstring)."""
    names = [b.name for b in buffers]
    if len(set(names)) != len(names):
        raise ValueError(f"buffer names must be unique: {names}")
    order = sorted(buffers, key=lambda b: (-b.size, b.first, b.name))
    placed: list[tuple[int, Buffer]] = []
    offsets: dict[str, int] = {}
    for buf in order:
        if buf.size == 0:
            offsets[buf.name] = 0
            continue
        busy = sorted((off, off + other.size) for off, other in placed if other.overlaps(buf))
        offset = 0
        for start, end in busy:
            if offset + buf.size <= start:
                break
            offset = max(offset, align_up(end, align))
        offsets[buf.name] = offset
        placed.append((offset, buf))
    arena = align_up(max((offsets[b.name] + b.size for b in buffers), default=0), align)
    result = MemoryPlan(list(buffers), offsets, arena, align)
    result.check()
    return result
