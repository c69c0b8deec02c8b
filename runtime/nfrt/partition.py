"""Disjoint SM partitions: one CUDA green context and one stream per partition.

Green contexts created one by one (`torch.cuda.GreenContext.create`) all start at SM 0 and overlap
completely; only a resource *split* hands out disjoint SM sets. So every partition here comes from
`cuDevSmResourceSplitByCount` over one device resource: sizes in ascending order, each distinct
size split off in one call (one group per partition of that size), the next size split from the
remainder of the previous split (through a green context made on it, as the driver requires), and
the largest partition may be the final remainder itself, which need not be aligned.

The green contexts and streams live as long as the `Partitions` object (or until `close()`); the
SM count of each stream is registered so kernels can size their grids (`stream_num_sms`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from nfrt.errors import NfrtError

# stream handle -> SM count, for streams made here (kernels read it to size their grids)
_STREAM_SMS: dict[int, int] = {}
_DEVICE_SMS: dict[int, int] = {}


def stream_num_sms(stream: torch.cuda.Stream | None = None, device: torch.device | int | None = None) -> int:
    """SMs the stream may use: its partition's size when made here, else the whole device."""
    if stream is None:
        stream = torch.cuda.current_stream(device)
    n = _STREAM_SMS.get(int(stream.cuda_stream))
    if n is not None:
        return n
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or stream.device)
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    if idx not in _DEVICE_SMS:
        _DEVICE_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _DEVICE_SMS[idx]


@dataclass(eq=False)
class Partition:
    """One disjoint SM set: `num_sms` SMs reachable only through `stream`."""

    num_sms: int
    stream: torch.cuda.Stream
    handle: Any = field(repr=False)  # CUstream
    green_ctx: Any = field(repr=False)  # CUgreenCtx


@dataclass(eq=False)
class Partitions:
    """Partitions in the order their sizes were asked; `close()` (or `with`) releases them."""

    device: int
    parts: list[Partition]
    _extra_ctxs: list[Any] = field(default_factory=list, repr=False)  # intermediate split sources
    _closed: bool = False

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, i: int) -> Partition:
        return self.parts[i]

    def __iter__(self):
        return iter(self.parts)

    @property
    def sizes(self) -> list[int]:
        return [p.num_sms for p in self.parts]

    @property
    def streams(self) -> list[torch.cuda.Stream]:
        return [p.stream for p in self.parts]

    def close(self) -> None:
        """Wait for the streams, then destroy them and the green contexts (idempotent)."""
        if self._closed:
            return
        _destroy([(p.handle, p.stream) for p in self.parts],
                 [p.green_ctx for p in self.parts] + self._extra_ctxs)
        self._closed = True

    def __enter__(self) -> Partitions:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _driver() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError:
        raise NfrtError("SM partitions need the cuda-bindings package (pip install cuda-python); "
                        "`from cuda.bindings import driver` failed") from None
    return driver


def _check(ret: Any, what: str) -> Any:
    """Unpack a cuda.bindings result tuple, raising NfrtError on a CUDA error."""
    err = ret[0] if isinstance(ret, tuple) else ret
    if err != _driver().CUresult.CUDA_SUCCESS:
        raise NfrtError(f"{what} failed: {err!r}")
    if not isinstance(ret, tuple) or len(ret) == 1:
        return None
    return ret[1] if len(ret) == 2 else ret[1:]


def _device_sm_resource(device: int, what: str) -> tuple[Any, Any, Any, int]:
    """(driver, CUdevice, the device's SM resource, its split granularity), with the primary
    context current so the driver API can be used."""
    if not torch.cuda.is_available():
        raise NfrtError(f"{what}: CUDA is not available")
    drv = _driver()
    torch.cuda.init()
    torch.zeros(1, device=f"cuda:{device}")  # make the primary context current for the driver API
    dev = _check(drv.cuDeviceGet(device), "cuDeviceGet")
    res = _check(drv.cuDeviceGetDevResource(dev, drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM),
                 "cuDeviceGetDevResource")
    return drv, dev, res, _granularity(res.sm, torch.cuda.get_device_capability(device)[0])


def _green_ctx(drv: Any, dev: Any, resources: list[Any]) -> Any:
    """A green context over `resources` (SM resources of one device)."""
    desc = _check(drv.cuDevResourceGenerateDesc(resources, len(resources)), "cuDevResourceGenerateDesc")
    return _check(drv.cuGreenCtxCreate(desc, dev, drv.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM),
                  "cuGreenCtxCreate")


def _green_stream(drv: Any, ctx: Any, device: int, num_sms: int) -> tuple[Any, torch.cuda.Stream]:
    """A non-blocking stream on green context `ctx`, registered for `stream_num_sms`: (CUstream, stream)."""
    h = _check(drv.cuGreenCtxStreamCreate(ctx, drv.CUstream_flags.CU_STREAM_NON_BLOCKING, 0),
               "cuGreenCtxStreamCreate")
    stream = torch.cuda.ExternalStream(int(h), device=torch.device("cuda", device))
    _STREAM_SMS[int(h)] = num_sms
    return h, stream


def _destroy(streams: list[tuple[Any, torch.cuda.Stream]], ctxs: list[Any]) -> None:
    """Wait for the streams, then destroy them, then the green contexts."""
    drv = _driver()
    for _, stream in streams:
        stream.synchronize()
    for h, _ in streams:
        _STREAM_SMS.pop(int(h), None)
        _check(drv.cuStreamDestroy(h), "cuStreamDestroy")
    for c in ctxs:
        _check(drv.cuGreenCtxDestroy(c), "cuGreenCtxDestroy")


def _granularity(sm_resource: Any, major: int) -> int:
    """SM count granularity of a split: 8 on Hopper and later (2 before), or the driver's coarser one."""
    align = int(getattr(sm_resource, "smCoscheduledAlignment", 0) or 0)
    return max(align, 8 if major >= 9 else 2)


def _validate(sizes: list[int], total: int, gran: int) -> None:
    if not sizes:
        raise NfrtError("make_partitions: sizes must be a non-empty list of SM counts")
    for s in sizes:
        if not isinstance(s, int) or isinstance(s, bool) or s <= 0:
            raise NfrtError(f"make_partitions: SM count {s!r} must be a positive integer")
    if sum(sizes) > total:
        raise NfrtError(f"make_partitions: sizes {sizes} sum to {sum(sizes)} SMs, the device has {total}")
    order = sorted(sizes)
    remainder_ok = sum(sizes) == total and (len(order) == 1 or order[-1] != order[-2])
    for i, s in enumerate(order):
        last_remainder = remainder_ok and i == len(order) - 1
        if s % gran and not last_remainder:
            raise NfrtError(f"make_partitions: SM count {s} is not a multiple of {gran} (this GPU's "
                            f"partition granularity); only the largest partition, when the sizes sum "
                            f"to all {total} SMs, may be unaligned")


def make_partitions(sizes: list[int], device: int = 0) -> Partitions:
    """Disjoint SM partitions of exactly `sizes` SMs, each with its own non-blocking stream."""
    sizes = list(sizes)
    drv, dev, res, gran = _device_sm_resource(device, "make_partitions")
    sm_type = drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM
    total = int(res.sm.smCount)
    _validate(sizes, total, gran)

    made: dict[int, list[Partition]] = {}  # size -> partitions of that size, in split order
    out = Partitions(device=device, parts=[])

    def partition(resource: Any, want: int) -> Partition:
        got = int(resource.sm.smCount)
        if got != want:
            raise NfrtError(f"make_partitions: asked {want} SMs, the driver's split gave {got}")
        g = _green_ctx(drv, dev, [resource])
        h, stream = _green_stream(drv, g, device, want)
        p = Partition(num_sms=want, stream=stream, handle=h, green_ctx=g)
        made.setdefault(want, []).append(p)
        return p

    try:
        distinct = sorted(set(sizes))
        cur, left = res, total
        for i, s in enumerate(distinct):
            count = sizes.count(s)
            if i == len(distinct) - 1 and count == 1 and s == left:
                partition(cur, s)  # the final remainder is this partition
                break
            r = drv.cuDevSmResourceSplitByCount(count, cur, 0, s)
            groups, n_groups, rem = _check(r, f"cuDevSmResourceSplitByCount({count} x {s} SMs)")
            if n_groups != count:
                raise NfrtError(f"make_partitions: asked {count} groups of {s} SMs from {left}, "
                                f"the driver made {n_groups}")
            for grp in list(groups)[:count]:
                partition(grp, s)
            left -= s * count
            if i + 1 < len(distinct):
                nxt = distinct[i + 1]
                if not (i + 2 == len(distinct) and sizes.count(nxt) == 1 and nxt == left):
                    # a remainder is split again only through a green context
                    g = _green_ctx(drv, dev, [rem])
                    out._extra_ctxs.append(g)
                    rem = _check(drv.cuGreenCtxGetDevResource(g, sm_type), "cuGreenCtxGetDevResource")
                cur = rem
        for s in sizes:  # the order asked
            out.parts.append(made[s].pop(0))
    except BaseException:
        out.parts = [p for ps in made.values() for p in ps] + out.parts
        out.close()
        raise
    return out


@dataclass(eq=False)
class SmLayout:
    """The GPU's SMs split once into aligned groups; streams over contiguous ranges of them.

    Slot ranges follow the schedule's placement (`Partition.first_sm`): slots [0, aligned) are the
    groups in split order (`granularity` SMs each), and the unaligned left-over SMs (4 on a
    132-SM Hopper) are reachable only by a range that covers the whole GPU. Two ranges share SMs
    iff they intersect, so a schedule that orders nano-ops on intersecting ranges never runs two
    kernels on one SM at once, while each stream still gets exactly its SM count.
    """

    device: int
    total: int
    granularity: int
    groups: list[Any] = field(repr=False)
    remainder: Any = field(repr=False)
    _ctxs: list[Any] = field(default_factory=list, repr=False)
    _streams: list[Any] = field(default_factory=list, repr=False)  # (handle, torch stream)
    _closed: bool = False

    @property
    def aligned(self) -> int:
        return self.granularity * len(self.groups)

    def stream(self, first_sm: int, num_sms: int) -> torch.cuda.Stream:
        """A new non-blocking stream on a green context over SM slots [first_sm, first_sm + num_sms)."""
        drv = _driver()
        if num_sms == self.total and first_sm == 0:
            resources = [*self.groups, *([self.remainder] if self.remainder is not None else [])]
        else:
            g = self.granularity
            end = first_sm + num_sms
            if first_sm % g or num_sms % g or num_sms <= 0 or first_sm < 0 or end > self.aligned:
                raise NfrtError(f"SM range [{first_sm}, {first_sm + num_sms}) must be {g}-aligned within the "
                                f"{self.aligned} aligned SMs (or cover all {self.total})")
            resources = self.groups[first_sm // g:(first_sm + num_sms) // g]
        dev = _check(drv.cuDeviceGet(self.device), "cuDeviceGet")
        ctx = _green_ctx(drv, dev, list(resources))
        self._ctxs.append(ctx)
        h, s = _green_stream(drv, ctx, self.device, num_sms)
        self._streams.append((h, s))
        return s

    def close(self) -> None:
        if self._closed:
            return
        _destroy(self._streams, self._ctxs)
        self._closed = True


def make_layout(device: int = 0) -> SmLayout:
    """Split the device's SMs once into groups of its partition granularity (8 on Hopper)."""
    drv, _, res, gran = _device_sm_resource(device, "make_layout")
    total = int(res.sm.smCount)
    # The driver makes as many whole groups as the chip's GPC layout allows (15 of 8 SMs on a
    # 132-SM H200, remainder 12), which may be fewer than total // gran.
    want = total // gran
    groups, n, rem = _check(drv.cuDevSmResourceSplitByCount(want, res, 0, gran),
                            f"cuDevSmResourceSplitByCount({want} x {gran} SMs)")
    if n < 1:
        raise NfrtError(f"make_layout: the driver made no group of {gran} SMs")
    remainder = rem if int(rem.sm.smCount) > 0 else None
    return SmLayout(device=device, total=total, granularity=gran, groups=list(groups)[:n],
                    remainder=remainder)
