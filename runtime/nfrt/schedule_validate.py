"""The cross-field rules of a schedule (docs/schedule-format.md, "Validation"), and its graphs.

Dependencies are checked on a graph over two consecutive layers: nodes (layer, nano-op); edges:
stream order within a layer, the last nano-op of each stream in layer 0 to its first in layer 1
(streams are FIFO across layers), and the explicit dependencies (`prev_layer` ones from layer 0 to
layer 1). Cross-layer edges only go forward, so two layers show every cycle and every ordering
that an unrolled run of any number of layers has. Reachability on it is one transitive closure,
computed once, as bitsets (Python ints): a schedule has ~60 nano-ops, so a row is two machine words.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import TYPE_CHECKING

from nfrt.errors import ScheduleError

if TYPE_CHECKING:
    from nfrt.schedule import LayerOp, Partition, Schedule


# The ops of the all-gather form of the attention output (docs/tensor-parallel.md); class "gather".
GATHER_OPS = ("attn_allgather", "o_proj_col", "o_allgather")


def validate(s: Schedule) -> None:
    _check_metadata(s)
    ancestors = _check_layer(s.layer)
    _check_partitions_and_streams(s, ancestors)
    bounds = _check_nano_batches(s)
    _check_gather_form(s, bounds)
    _check_tokens(s, bounds)
    _check_dependencies(s)
    graph = _Graph(s)
    graph.check_acyclic()
    _check_implied(s, graph)
    _check_shared_sms(s, graph)
    _check_prediction(s)


def layer_order(layer: Iterable[LayerOp]) -> tuple[str, ...]:
    """Op names in a topological order of the same-layer deps (validation requires the listed order
    to be one, so this is the listed order)."""
    return tuple(op.name for op in layer)


def issue_order(s: Schedule) -> tuple[tuple[str, str], ...]:
    """One layer's (stream, nano-op) pairs in a deterministic order that respects the graph."""
    g = _Graph(s)
    start = {}
    if s.prediction is not None:
        start = {e.nano_op: e.start_us for e in s.prediction.timeline}
    key = [(start.get(g.names[i], 0.0), g.pos[i], g.stream_idx[i]) for i in range(g.n)]
    order = g.topo_one_layer(key)
    return tuple((s.streams[g.stream_idx[i]].name, g.names[i]) for i in order)


def _fail(msg: str) -> None:
    raise ScheduleError(msg)


def _known(names: Iterable[str]) -> str:
    names = list(names)
    return ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")


def _check_metadata(s: Schedule) -> None:
    m = s.metadata
    if m.dense_batch != m.batch.dense_batch:
        _fail(f"metadata.dense_batch: {m.dense_batch} != metadata.batch.dense_batch {m.batch.dense_batch}")
    if m.model != m.model_config.name:
        _fail(f"metadata.model: {m.model!r} != metadata.model_config.name {m.model_config.name!r}")


def _check_layer(layer: tuple[LayerOp, ...]) -> dict[str, set[str]]:
    """Names unique, deps known, same-layer deps listed earlier; returns each op's same-layer
    ancestors."""
    if not layer:
        _fail("layer: must list at least one op")
    names = [op.name for op in layer]
    ancestors: dict[str, set[str]] = {}
    for i, op in enumerate(layer):
        if op.name in ancestors:
            _fail(f"layer[{i}].name: duplicate op {op.name}")
        anc: set[str] = set()
        for j, dep in enumerate(op.deps):
            path = f"layer[{i}].deps[{j}].op"
            if dep.op not in names:
                _fail(f"{path}: unknown op {dep.op}; known: {_known(names)}")
            if dep.prev_layer:
                continue
            if dep.op not in ancestors:
                _fail(f"{path}: {op.name} depends on {dep.op} of the same layer, which is not listed "
                      "before it (list the layer in topological order)")
            anc |= {dep.op} | ancestors[dep.op]
        ancestors[op.name] = anc
    return ancestors


def _check_partitions_and_streams(s: Schedule, ancestors: dict[str, set[str]]) -> None:
    if not s.partitions:
        _fail("partitions: must list at least one partition")
    sizes: dict[str, int] = {}
    for i, p in enumerate(s.partitions):
        if p.name in sizes:
            _fail(f"partitions[{i}].name: duplicate partition {p.name}")
        sizes[p.name] = p.num_sms
        start, end = p.sm_range
        if end > s.metadata.num_sms:
            _fail(f"partitions[{i}]: SMs [{start}, {end}) exceed the GPU's {s.metadata.num_sms} SMs")
    if not s.streams:
        _fail("streams: must list at least one stream")
    stream_names: set[str] = set()
    nano_stream: dict[str, str] = {}
    dense = s.metadata.dense_batch
    for i, st in enumerate(s.streams):
        path = f"streams[{i}]"
        if st.name in stream_names:
            _fail(f"{path}.name: duplicate stream {st.name}")
        stream_names.add(st.name)
        if st.partition not in sizes:
            _fail(f"{path}.partition: unknown partition {st.partition}; known: {_known(sizes)}")
        if not st.nano_ops:
            _fail(f"{path}.nano_ops: must list at least one nano-op")
        for j, n in enumerate(st.nano_ops):
            npath = f"{path}.nano_ops[{j}]"
            if n.name in nano_stream:
                _fail(f"{npath}.name: duplicate nano-op {n.name} (also in stream {nano_stream[n.name]})")
            nano_stream[n.name] = st.name
            if n.num_sms != sizes[st.partition]:
                _fail(f"{npath}.num_sms: {n.num_sms} != {sizes[st.partition]}, the SMs of partition "
                      f"{st.partition} of stream {st.name}")
            if n.tokens[1] > dense:
                _fail(f"{npath}.tokens: end {n.tokens[1]} > dense_batch {dense}")
            _check_op_list(n.ops, f"{npath}.ops", ancestors)


def _check_op_list(ops: tuple[str, ...], path: str, ancestors: dict[str, set[str]]) -> None:
    for k, op in enumerate(ops):
        if op not in ancestors:
            _fail(f"{path}[{k}]: unknown op {op}; known: {_known(ancestors)}")
        if op in ops[:k]:
            _fail(f"{path}[{k}]: op {op} listed twice")
    for k, op in enumerate(ops):
        for later in ops[k + 1:]:
            if later in ancestors[op]:
                _fail(f"{path}: {op} is listed before {later}, which it depends on "
                      "(list ops in layer-graph order)")


def _check_nano_batches(s: Schedule) -> list[int]:
    """The nano-batches tile [0, dense_batch) in order; returns the boundaries."""
    dense = s.metadata.dense_batch
    if not s.nano_batches:
        _fail("nano_batches: must list at least one nano-batch")
    bounds = [0]
    seen: set[str] = set()
    for i, nb in enumerate(s.nano_batches):
        path = f"nano_batches[{i}]"
        if nb.name in seen:
            _fail(f"{path}.name: duplicate nano-batch {nb.name}")
        seen.add(nb.name)
        if nb.start != bounds[-1]:
            expected = f"previous end {bounds[-1]}" if i else "0"
            _fail(f"{path}.start: {nb.start} != {expected} (nano-batches must tile [0, {dense}) in order)")
        if nb.end <= nb.start:
            _fail(f"{path}.end: {nb.end} <= start {nb.start}")
        bounds.append(nb.end)
    if bounds[-1] != dense:
        _fail(f"nano_batches[{len(s.nano_batches) - 1}].end: {bounds[-1]} != dense_batch {dense} "
              f"(nano-batches must tile [0, {dense}) in order)")
    return bounds


def class_range(token_class: str, decode_tokens: int, dense_batch: int,
                gather_tokens: int = 0) -> tuple[int, int]:
    """The tokens an op of this class acts on: decode tokens come first in the dense batch; the
    gather form takes the prefix [0, gather_tokens), the reduce form the rest."""
    if token_class == "decode":
        return 0, decode_tokens
    if token_class == "prefill":
        return decode_tokens, dense_batch
    if token_class == "gather":
        return 0, gather_tokens
    if token_class == "reduce":
        return gather_tokens, dense_batch
    return 0, dense_batch


def _ranges(s: Schedule) -> dict[str, tuple[int, int]]:
    """Each layer op's class range in this schedule."""
    b, g = s.metadata.batch, s.metadata.gather_tokens
    return {op.name: class_range(op.token_class, b.decode_tokens, b.dense_batch, g) for op in s.layer}


def _check_gather_form(s: Schedule, bounds: list[int]) -> None:
    """gather_tokens on a nano-batch boundary; the gather ops only in class gather, only at tp > 1;
    with the gather form on, o_proj and attn_allreduce take the rest (class reduce)."""
    m = s.metadata
    g = m.gather_tokens
    if g > m.dense_batch:
        _fail(f"metadata.gather_tokens: {g} > dense_batch {m.dense_batch}")
    if g and g not in bounds:
        _fail(f"metadata.gather_tokens: {g} is not a nano-batch boundary ({', '.join(map(str, bounds))})")
    for i, op in enumerate(s.layer):
        if op.name in GATHER_OPS:
            if op.token_class != "gather":
                _fail(f"layer[{i}].token_class: op {op.name} must have class gather, got {op.token_class}")
            if m.tp < 2:
                _fail(f"layer[{i}].name: op {op.name} (the all-gather form) needs tp > 1, "
                      f"metadata.tp is {m.tp}")
        elif op.token_class == "gather":
            _fail(f"layer[{i}].token_class: class gather is only for {', '.join(GATHER_OPS)}, not {op.name}")
        if g and op.name in ("o_proj", "attn_allreduce") and op.token_class != "reduce":
            _fail(f"layer[{i}].token_class: op {op.name} must have class reduce when metadata.gather_tokens "
                  f"is {g}, got {op.token_class}")
    missing = [name for name in GATHER_OPS if name not in {op.name for op in s.layer}]
    if g and missing:
        _fail(f"metadata.gather_tokens: {g} > 0 but the layer lacks {', '.join(missing)} "
              "(the all-gather form)")


def _check_tokens(s: Schedule, bounds: list[int]) -> None:
    """Token ranges fall on nano-batch boundaries; each layer op's pieces cover its class's tokens once.

    A decode-only op needs no piece over prefill-only nano-batches (and vice versa); at most one.
    """
    seg = {b: k for k, b in enumerate(bounds)}
    count: dict[str, list[list[str]]] = {op.name: [[] for _ in bounds[1:]] for op in s.layer}
    for i, st in enumerate(s.streams):
        for j, n in enumerate(st.nano_ops):
            for end, v in (("start", n.tokens[0]), ("end", n.tokens[1])):
                if v not in seg:
                    _fail(f"streams[{i}].nano_ops[{j}].tokens: {end} {v} is not a nano-batch boundary "
                          f"({', '.join(map(str, bounds))})")
            for op in n.ops:
                for k in range(seg[n.tokens[0]], seg[n.tokens[1]]):
                    count[op][k].append(n.name)
    ranges = _ranges(s)
    for op in s.layer:
        lo, hi = ranges[op.name]
        for k, holders in enumerate(count[op.name]):
            needed = bounds[k] < hi and lo < bounds[k + 1]
            if len(holders) > 1 or (needed and not holders):
                times = "not covered" if not holders else (
                    "covered twice" if len(holders) == 2 else f"covered {len(holders)} times")
                by = f" (by {', '.join(holders)})" if holders else ""
                _fail(f"op {op.name}: tokens [{bounds[k]},{bounds[k + 1]}) {times}{by}")


def _check_dependencies(s: Schedule) -> None:
    names = {n.name for st in s.streams for n in st.nano_ops}
    for i, d in enumerate(s.dependencies):
        for field in ("before", "after"):
            if getattr(d, field) not in names:
                _fail(f"dependencies[{i}].{field}: unknown nano-op {getattr(d, field)}")


class _Graph:
    """Nano-ops as ints 0..n-1 (stream by stream); node i of layer 1 is n + i."""

    def __init__(self, s: Schedule) -> None:
        self.names: list[str] = []
        self.stream_idx: list[int] = []
        self.pos: list[int] = []
        for si, st in enumerate(s.streams):
            for pi, nop in enumerate(st.nano_ops):
                self.names.append(nop.name)
                self.stream_idx.append(si)
                self.pos.append(pi)
        self.n = n = len(self.names)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.succ: list[set[int]] = [set() for _ in range(2 * n)]
        self.layer_edges: list[tuple[int, int]] = []  # same-layer edges of one layer
        first = 0
        for st in s.streams:
            last = first + len(st.nano_ops) - 1
            self.layer_edges += [(i, i + 1) for i in range(first, last)]
            self.succ[last].add(n + first)  # FIFO: this stream's next layer starts after this one
            first = last + 1
        for d in s.dependencies:
            a, b = self.index[d.before], self.index[d.after]
            if d.prev_layer:
                self.succ[a].add(n + b)
            else:
                self.layer_edges.append((a, b))
        for a, b in self.layer_edges:
            self.succ[a].add(b)
            self.succ[n + a].add(n + b)
        self._order: list[int] | None = None  # topological order of both layers
        self._reach: list[int] | None = None  # bit w of _reach[v]: a path v -> w exists

    def label(self, v: int) -> str:
        return f"{self.names[v % self.n]}{'@next' if v >= self.n else ''}"

    def check_acyclic(self) -> list[int]:
        """A topological order of both layers (Kahn's algorithm); if nodes remain, walk back along
        remaining predecessors to a cycle and name it."""
        total = 2 * self.n
        indeg = [0] * total
        preds: list[list[int]] = [[] for _ in range(total)]
        for a in range(total):
            for b in self.succ[a]:
                indeg[b] += 1
                preds[b].append(a)
        ready = [v for v in range(total) if not indeg[v]]
        order = list(ready)
        while ready:
            v = ready.pop()
            for w in self.succ[v]:
                indeg[w] -= 1
                if not indeg[w]:
                    order.append(w)
                    ready.append(w)
        if len(order) == total:
            self._order = order
            return order
        done = set(order)
        v = min(set(range(total)) - done)
        path: list[int] = []
        while v not in path:
            path.append(v)
            v = min(p for p in preds[v] if p not in done)
        cycle = path[path.index(v):][::-1]
        _fail("dependencies: cycle (deadlock) through nano-ops "
              + " -> ".join(self.label(c) for c in cycle + cycle[:1]))

    def reaches(self, a: int, b: int) -> bool:
        """A path a -> b of at least one edge (the graph is acyclic, so never a -> a)."""
        if self._reach is None:
            # closure in reverse topological order: each row ORs its successors' finished rows
            reach = [0] * (2 * self.n)
            for v in reversed(self._order or self.check_acyclic()):
                row = 0
                for w in self.succ[v]:
                    row |= reach[w] | (1 << w)
                reach[v] = row
            self._reach = reach
        return bool(self._reach[a] >> b & 1)

    def topo_one_layer(self, key: list[tuple]) -> list[int]:
        succ: list[list[int]] = [[] for _ in range(self.n)]
        indeg = [0] * self.n
        for a, b in set(self.layer_edges):
            succ[a].append(b)
            indeg[b] += 1
        heap = [(key[v], v) for v in range(self.n) if not indeg[v]]
        heapq.heapify(heap)
        order = []
        while heap:
            _, v = heapq.heappop(heap)
            order.append(v)
            for w in succ[v]:
                indeg[w] -= 1
                if not indeg[w]:
                    heapq.heappush(heap, (key[w], w))
        return order


def _check_implied(s: Schedule, g: _Graph) -> None:
    """Every layer-graph dependency must be implied by stream order and explicit dependencies."""
    holders: dict[str, list[tuple[int, tuple[int, int], tuple[str, ...]]]] = {op.name: [] for op in s.layer}
    for st in s.streams:
        for nop in st.nano_ops:
            for op in nop.ops:
                holders[op].append((g.index[nop.name], nop.tokens, nop.ops))
    ranges = _ranges(s)
    for op in s.layer:
        op_lo, op_hi = ranges[op.name]
        for dep in op.deps:
            pred_lo, pred_hi = ranges[dep.op]
            for x, (a, b), _ in holders[op.name]:
                if not (a < op_hi and op_lo < b):
                    continue  # no tokens of this op's class here: nothing runs, nothing needed
                # the pred tokens this piece reads: its own tokens, or its class's prefix up to b
                lo = max(a, op_lo) if dep.scope == "token" else op_lo
                lo, hi = max(lo, pred_lo), min(b, op_hi, pred_hi)
                for y, (c, d), _ in holders[dep.op]:
                    if not (c < hi and lo < d):
                        continue
                    if y == x and not dep.prev_layer:
                        continue  # same nano-op: the op-list order check already put dep.op first
                    if g.reaches(y, x + (g.n if dep.prev_layer else 0)):
                        continue
                    before = f"the previous layer's {g.names[y]}" if dep.prev_layer else g.names[y]
                    hint = " with prev_layer: true" if dep.prev_layer else ""
                    _fail(f"dependencies: nano-op {g.names[x]} may start before {before} finishes: "
                          f"add a dependency{hint} ({op.name} on tokens [{lo},{hi}) needs {dep.op})")


def _check_shared_sms(s: Schedule, g: _Graph) -> None:
    """Streams whose partitions intersect share SMs: every pair of their nano-ops must be ordered,
    in one layer and across consecutive layers (layer 1 never precedes layer 0, so across layers
    both x -> y@next and y -> x@next are needed). One stream with itself is ordered by FIFO."""
    part = {p.name: p for p in s.partitions}
    nodes: list[list[int]] = [[] for _ in s.streams]
    for v in range(g.n):
        nodes[g.stream_idx[v]].append(v)
    n = g.n
    for i, si in enumerate(s.streams):
        pi = part[si.partition]
        for j in range(i + 1, len(s.streams)):
            sj = s.streams[j]
            pj = part[sj.partition]
            lo, hi = max(pi.first_sm, pj.first_sm), min(pi.sm_range[1], pj.sm_range[1])
            if lo >= hi:
                continue
            for x in nodes[i]:
                for y in nodes[j]:
                    if not (g.reaches(x, y) or g.reaches(y, x)):
                        first, second, nxt = (si, x), (sj, y), False
                    elif not g.reaches(x, n + y):
                        first, second, nxt = (si, x), (sj, y), True
                    elif not g.reaches(y, n + x):
                        first, second, nxt = (sj, y), (si, x), True
                    else:
                        continue
                    (sa, a), (sb, b) = first, second
                    later = "the next layer's " if nxt else ""
                    hint = " with prev_layer: true" if nxt else ""
                    _fail(f"dependencies: streams {sa.name} and {sb.name} share SMs [{lo}, {hi}) "
                          f"(partitions {sa.partition} {_span(part[sa.partition])}, {sb.partition} "
                          f"{_span(part[sb.partition])}) but nano-ops {g.names[a]} and {later}{g.names[b]} "
                          f"may run at the same time: add a dependency{hint}")


def _span(p: Partition) -> str:
    return f"[{p.sm_range[0]}, {p.sm_range[1]})"


def _check_prediction(s: Schedule) -> None:
    p = s.prediction
    if p is None or not p.timeline:
        return
    where = {n.name: st.name for st in s.streams for n in st.nano_ops}
    seen: set[str] = set()
    for i, e in enumerate(p.timeline):
        path = f"prediction.timeline[{i}]"
        if e.nano_op not in where:
            _fail(f"{path}.nano_op: unknown nano-op {e.nano_op}")
        if e.nano_op in seen:
            _fail(f"{path}.nano_op: {e.nano_op} listed twice")
        seen.add(e.nano_op)
        if e.stream != where[e.nano_op]:
            _fail(f"{path}.stream: nano-op {e.nano_op} is on stream {where[e.nano_op]}, not {e.stream}")
        if e.end_us < e.start_us:
            _fail(f"{path}.end_us: {e.end_us} < start_us {e.start_us}")
    missing = [n for n in where if n not in seen]
    if missing:
        _fail(f"prediction.timeline: missing nano-op(s) {', '.join(missing)} (list all or none)")
