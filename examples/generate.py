"""Solve a schedule, load it into the runtime and generate: the documented way to serve with nfsearch.

    python examples/generate.py                          # CPU: tiny-llama, random weights, seconds
    python examples/generate.py --model llama3-8b --gpu h200 --workload splitwise   # on a GPU
    python examples/generate.py --schedule schedules/llama3-8b-h200-tp1-splitwise.yaml
    python examples/generate.py --weights /path/to/hf-checkpoint --schedule S.yaml

Without --weights the model has random weights (the tokens mean nothing; the serving path is the
same). Steps: `nfsearch.plan.plan(SolveConfig)` -> `Schedule` (or a schedule file) ->
`nfrt.LLM(schedule, weights)` -> `generate` / `stream`. See docs/serving.md.
"""

from __future__ import annotations

import argparse
import random
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama",
                    help="built-in model to solve for (default: %(default)s)")
    ap.add_argument("--gpu", default="h200", help="GPU to solve for (default: %(default)s)")
    ap.add_argument("--workload", default="const:32:16", help="workload to solve for (default: %(default)s)")
    ap.add_argument("--dense-batch", type=int, default=None, help="tokens per iteration (default: 64 for "
                    "tiny models, else the solver's 2048)")
    ap.add_argument("--schedule", help="a schedule file instead of solving")
    ap.add_argument("--weights", help="a Hugging Face checkpoint folder (default: random weights)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    args = ap.parse_args()

    import torch
    from nfrt import LLM
    from nfrt.schedule import load_schedule

    if args.schedule:
        schedule = load_schedule(args.schedule)
    else:
        from nfsearch.config import SolveConfig
        from nfsearch.plan import plan

        tiny = args.model.startswith("tiny")
        dense = args.dense_batch or (64 if tiny else 2048)
        cfg = SolveConfig(model=args.model, gpu=args.gpu, workload=args.workload, dense_batch=dense,
                          granularity_tokens=8 if tiny else 64, time_limit_s=30)
        t = time.perf_counter()
        schedule = plan(cfg).schedule
        print(f"solved {args.model} on {args.gpu} for {args.workload} in {time.perf_counter() - t:.1f} s: "
              f"{len(schedule.nano_batches)} nano-batches, streams "
              f"{', '.join(s.name for s in schedule.streams)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else None
    if sms is not None and schedule.metadata.num_sms != sms:
        schedule = schedule.as_sequential(sms)
        print("the schedule is for another GPU: running its sequential twin")
    max_len = min(4096, schedule.metadata.model_config.max_position)
    llm = LLM(schedule, args.weights, device=device, max_seq_len=max_len)
    b = schedule.metadata.batch
    print(f"loaded {schedule.metadata.model} on {device}: dense batch {b.dense_batch} "
          f"({b.decode_tokens} decode slots), {llm.num_pages} KV pages, CUDA graph: {llm.graph}")
    rng = random.Random(0)
    vocab = llm.config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(1, 48))] for _ in range(args.requests)]
    t = time.perf_counter()
    for done in llm.stream(prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_p=args.top_p, seed=0):
        print(f"request {done.index} ({len(prompts[done.index])} prompt tokens): {list(done.token_ids)}")
    wall = time.perf_counter() - t
    tokens = sum(len(p) for p in prompts) + args.requests * args.max_new_tokens
    print(f"{args.requests} requests, {tokens} tokens in {wall:.2f} s "
          f"({llm.stats['iterations']} iterations); "
          f"KV pages free again: {llm.free_pages == llm.usable_pages}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
