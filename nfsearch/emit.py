"""Solution -> schedule: physical streams, placed SM partitions and the events that order them.

The search gives every nano-op its own SM count. The runtime needs a fixed set of CUDA streams,
each on one green-context partition, so each (kind, SM count) becomes one stream. Partitions are
placed on one layout of the GPU's SMs: compute partitions from the low end, network at the high
end of the placeable SMs (`concurrent_sms`: 128 of 132, whole 8-SM groups), memory just below it.
Two nano-ops that the search lets run at the same time then sit on disjoint SMs; nano-ops on
overlapping ranges get explicit dependencies in the order the predicted timeline has them, so
that they never share SMs.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
from nfrt.schedule import Dependency, Partition

from nfsearch.errors import NfsearchError
from nfsearch.search.problem import SearchProblem, Solution
from nfsearch.search.timeline import waits_for

Node = tuple[int, str]  # (layer 0 or 1, nano-op name)


@dataclass(frozen=True)
class PhysicalStream:
    name: str
    kind: str  # compute | memory | network, or mixed for the single stream of a sequential plan
    partition: Partition
    nano_ops: tuple[str, ...]  # issue order within one layer


@dataclass(frozen=True)
class Placement:
    streams: tuple[PhysicalStream, ...]
    dependencies: tuple[Dependency, ...]


def _layout(sol: Solution, num_sms: int, top: int) -> tuple[dict[str, str], dict[str, Partition]]:
    """Physical stream per nano-op, and the placed partition of each physical stream."""
    sizes = {kind: sorted({n.num_sms for n in sol.nano_ops if n.stream == kind}, reverse=True)
             for kind in sol.stream_order}
    single = len(sizes) == 1 and len(next(iter(sizes.values()))) == 1
    net_sms = max(sizes.get("network", [0]), default=0)
    stream_of, parts = {}, {}
    for n in sol.nano_ops:
        name = "main" if single else f"{n.stream}-{n.num_sms}"
        stream_of[n.name] = name
        if name in parts:
            continue
        if n.num_sms == num_sms or n.stream == "compute":
            first = 0
        elif n.stream == "network":
            first = top - n.num_sms
        else:  # memory: below the network partition, if there is one
            first = top - n.num_sms - (net_sms if n.num_sms + net_sms <= top else 0)
        parts[name] = Partition(name="all" if single else name, num_sms=n.num_sms, first_sm=first)
    return stream_of, parts


def _data_edges(problem: SearchProblem, sol: Solution) -> list[tuple[str, str, bool]]:
    """(before, after, prev_layer) for every dependency the layer graph implies between nano-ops."""
    by_op: dict[str, list] = {}
    for n in sol.nano_ops:
        by_op.setdefault(n.op, []).append(n)
    return [(before.name, after.name, dep.prev_layer)
            for op in problem.ops for after in by_op.get(op.name, []) for dep in op.deps
            for before in by_op.get(dep.op, [])
            if waits_for(problem, op, dep, after.granules, before.granules)]


class _Order:
    """Happens-before over two consecutive layers: stream order, FIFO across layers, events."""

    def __init__(self, streams: dict[str, list[str]]) -> None:
        self.g = nx.DiGraph()
        for ops in streams.values():
            for layer in (0, 1):
                self.g.add_nodes_from((layer, o) for o in ops)
                nx.add_path(self.g, [(layer, o) for o in ops])
            if ops:
                self.g.add_edge((0, ops[-1]), (1, ops[0]))

    def add(self, before: str, after: str, prev_layer: bool) -> None:
        if prev_layer:
            self.g.add_edge((0, before), (1, after))
        else:
            self.g.add_edge((0, before), (0, after))
            self.g.add_edge((1, before), (1, after))

    def reaches(self, a: Node, b: Node) -> bool:
        return nx.has_path(self.g, a, b)


def place(problem: SearchProblem, sol: Solution) -> Placement:
    n_sms = problem.num_sms
    stream_of, parts = _layout(sol, n_sms, problem.concurrent_sms or n_sms)
    nano = {n.name: n for n in sol.nano_ops}
    physical: dict[str, list[str]] = {name: [] for name in parts}
    for kind in ("compute", "memory", "network"):
        for name in sol.stream_order.get(kind, ()):
            physical[stream_of[name]].append(name)
    order = _Order(physical)
    deps: dict[tuple[str, str, bool], None] = {}

    def need(before: str, after: str, prev_layer: bool) -> None:
        a, b = (0, before), ((1 if prev_layer else 0), after)
        if not order.reaches(a, b):
            deps[(before, after, prev_layer)] = None
            order.add(before, after, prev_layer)

    # logical streams are FIFO: consecutive nano-ops of one kind on different physical streams
    for names in sol.stream_order.values():
        for x, y in zip(names, names[1:], strict=False):
            need(x, y, False)
        if names:
            need(names[-1], names[0], True)
    for before, after, prev in _data_edges(problem, sol):
        need(before, after, prev)
    # nano-ops on overlapping SM ranges must never run together: order them as predicted
    period = sol.period_us
    ranges = {s: (p.first_sm, p.first_sm + p.num_sms) for s, p in parts.items()}
    for x in sol.nano_ops:
        for y in sol.nano_ops:
            sx, sy = stream_of[x.name], stream_of[y.name]
            if x.name >= y.name or sx == sy:
                continue
            (a0, a1), (b0, b1) = ranges[sx], ranges[sy]
            if not (a0 < b1 and b0 < a1):
                continue
            for first, second in ((x, y), (y, x)):
                # same layer
                if not (order.reaches((0, first.name), (0, second.name))
                        or order.reaches((0, second.name), (0, first.name))):
                    if first.end_us <= second.start_us + 1e-6:
                        need(first.name, second.name, False)
                # `second` of the next layer must follow `first` of this layer
                if not order.reaches((0, first.name), (1, second.name)):
                    if first.end_us <= second.start_us + period + 1e-6:
                        need(first.name, second.name, True)
                    else:
                        raise NfsearchError(
                            f"cannot order {second.name} of layer l+1 after {first.name} of layer l on "
                            f"shared SMs; the solution overlaps them")
            if not (order.reaches((0, x.name), (0, y.name)) or order.reaches((0, y.name), (0, x.name))):
                raise NfsearchError(f"nano-ops {x.name} and {y.name} share SMs and overlap in the "
                                    "predicted timeline: the solution violates [S2.sms]")
    return Placement(
        streams=tuple(PhysicalStream(name=s, kind="mixed" if s == "main" else nano[ops[0]].stream,
                                     partition=parts[s], nano_ops=tuple(ops))
                      for s, ops in physical.items() if ops),
        dependencies=tuple(Dependency(before=b, after=a, prev_layer=p) for b, a, p in deps))
