"""A family of K = 2 structures that stage 2 tries beside stage 1's pick [S1.family].

Stage 1 chooses one structure per K from solo all-SM latencies, among many of nearly equal period;
it cannot see that a GEMM beside decode attention loses SMs, so it cannot prefer a structure whose
decode attention gets few SMs for a long time. The family below is that shape: nano-batch 0 holds
every decode token and ends at granule b (decode granules <= b <= half the batch); its decode
attention runs on the memory stream while the compute stream runs nano-batch 1's ops, then nano-batch
0's remaining ops. Every op is cut in two except the prefill-class ops (whole: they need both
nano-batches' KV anyway) and, as a variant, the layer's last op (whole or cut). On llama3-8b
splitwise on an H100 the best of them by stage 2 measured 1.079-1.090x against 1.050-1.057x for
stage 1's pick, and 1.100-1.107x solved from the profile re-measured on the full GEMM grid
(benchmarks/RESULTS.md, session 14).

Pure: structures only; `twostage` runs stage 2 on them.
"""

from __future__ import annotations

from nfsearch.search.problem import SearchProblem
from nfsearch.search.timeline import Structure


def applies(problem: SearchProblem) -> bool:
    """The family needs decode tokens, a memory op, no network ops and no attention-output forms."""
    kinds = {o.kind for o in problem.ops}
    return (problem.decode_granules >= 1 and "memory" in kinds and "network" not in kinds
            and not problem.has_forms and 2 <= problem.max_nano_batches and 2 in problem.split_options
            and 2 * problem.decode_granules <= problem.num_granules)


def _ancestors(problem: SearchProblem, name: str) -> set[str]:
    deps = {o.name: [d.op for d in o.deps if not d.prev_layer] for o in problem.ops}
    seen: set[str] = set()
    todo = list(deps[name])
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo += deps[n]
    return seen


def k2_family(problem: SearchProblem) -> list[tuple[str, Structure]]:
    """(label, structure) for every b and variant of the module docstring; [] where it does not apply."""
    if not applies(problem):
        return []
    ops = problem.ops  # topological order
    memory = [o.name for o in ops if o.kind == "memory"]
    before_memory = set().union(*(_ancestors(problem, m) for m in memory))
    last = ops[-1].name
    variants = []  # (last op's pieces, splits, stream order): the same for every b
    for last_pieces in (1, 2):
        splits = {o.name: 1 if o.token_class == "prefill" or (o.name == last and last_pieces == 1) else 2
                  for o in ops}
        first: list[str] = []  # nano-batch 0 up to its decode attention
        middle: list[str] = []  # nano-batch 1, and whole ops whose deps are all done by then
        rest: list[str] = []  # nano-batch 0's remaining ops, whole ops after them
        done: set[str] = set()  # ops whose nano-batch 0 part is in `first`
        for o in ops:
            if o.kind != "compute":
                continue
            if splits[o.name] == 2:
                if o.name in before_memory:
                    first.append(f"{o.name}.0")
                    done.add(o.name)
                else:
                    rest.append(f"{o.name}.0")
                middle.append(f"{o.name}.1")
            elif all(d.op in done or d.prev_layer for d in o.deps):
                middle.append(f"{o.name}.0")
                done.add(o.name)
            else:
                rest.append(f"{o.name}.0")
        order = {"compute": tuple(first + middle + rest), "memory": tuple(f"{m}.0" for m in memory)}
        variants.append((last_pieces, splits, order))
    g = problem.num_granules
    return [(f"b{b * problem.granularity_tokens}-last{p}", Structure(2, (0, b, g), dict(splits), order))
            for b in range(problem.decode_granules, g // 2 + 1) for p, splits, order in variants]
