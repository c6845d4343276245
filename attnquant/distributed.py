"""Context parallelism over torch.distributed: one attention split across ranks along the
sequence, its partial results merged by their LSEs in float32, and the output format applied
once, after the last merge (FP8 / NVFP4 partials could not be merged: vLLM's reason for not
fusing the quantization under DCP).

- `context_parallel_attention` (prefill, ring attention): every rank holds a shard of q, k and
  v; the K/V shards travel around the ring (isend / irecv of the next shard overlapped with
  attention on the one in hand). Shards are zig-zag by default: the sequence cut into 2W
  equal chunks, rank r holding chunks r and 2W-1-r, so that causal work is even across ranks
  (`zigzag_shard` / `zigzag_unshard`); or contiguous with any lengths (`shard_lens`).
- `dcp_decode` (decode context parallelism): every rank holds the cache tokens t with
  t % W == r (vLLM's interleaved DCP layout, `interleave_kv_cache`); each attends its part,
  the LSEs are all-gathered, each rank rescales its partial and an all-reduce sums them.

Both return every rank's output for its own queries (prefill: its shard; decode: the whole
batch) and, when asked, the LSE in the forward functions' layout. They read no tensor on the
host (CUDA-graph safe with NCCL; gloo on the CPU runs the interpreter kernels). Engine:
torch.distributed, any backend with point-to-point ops and all_gather / all_reduce. gloo moves
CPU memory only (its send of a CUDA tensor fails with EFAULT): with gloo, CUDA tensors travel
through host copies, which synchronize: a path for checking on a one-GPU machine, not a fast one.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .api import flash_attn_func, flash_attn_with_kvcache, merge_attn_states

Segment = Tuple[int, int, int]  # (global start, length, local offset) of a run of a shard's tokens


def zigzag_shard(x: torch.Tensor, world: int, rank: int, dim: int = 1) -> torch.Tensor:
    """Rank `rank`'s zig-zag shard of x along `dim` (length divisible by 2 * world): chunks rank
    and 2 * world - 1 - rank of 2 * world, concatenated."""
    chunks = x.chunk(2 * world, dim)
    if x.shape[dim] % (2 * world):
        raise ValueError(f"a zig-zag shard needs the length {x.shape[dim]} divisible by 2 x world = {2 * world}")
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim)


def zigzag_unshard(shards: Sequence[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """The whole sequence from every rank's zig-zag shard (in rank order)."""
    world = len(shards)
    halves = [s.chunk(2, dim) for s in shards]
    return torch.cat([halves[r][0] for r in range(world)] + [halves[r][1] for r in reversed(range(world))], dim)


def interleave_kv_cache(cache: torch.Tensor, seqlens: torch.Tensor, world: int, rank: int):
    """Rank `rank`'s part of a (B, S, Hkv, D) cache in vLLM's interleaved DCP layout (token t on
    rank t % world) and its per-sequence lengths."""
    local = cache[:, rank::world].contiguous()
    lens = ((seqlens - rank + world - 1).div(world, rounding_mode="floor")).clamp_min(0).to(torch.int32)
    return local, lens


def _group_info(group) -> Tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def _via_host(group, device: torch.device) -> bool:
    """Whether this group's transport needs CUDA tensors copied to the host (gloo)."""
    return device.type == "cuda" and dist.get_backend(group) == dist.Backend.GLOO


def _all_gather_into(out: torch.Tensor, t: torch.Tensor, group, host: bool) -> torch.Tensor:
    if not host:
        dist.all_gather_into_tensor(out, t, group=group)
        return out
    staged = out.cpu()
    dist.all_gather_into_tensor(staged, t.cpu(), group=group)
    return staged.to(out.device)


def _all_reduce(t: torch.Tensor, group, host: bool) -> torch.Tensor:
    if not host:
        dist.all_reduce(t, group=group)
        return t
    staged = t.cpu()
    dist.all_reduce(staged, group=group)
    return staged.to(t.device)


def _segments(world: int, layout: str, shard_lens: Optional[Sequence[int]], local_len: int) -> List[List[Segment]]:
    """Each rank's runs of global positions."""
    if layout == "zigzag":
        c = local_len // 2
        return [[(r * c, c, 0), ((2 * world - 1 - r) * c, c, c)] for r in range(world)]
    lens = list(shard_lens) if shard_lens is not None else [local_len] * world
    starts = [sum(lens[:r]) for r in range(world)]
    return [[(starts[r], lens[r], 0)] for r in range(world)]


def _merge_into(acc_o, acc_lse, o, lse):
    """acc <- the LSE merge of acc and (o, lse), in float32 (views: (B, L, H, Dv), (B, H, L)).
    A side with LSE -inf (no key) has weight 0, a row neither side saw stays 0 with LSE -inf,
    and a NaN LSE makes the row NaN."""
    new = torch.logaddexp(acc_lse, lse)
    ref = torch.where(new == float("-inf"), 0.0, new)  # (both empty: exp(-inf - 0) = 0, not NaN)
    w_acc = torch.exp(acc_lse - ref).transpose(1, 2)[..., None]
    w_new = torch.exp(lse - ref).transpose(1, 2)[..., None]
    acc_o.copy_(acc_o * w_acc + o * w_new)
    acc_lse.copy_(new)


def _apply_format(o: torch.Tensor, lse: torch.Tensor, plain_dtype, return_lse, out_dtype, output_scale,
                  output_block_scale, ue8m0):
    """The output format, once: a merge of the float32 result (B, L, H, Dv) with an empty
    partial (LSE -inf) through merge_attn_states' epilogue."""
    b, length, h, dv = o.shape
    flat = o.reshape(b * length, h, dv)
    lse_t = lse.permute(1, 0, 2).reshape(h, b * length)
    if out_dtype is None and output_scale is None and output_block_scale is None:
        out_dtype = plain_dtype
    bs = output_block_scale
    if bs is not None and bs.dim() >= 2 and bs.dtype == torch.float32:  # per-group scales (B, L, ...) -> tokens
        bs = bs.view(b * length, *bs.shape[2:])
    out, lse_out = merge_attn_states(flat, lse_t, flat, torch.full_like(lse_t, float("-inf")), return_lse=return_lse,
                                     out_dtype=out_dtype, output_scale=output_scale, output_block_scale=bs,
                                     ue8m0=ue8m0)
    out = out.view(b, length, *out.shape[1:])
    if lse_out is not None:
        lse_out = lse_out.view(h, b, length).permute(1, 0, 2)
    return out, lse_out


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, *, causal: bool = False,
                               softmax_scale: Optional[float] = None, softcap: float = 0.0, layout: str = "zigzag",
                               shard_lens: Optional[Sequence[int]] = None, return_lse: bool = False,
                               out_dtype=None, output_scale=None, output_block_scale=None, ue8m0: bool = False,
                               backend: Optional[str] = None):
    """Ring attention over the ranks of `group` (default: the world). q (B, L, H, D), k / v
    (B, L, Hkv, *): this rank's shard in `layout` ('zigzag': 2 chunks of L / 2 of the 2W; or
    'contiguous': one run, shard_lens[r] tokens on rank r, default all equal, 0 allowed).
    Output format arguments as the forward functions' (docs/spec.md), applied once at the end.
    Returns (out (B, L, H, Dv) in that format, LSE (B, H, L) or None)."""
    world, rank = _group_info(group)
    if layout not in ("zigzag", "contiguous"):
        raise ValueError(f"layout must be 'zigzag' or 'contiguous', got {layout!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a (B, L, heads, head_dim) tensor")
    if k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"q, k and v must hold the same tokens (B, L): q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if layout == "zigzag" and (shard_lens is not None or q.shape[1] % 2):
        raise ValueError("a zig-zag shard has an even length and no shard_lens (use layout='contiguous')")
    if shard_lens is not None and (len(shard_lens) != world or shard_lens[rank] != q.shape[1]):
        raise ValueError(f"shard_lens must give the {world} ranks' lengths, this rank's {q.shape[1]} among them")
    b, length, h, _ = q.shape
    dv = v.shape[-1]
    segments = _segments(world, layout, shard_lens, length)
    acc_o = torch.zeros(b, length, h, dv, device=q.device, dtype=torch.float32)
    acc_lse = torch.full((b, h, length), float("-inf"), device=q.device, dtype=torch.float32)
    lens = [sum(n for _, n, _ in segments[r]) for r in range(world)]
    k_cur, v_cur = k, v
    host = _via_host(group, k.device)
    wire = torch.device("cpu") if host else k.device  # where the shards in flight live
    prev, nxt = (rank - 1) % world, (rank + 1) % world
    peer = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))  # noqa: E731
    for step in range(world):
        src = (rank - step) % world
        reqs, k_next, v_next, sending = [], None, None, ()
        if step + 1 < world:  # the next shard travels while this one is attended
            incoming = lens[(rank - step - 1) % world]
            k_next = torch.empty(b, incoming, *k.shape[2:], device=wire, dtype=k.dtype)
            v_next = torch.empty(b, incoming, *v.shape[2:], device=wire, dtype=v.dtype)
            sending = (k_cur.to(wire).contiguous(), v_cur.to(wire).contiguous()) if lens[src] else ()
            ops = [dist.P2POp(dist.isend, t, peer(nxt), group) for t in sending]
            if incoming:
                ops += [dist.P2POp(dist.irecv, t, peer(prev), group) for t in (k_next, v_next)]
            reqs = dist.batch_isend_irecv(ops) if ops else []
        _attend_shard(q, k_cur, v_cur, segments[rank], segments[src], causal, softmax_scale, softcap, backend,
                      acc_o, acc_lse)
        for req in reqs:
            req.wait()
        if step + 1 < world:
            k_cur, v_cur = k_next.to(k.device), v_next.to(v.device)
    plain = torch.bfloat16 if q.dtype == torch.float8_e4m3fn else q.dtype
    return _apply_format(acc_o, acc_lse, plain, return_lse, out_dtype, output_scale, output_block_scale, ue8m0)


def _attend_shard(q, k, v, q_segments, kv_segments, causal, softmax_scale, softcap, backend, acc_o, acc_lse):
    """This rank's queries against one K/V shard, merged into the accumulators. Causal: a run of
    keys wholly before a run of queries is attended in full, the same run (the diagonal) with
    the causal mask, a later one not at all (runs are equal or disjoint)."""
    if not causal:  # every query sees every key: one call
        q_segments = [(0, q.shape[1], 0)]
        kv_segments = [(0, k.shape[1], 0)]
    for q_start, q_len, q_off in q_segments:
        if q_len == 0:
            continue
        qs = q[:, q_off:q_off + q_len]
        full = [(off, n) for start, n, off in kv_segments if n and (not causal or start + n <= q_start)]
        diag = [(off, n) for start, n, off in kv_segments if n and causal and start == q_start]
        runs = [(full, False), (diag, True)]
        if len(full) == 2 and full[0][0] + full[0][1] == full[1][0]:  # adjacent in memory: one call
            runs = [([(full[0][0], full[0][1] + full[1][1])], False), (diag, True)]
        for spans, is_causal in runs:
            for off, n in spans:
                o, lse = flash_attn_func(qs, k[:, off:off + n], v[:, off:off + n], softmax_scale=softmax_scale,
                                         causal=is_causal, softcap=softcap, return_lse=True, out_dtype=torch.float32,
                                         backend=backend)
                _merge_into(acc_o[:, q_off:q_off + q_len], acc_lse[:, :, q_off:q_off + q_len], o, lse)


def dcp_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor, group=None,
               *, block_table: Optional[torch.Tensor] = None, softmax_scale: Optional[float] = None,
               softcap: float = 0.0, return_lse: bool = False, out_dtype=None, output_scale=None,
               output_block_scale=None, ue8m0: bool = False, k_descale=None, v_descale=None,
               backend: Optional[str] = None):
    """Decode with the KV cache sharded along the sequence over `group`'s ranks (this rank's
    cache part and its per-sequence lengths, any layout whose union is the sequence: vLLM's
    interleaved one is `interleave_kv_cache`; contiguous or paged caches as
    flash_attn_with_kvcache takes them, FP8 caches with their descales). q (B, Sq, H, D), the
    same on every rank; every query sees every key (no causal mask: the shards' positions
    interleave). Returns the merged output for the whole batch on every rank, in the output
    format given (applied once), and the LSE (B, H, Sq) when asked."""
    world, _ = _group_info(group)
    o, lse = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens, block_table=block_table,
                                     softmax_scale=softmax_scale, causal=False, softcap=softcap, return_lse=True,
                                     out_dtype=torch.float32, k_descale=k_descale, v_descale=v_descale,
                                     backend=backend)
    lses = torch.empty(world * lse.shape[0], *lse.shape[1:], device=lse.device, dtype=lse.dtype)
    host = _via_host(group, lse.device)
    lses = _all_gather_into(lses, lse.contiguous(), group, host)  # (ranks concatenated along dim 0)
    total = torch.logsumexp(lses.view(world, *lse.shape), 0)
    weight = torch.exp(lse - torch.where(total == float("-inf"), 0.0, total))  # (NaN anywhere: NaN everywhere)
    o = (o * weight.transpose(1, 2)[..., None]).contiguous()
    o = _all_reduce(o, group, host)
    plain = torch.bfloat16 if q.dtype == torch.float8_e4m3fn else q.dtype
    return _apply_format(o, total, plain, return_lse, out_dtype, output_scale, output_block_scale, ue8m0)
