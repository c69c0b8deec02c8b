"""A schedule with its decode-attention partition resized: memory on the top m placed SMs, the
compute partition beside it on the rest (an experiment on stage 2's SM choice; the prediction in
the file is left as solved, so meas/pred of a variant is against the original's).

    python benchmarks/probes/sm_variants.py SCHEDULE.yaml M OUT.yaml
"""

from __future__ import annotations

import sys
from dataclasses import replace

from nfrt.schedule import load_schedule, save_schedule


def resize(path: str, memory_sms: int, out: str, top: int = 120) -> None:
    s = load_schedule(path)
    (mem,) = [p for p in s.partitions if p.name.startswith("memory-")]
    beside = [p for p in s.partitions if p.first_sm == 0 and p.num_sms == mem.first_sm]
    if len(beside) != 1:
        raise SystemExit(f"{path}: no compute partition of {mem.first_sm} SMs beside {mem.name}")
    old_c = beside[0]
    new_m = replace(mem, name=f"memory-{memory_sms}", num_sms=memory_sms, first_sm=top - memory_sms)
    new_c = replace(old_c, name=f"compute-{top - memory_sms}", num_sms=top - memory_sms)
    names = {mem.name: new_m, old_c.name: new_c}
    parts = tuple(names.get(p.name, p) for p in s.partitions)
    streams = tuple(replace(st, name=names[st.partition].name if st.partition in names else st.name,
                            partition=names[st.partition].name if st.partition in names else st.partition,
                            nano_ops=tuple(replace(n, num_sms=names[st.partition].num_sms)
                                           if st.partition in names else n for n in st.nano_ops))
                    for st in s.streams)
    renamed = {st.name: new.name for st, new in zip(s.streams, streams, strict=True)}
    timeline = tuple(replace(e, stream=renamed[e.stream]) for e in s.prediction.timeline)
    save_schedule(replace(s, partitions=parts, streams=streams,
                          prediction=replace(s.prediction, timeline=timeline)), out)


if __name__ == "__main__":
    resize(sys.argv[1], int(sys.argv[2]), sys.argv[3])
