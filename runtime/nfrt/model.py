"""A decoder-only model as named layer ops over static buffers (docs/architecture.md vocabulary).

`run_op(layer, op, start, end)` runs one op of one layer on tokens [start, end) of the bound dense
batch; decode-class ops act on the decode tokens inside the range, prefill-class ops on the prefill
tokens inside it. Every op reads and writes rows of static buffers (no allocation that outlives
the op, no host sync), so any interleaving of ops on disjoint token ranges that respects the layer
dependencies computes the same result, and the whole forward can be captured in one CUDA graph.

Data flow (vLLM style): `hidden` (h) and `residual` (r) pass between layers; `input_norm` does
r += h (layer 0: r = h), normed = rmsnorm(r); `o_proj`, `down` and `expert_down` write h.

Under TP the attention output of tokens [0, gather_tokens) may run in the all-gather form
(docs/tensor-parallel.md): `attn_allgather` -> `o_proj_col` -> `o_allgather` write the full O output
into h, where the reduce form (`o_proj` -> `attn_allreduce`) runs on the rest.
"""

from __future__ import annotations

import os

import torch

from nfrt import kernels as K
from nfrt.batch import BatchBuffers
from nfrt.config import ModelConfig
from nfrt.errors import NfrtError
from nfrt.kvcache import KVCache
from nfrt.schedule_validate import GATHER_OPS  # the all-gather form's ops; TP only
from nfrt.tp import TPGroup
from nfrt.weights import Weights

DENSE_OPS = ("input_norm", "qkv_proj", "rope", "kv_append", "attn_decode", "attn_prefill", "o_proj",
             "post_norm", "gate_up", "silu_mul", "down")
MOE_OPS = DENSE_OPS[:8] + ("router", "expert_gate_up", "expert_silu_mul", "expert_down")
ALLREDUCE_OPS = ("attn_allreduce", "mlp_allreduce")  # tensor parallel only; no-ops at TP = 1
NETWORK_OPS = ALLREDUCE_OPS + ("attn_allgather", "o_allgather")  # the ops that run collectives
REDUCE_FORM_OPS = frozenset({"o_proj", "attn_allreduce"})  # tokens [gather_tokens, end)
DECODE_OPS = frozenset({"attn_decode"})
PREFILL_OPS = frozenset({"attn_prefill"})


def layer_ops(config: ModelConfig, networked: bool = False) -> tuple[str, ...]:
    """The ops of one layer in a valid sequential order (`networked`: with the TP all-reduces)."""
    ops = MOE_OPS if config.is_moe else DENSE_OPS
    if not networked:
        return ops
    return ops[:7] + ("attn_allreduce",) + ops[7:] + ("mlp_allreduce",)  # after o_proj, after the MLP


def _grouped_mm_native(x: torch.Tensor) -> bool:
    if x.device.type == "cpu":
        return hasattr(torch, "_grouped_mm")
    return (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


# NFRT_MOE_GEMM=triton: expert GEMMs of at most this many rows (token-expert pairs) run on the Triton
# grouped GEMM (nfrt.kernels.triton_grouped_gemm), larger ones on torch._grouped_mm. Measured on an
# H200 at mixtral's shapes: Triton 1.50-1.58x faster at 128 rows (it reads the weights at copy
# bandwidth), 1.10-1.30x at 512-1024, 0.77-1.05x from 1920 rows on (RESULTS.md, 2026-11-22 06:5x).
# Off by default: the shipped profiles timed torch._grouped_mm, and the search must see the kernel
# the runtime runs.
TRITON_MOE_MAX_ROWS = 1024


def moe_gemm_backend() -> str:
    """The MoE GEMM backend named by NFRT_MOE_GEMM: torch (the default) or triton; others raise."""
    name = os.environ.get("NFRT_MOE_GEMM", "torch").lower()
    if name not in ("torch", "triton"):
        raise NfrtError(f"NFRT_MOE_GEMM={name!r} is not one of torch, triton")
    return name


def _triton_grouped(x: torch.Tensor) -> bool:
    if not (x.is_cuda and x.dtype == torch.bfloat16 and x.shape[0] <= TRITON_MOE_MAX_ROWS):
        return False
    # Triton kernels load (and NFRT_KERNELS=reference does not turn them off)
    return moe_gemm_backend() == "triton" and bool(K.triton_kernels())


def grouped_mm(x: torch.Tensor, w_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [m, K] with rows grouped by expert, w_t [E, K, N], offs [E] int32 group ends -> [m, N]."""
    if _triton_grouped(x):
        from nfrt.kernels.triton_grouped_gemm import grouped_mm as triton_grouped_mm

        return triton_grouped_mm(x, w_t.transpose(1, 2), offs)  # w [E, N, K], strides as they are
    if _grouped_mm_native(x):
        return torch._grouped_mm(x, w_t, offs=offs)
    # Fallback (pre-Hopper or non-bf16 GPU): every expert over all rows, keep each row's own
    # expert. E times the FLOPs, but capturable; a Triton grouped GEMM would replace it.
    rows = torch.arange(x.shape[0], device=x.device)
    group = torch.searchsorted(offs.long(), rows, right=True)  # [m]
    out = torch.zeros(x.shape[0], w_t.shape[2], device=x.device, dtype=x.dtype)
    for e in range(w_t.shape[0]):
        out = torch.where((group == e)[:, None], x @ w_t[e], out)
    return out


class Model:
    """Weights, the KV cache and static activation buffers for up to `max_tokens` tokens."""

    def __init__(self, config: ModelConfig, weights: Weights, max_tokens: int, kv_cache: KVCache,
                 device: torch.device | str | None = None, tp: TPGroup | None = None,
                 gather_form: bool | None = None) -> None:
        """`config` is the shape this process runs: under tensor parallelism (`tp`) a rank's shard
        (`nfrt.tp.shard_config`) with `weights` sharded to match. `gather_form`: allocate the
        buffers of the all-gather form (default: iff the weights hold `layers.0.o_proj_col`)."""
        if max_tokens <= 0:
            raise NfrtError(f"model: max_tokens must be positive, got {max_tokens}")
        self.config = config
        self.w = weights
        self.kv = kv_cache
        self.max_tokens = max_tokens
        self.device = torch.device(device) if device is not None else weights["embed"].device
        self.dtype = weights["embed"].dtype
        c, t = config, max_tokens
        self.eps = c.rms_norm_eps
        self.scale = c.head_dim ** -0.5
        self.cos_sin = K.rope_cos_sin(c.max_position, c.head_dim, c.rope_theta, self.device)

        def buf(*shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
            return torch.zeros(shape, device=self.device, dtype=dtype or self.dtype)

        self.hidden = buf(t, c.hidden_size)  # h
        self.residual = buf(t, c.hidden_size)  # r
        self.normed = buf(t, c.hidden_size)
        self.qkv = buf(t, c.q_size + 2 * c.kv_size)  # [t, q | k | v]
        self.attn_out = buf(t, c.q_size)
        if c.is_moe:
            k = c.top_k
            self.router_logits = buf(t, c.num_experts)
            self.topk_weights = buf(t, k, dtype=torch.float32)
            self.topk_ids = buf(t, k, dtype=torch.int32)
            # Token-expert pairs in token order: row t*k + j is choice j of token t, so the
            # rows of a token range are contiguous whatever the grouping inside an op.
            self.moe_gate_up = buf(t * k, 2 * c.intermediate_size)
            self.moe_act = buf(t * k, c.intermediate_size)
        else:
            self.gate_up = buf(t, 2 * c.intermediate_size)
            self.act = buf(t, c.intermediate_size)
        self.batch: BatchBuffers | None = None
        self.tp = tp if tp is not None and tp.size > 1 else None
        # tokens [0, gather_tokens) take the all-gather form; the engine sets it per schedule
        self.gather_tokens = 0
        if gather_form is None:
            gather_form = "layers.0.o_proj_col" in weights
        self.gather_form = bool(gather_form) and self.tp is not None
        if self.gather_form:
            n = self.tp.size
            if c.hidden_size % n:
                raise NfrtError(f"model {c.name!r}: the all-gather form needs tp {n} to divide "
                                f"hidden_size {c.hidden_size}")
            # All-gather outputs must be contiguous: tokens [s, e) gather into rows [n*s, n*e),
            # rank-major ([n, e-s, width]), and are permuted into token-major rows afterwards.
            self.gather_attn = buf(n * t, c.q_size)  # [tp * tokens, q/tp]
            self.attn_full = buf(t, n * c.q_size)  # [tokens, q] (heads of rank 0, rank 1, ...)
            self.o_col = buf(t, c.hidden_size // n)  # [tokens, H/tp] this rank's O output columns
            self.gather_hidden = buf(n * t, c.hidden_size // n)  # [tp * tokens, H/tp]
        self.comm = None  # the process group of the stream issuing network ops (set by the engine)
        self.vocab_rows = weights["lm_head"].shape[0]  # vocab / tp (padded) under TP, else vocab
        self.sampled = buf(0, c.hidden_size)
        self.logits = buf(0, c.vocab_size)
        self.logits_local = buf(0, self.vocab_rows)
        self.logits_ranks = buf(0, self.vocab_rows)
        self._ops = {name: getattr(self, "_" + name) for name in set(DENSE_OPS + MOE_OPS)}
        self._ops.update(dict.fromkeys(ALLREDUCE_OPS, self._allreduce))
        self._ops.update({name: getattr(self, "_" + name) for name in GATHER_OPS})

    # ---- batch binding -------------------------------------------------------------------
    def bind(self, buffers: BatchBuffers) -> None:
        """Use `buffers` as the inputs of the following ops (sizes the sampled/logits buffers)."""
        if buffers.num_tokens > self.max_tokens:
            raise NfrtError(f"batch of {buffers.num_tokens} tokens exceeds the model's max_tokens "
                            f"{self.max_tokens}")
        self.batch = buffers
        s = buffers.shape.num_samples
        if self.logits.shape[0] != s:
            self.sampled = torch.zeros(s, self.config.hidden_size, device=self.device, dtype=self.dtype)
            self.logits = torch.zeros(s, self.config.vocab_size, device=self.device, dtype=self.dtype)
            if self.tp is not None:
                self.logits_local = torch.zeros(s, self.vocab_rows, device=self.device, dtype=self.dtype)
                self.logits_ranks = torch.zeros(self.tp.size * s, self.vocab_rows, device=self.device,
                                                dtype=self.dtype)

    def _b(self) -> BatchBuffers:
        if self.batch is None:
            raise NfrtError("model: no batch bound (call bind(buffers) first)")
        return self.batch

    # ---- whole-forward pieces ------------------------------------------------------------
    def embed(self) -> None:
        b = self._b()
        torch.index_select(self.w["embed"], 0, b.input_ids, out=self.hidden[: b.num_tokens])

    def tail(self) -> torch.Tensor:
        """Final residual add + norm on all tokens, LM head on the sample positions -> [samples, vocab]."""
        t = self._b().num_tokens
        K.fused_add_rms_norm(self.hidden[:t], self.residual[:t], self.w["final_norm"], self.eps,
                             self.normed[:t], False)
        torch.index_select(self.normed[:t], 0, self._b().sample_positions, out=self.sampled)
        if self.tp is None:
            torch.mm(self.sampled, self.w["lm_head"].t(), out=self.logits)
            return self.logits
        # Vocabulary-parallel head: each rank's [samples, vocab/tp] slice, gathered in rank order.
        torch.mm(self.sampled, self.w["lm_head"].t(), out=self.logits_local)
        self.tp.all_gather(self.logits_ranks, self.logits_local)  # [tp * samples, vocab/tp]
        s, v = self.sampled.shape[0], self.config.vocab_size
        full = self.logits_ranks.view(self.tp.size, s, self.vocab_rows).transpose(0, 1).reshape(s, -1)
        self.logits.copy_(full[:, :v])
        return self.logits

    def forward_sequential(self) -> torch.Tensor:
        """Every op of every layer in order on all tokens."""
        t = self._b().num_tokens
        self.gather_tokens = 0  # the standard layer
        self.embed()
        for layer in range(self.config.num_layers):
            for op in layer_ops(self.config, self.tp is not None):
                self.run_op(layer, op, 0, t)
        return self.tail()

    # ---- one op --------------------------------------------------------------------------
    def run_op(self, layer: int, op: str, start: int, end: int) -> None:
        b = self._b()
        fn = self._ops.get(op)
        if fn is None:
            valid = ", ".join(layer_ops(self.config) + ALLREDUCE_OPS + GATHER_OPS)
            raise NfrtError(f"model: unknown op {op!r}; valid: {valid}")
        if not 0 <= layer < self.config.num_layers:
            raise NfrtError(f"model: layer {layer} outside [0, {self.config.num_layers})")
        start, end = max(0, start), min(end, b.num_tokens)
        if op in DECODE_OPS:
            end = min(end, b.num_decode)
        elif op in PREFILL_OPS:
            start = max(start, b.num_decode)
        elif op in GATHER_OPS:
            if not self.gather_form:
                why = "tp is 1" if self.tp is None else "the model was not built for it (gather_form)"
                raise NfrtError(f"model: op {op} of the all-gather form cannot run: {why}")
            end = min(end, self.gather_tokens)
        elif op in REDUCE_FORM_OPS:
            start = max(start, self.gather_tokens)
        if start < end:
            fn(layer, start, end)

    def _lw(self, layer: int, name: str) -> torch.Tensor:
        key = f"layers.{layer}.{name}"
        if key not in self.w:
            raise NfrtError(f"model {self.config.name!r}: no weight {key} (op does not fit this model)")
        return self.w[key]

    def _q(self, s: int, e: int) -> torch.Tensor:
        return self.qkv[s:e, : self.config.q_size].view(e - s, self.config.num_heads, self.config.head_dim)

    def _kv(self, s: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        q, kv = c.q_size, c.kv_size
        k = self.qkv[s:e, q: q + kv].view(e - s, c.num_kv_heads, c.head_dim)
        v = self.qkv[s:e, q + kv:].view(e - s, c.num_kv_heads, c.head_dim)
        return k, v

    def _input_norm(self, layer: int, s: int, e: int) -> None:
        K.fused_add_rms_norm(self.hidden[s:e], self.residual[s:e], self._lw(layer, "input_norm"), self.eps,
                             self.normed[s:e], layer == 0)

    def _qkv_proj(self, layer: int, s: int, e: int) -> None:
        w = self._lw(layer, "qkv")
        if self.config.qkv_bias:
            torch.addmm(self._lw(layer, "qkv_bias"), self.normed[s:e], w.t(), out=self.qkv[s:e])
        else:
            torch.mm(self.normed[s:e], w.t(), out=self.qkv[s:e])

    def _rope(self, layer: int, s: int, e: int) -> None:
        k, _ = self._kv(s, e)
        K.rope(self._q(s, e), k, self._b().positions[s:e], self.cos_sin)

    def _kv_append(self, layer: int, s: int, e: int) -> None:
        k, v = self._kv(s, e)
        K.kv_append(k, v, self.kv.k[layer], self.kv.v[layer], self._b().slot_mapping[s:e])

    def _attn_decode(self, layer: int, s: int, e: int) -> None:
        b = self._b()
        out = self.attn_out[s:e].view(e - s, self.config.num_heads, self.config.head_dim)
        K.decode_attention(self._q(s, e), self.kv.k[layer], self.kv.v[layer], b.decode_page_table[s:e],
                           b.context_lens[s:e], self.scale, out)

    def _attn_prefill(self, layer: int, s: int, e: int) -> None:
        b = self._b()
        a, z = s - b.num_decode, e - b.num_decode  # rows of the prefill-token buffers
        out = self.attn_out[s:e].view(e - s, self.config.num_heads, self.config.head_dim)
        K.prefill_attention(self._q(s, e), self.kv.k[layer], self.kv.v[layer], b.prefill_page_table,
                            b.token_req[a:z], b.token_pos[a:z], self.scale, out)

    def _o_proj(self, layer: int, s: int, e: int) -> None:
        torch.mm(self.attn_out[s:e], self._lw(layer, "o_proj").t(), out=self.hidden[s:e])

    def _allreduce(self, layer: int, s: int, e: int) -> None:
        # hidden holds this rank's partial sums (row-parallel o_proj / down / experts); at TP = 1
        # there is nothing to reduce
        if self.tp is not None:
            self.tp.all_reduce(self.hidden[s:e], self.comm)

    # ---- the all-gather form of the attention output (TP only) -----------------------------
    def _attn_allgather(self, layer: int, s: int, e: int) -> None:
        # attn_out[s:e] [n, q/tp] of every rank -> gather_attn rows [tp*s, tp*e) as [tp, n, q/tp]
        r = self.tp.size
        self.tp.all_gather(self.gather_attn[r * s: r * e], self.attn_out[s:e], self.comm)

    def _o_proj_col(self, layer: int, s: int, e: int) -> None:
        n, r, q = e - s, self.tp.size, self.config.q_size
        ranks = self.gather_attn[r * s: r * e].view(r, n, q)  # [tp, n, q/tp]
        self.attn_full[s:e].view(n, r, q).copy_(ranks.transpose(0, 1))  # -> [n, tp, q/tp] = [n, q]
        # [n, q] @ [q, H/tp] -> [n, H/tp]: this rank's columns of the full O output
        torch.mm(self.attn_full[s:e], self._lw(layer, "o_proj_col").t(), out=self.o_col[s:e])

    def _o_allgather(self, layer: int, s: int, e: int) -> None:
        n, r = e - s, self.tp.size
        part = self.gather_hidden[r * s: r * e]  # [tp * n, H/tp]
        self.tp.all_gather(part, self.o_col[s:e], self.comm)
        self.hidden[s:e].view(n, r, -1).copy_(part.view(r, n, -1).transpose(0, 1))  # [n, H], whole sum

    def _post_norm(self, layer: int, s: int, e: int) -> None:
        K.fused_add_rms_norm(self.hidden[s:e], self.residual[s:e], self._lw(layer, "post_norm"), self.eps,
                             self.normed[s:e], False)

    def _gate_up(self, layer: int, s: int, e: int) -> None:
        torch.mm(self.normed[s:e], self._lw(layer, "gate_up").t(), out=self.gate_up[s:e])

    def _silu_mul(self, layer: int, s: int, e: int) -> None:
        K.silu_mul(self.gate_up[s:e], self.act[s:e])

    def _down(self, layer: int, s: int, e: int) -> None:
        torch.mm(self.act[s:e], self._lw(layer, "down").t(), out=self.hidden[s:e])

    # ---- mixture of experts --------------------------------------------------------------
    def _router(self, layer: int, s: int, e: int) -> None:
        torch.mm(self.normed[s:e], self._lw(layer, "router").t(), out=self.router_logits[s:e])
        K.moe_route(self.router_logits[s:e], self.config.top_k, self.topk_weights[s:e], self.topk_ids[s:e])

    def _expert_groups(self, s: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs of tokens [s, e) sorted by expert: (order [n*k] pair indices, offs [E] int32 group ends)."""
        ids = self.topk_ids[s:e].reshape(-1).long()
        order = torch.argsort(ids, stable=True)
        counts = torch.zeros(self.config.num_experts, dtype=torch.int64, device=ids.device)
        counts.scatter_add_(0, ids, torch.ones_like(ids))  # no bincount: it syncs on CUDA
        return order, counts.cumsum(0).to(torch.int32)

    def _expert_gate_up(self, layer: int, s: int, e: int) -> None:
        k = self.config.top_k
        order, offs = self._expert_groups(s, e)
        x = self.normed[s:e].index_select(0, order // k)  # [n*k, H], grouped by expert
        y = grouped_mm(x, self._lw(layer, "experts_gate_up").transpose(1, 2), offs)  # [n*k, 2I]
        self.moe_gate_up[s * k: e * k].index_copy_(0, order, y)

    def _expert_silu_mul(self, layer: int, s: int, e: int) -> None:
        k = self.config.top_k
        K.silu_mul(self.moe_gate_up[s * k: e * k], self.moe_act[s * k: e * k])

    def _expert_down(self, layer: int, s: int, e: int) -> None:
        k, n, h = self.config.top_k, e - s, self.config.hidden_size
        order, offs = self._expert_groups(s, e)
        x = self.moe_act[s * k: e * k].index_select(0, order)  # [n*k, I], grouped by expert
        y = grouped_mm(x, self._lw(layer, "experts_down").transpose(1, 2), offs)  # [n*k, H]
        y = y.float() * self.topk_weights[s:e].reshape(-1).index_select(0, order)[:, None]
        pairs = torch.empty(n * k, h, device=y.device, dtype=torch.float32).index_copy_(0, order, y)
        self.hidden[s:e].copy_(pairs.view(n, k, h).sum(1))  # weighted combine, no atomics
