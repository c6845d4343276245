"""The Hopper (sm_90a) prefill forward in Gluon: warp-specialized, TMA + wgmma. This module is
the kernel's entry: it fixes the variant (`KernelConfig`), allocates the shared memory and the
barriers, and starts the partitions (FA3's structure):

- one producer warp (pipeline.py): picks the CTA's tiles from the persistent schedule
  (scheduler.py), hands their ids to the consumers, and loads Q and the K/V ring by TMA;
- NUM_CONSUMERS consumer warpgroups (consumer.py: 2, or 3 for large non-causal calls), each
  owning 64 query rows of every tile: the wgmmas, the online softmax (softmax.py) and the
  epilogue in the output format (epilogue.py).
Registers move from the producer (24) to the consumers (240 each with two, 160 with three).

A tile is BLOCK_M = NUM_CONSUMERS x 64 query rows of one (batch, query head) against that
head's KV head; the grid is persistent (one CTA per SM, config.schedule plans it on the host).
Keys are walked low to high; blocks from `n_full` on get the causal / sequence-end mask, the
others none.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier
from triton.language.core import _aggregate as aggregate

from ..constants import WG_ROWS
from .consumer import Splits, consumer
from .epilogue import Outputs, stash_strides, stash_strides_applies
from .pipeline import KVRing, Loads, QTiles, producer
from .scheduler import Schedule, TileIds


@aggregate
class KernelConfig:
    """The compiled variant, every field a constexpr (launch.py picks them): head dims (D = DA +
    DB, Dv = DV) and query heads per KV head; key block, K/V ring depth and consumer count;
    varlen / causal / ping-pong / LSE / sinks; the output format (the portable epilogue's
    constexprs); the schedule options; and what follows from them (BLOCK_M, whether the
    epilogue's strides wait in shared memory, the wgmma register layouts, the 16-bit dtype)."""

    GROUP: gl.constexpr
    DA: gl.constexpr
    DB: gl.constexpr
    DV: gl.constexpr
    BLOCK_N: gl.constexpr
    NUM_STAGES: gl.constexpr
    NUM_CONSUMERS: gl.constexpr
    VARLEN: gl.constexpr
    CAUSAL: gl.constexpr
    PINGPONG: gl.constexpr
    STORE_LSE: gl.constexpr
    HAS_SINKS: gl.constexpr
    OUT_KIND: gl.constexpr
    FP8_MAX: gl.constexpr
    GROUP_SIZE: gl.constexpr
    UE8M0: gl.constexpr
    TMA_STORE: gl.constexpr
    LAZY_RESCALE: gl.constexpr
    INTRA_OVERLAP: gl.constexpr
    SPLIT_TAIL: gl.constexpr
    BLOCK_M: gl.constexpr
    STASH_STRIDES: gl.constexpr
    S_LAYOUT: gl.constexpr  # a warpgroup's S = Q K^T accumulator (64 x BLOCK_N)
    O_LAYOUT: gl.constexpr  # its O accumulator (64 x DV)
    P_LAYOUT: gl.constexpr  # P as the PV wgmma's A operand, in registers
    DTYPE: gl.constexpr  # Q/K/V's 16-bit dtype, P's too

    @gluon.constexpr_function
    def __init__(self, GROUP, DA, DB, DV, BLOCK_N, NUM_STAGES, NUM_CONSUMERS, VARLEN, CAUSAL, PINGPONG, STORE_LSE,
                 HAS_SINKS, OUT_KIND, FP8_MAX, GROUP_SIZE, UE8M0, TMA_STORE, LAZY_RESCALE, INTRA_OVERLAP, SPLIT_TAIL,
                 DTYPE):
        for name, value in list(locals().items()):
            if name != "self":
                setattr(self, name, gl.constexpr(value.value if isinstance(value, gl.constexpr) else value))
        self.BLOCK_M = gl.constexpr(NUM_CONSUMERS * WG_ROWS)
        self.STASH_STRIDES = gl.constexpr(stash_strides_applies(NUM_CONSUMERS, OUT_KIND))
        self.S_LAYOUT = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                               instr_shape=[16, BLOCK_N, 16]))
        self.O_LAYOUT = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                               instr_shape=[16, DV, 16]))
        self.P_LAYOUT = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=self.O_LAYOUT.value, k_width=2))


@gluon.jit(do_not_specialize=["seqlen_q", "seqlen_k", "batch", "section", "split_from", "split_parts"])
def attn_fwd_ws_kernel(
    q_desc, qb_desc, k_desc, kb_desc, v_desc, o_desc, Out, Lse, OutScale, BlockScale, CuSeqlensQ, CuSeqlensK, TileCounter,
    Partials, Sinks, stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls,
    stride_bsb, stride_bss, stride_bsh, stride_bsg, stride_sink,
    seqlen_q, seqlen_k, batch, num_heads, section, split_from, split_parts, qk_scale,
    GROUP: gl.constexpr, DA: gl.constexpr, DB: gl.constexpr, DV: gl.constexpr,
    BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, NUM_CONSUMERS: gl.constexpr,
    VARLEN: gl.constexpr, CAUSAL: gl.constexpr, PINGPONG: gl.constexpr, STORE_LSE: gl.constexpr,
    HAS_SINKS: gl.constexpr,
    OUT_KIND: gl.constexpr, FP8_MAX: gl.constexpr, GROUP_SIZE: gl.constexpr, UE8M0: gl.constexpr,
    TMA_STORE: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
    LAZY_RESCALE: gl.constexpr = False, INTRA_OVERLAP: gl.constexpr = True,
    SPLIT_TAIL: gl.constexpr = False,
):
    """Grid: (number of CTAs,); seqlen_q / seqlen_k are the (max) lengths, `section` the
    batch*heads per L2 section, TileCounter int32 zeros: [0] counts the units handed out past
    the first grid's worth, [1 + slot] flags a partial result; the kernel leaves them zero again.
    A grid of one CTA per tile is the non-persistent kernel. SPLIT_TAIL: the tiles from
    split_from on run as split_parts units each, over shares of the keys, merged through
    Partials (fp32, a slot of 64 x (DV + 2) per warpgroup and part before the last)."""
    gl.static_assert(NUM_CONSUMERS == 2 or (NUM_CONSUMERS == 3 and not PINGPONG), "2 consumers, or 3 without ping-pong")
    gl.static_assert(INTRA_OVERLAP or (NUM_STAGES >= 2 and not PINGPONG), "INTRA_OVERLAP off: 2+ stages, no ping-pong")
    cfg = KernelConfig(GROUP, DA, DB, DV, BLOCK_N, NUM_STAGES, NUM_CONSUMERS, VARLEN, CAUSAL, PINGPONG, STORE_LSE,
                       HAS_SINKS, OUT_KIND, FP8_MAX, GROUP_SIZE, UE8M0, TMA_STORE, LAZY_RESCALE, INTRA_OVERLAP,
                       SPLIT_TAIL, q_desc.dtype)
    num_m = gl.cdiv(seqlen_q, cfg.BLOCK_M)
    num_bh = batch * num_heads
    num_units = num_m * num_bh
    if SPLIT_TAIL:
        num_units += (num_units - split_from) * (split_parts - 1)
    sched = Schedule(gl.program_id(0), gl.num_programs(0), num_units, num_m, num_bh, section, split_from, split_parts,
                     num_heads, seqlen_q, seqlen_k, CuSeqlensQ, CuSeqlensK)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [NUM_CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES] + k_desc.block_type.shape, k_desc.layout)
    if DB > 0:
        qb_smem = gl.allocate_shared_memory(qb_desc.dtype, [NUM_CONSUMERS] + qb_desc.block_type.shape,
                                            qb_desc.layout)
        kb_smem = gl.allocate_shared_memory(kb_desc.dtype, [NUM_STAGES] + kb_desc.block_type.shape,
                                            kb_desc.layout)
    else:  # unused
        qb_smem = q_smem
        kb_smem = k_smem
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [NUM_STAGES] + v_desc.block_type.shape, v_desc.layout)
    if TMA_STORE:  # one output tile per consumer warpgroup, staged for its TMA store
        o_smem = gl.allocate_shared_memory(o_desc.dtype, [NUM_CONSUMERS] + o_desc.block_type.shape, o_desc.layout)
    else:  # unused
        o_smem = v_smem
    q_bar = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    tile_ids = TileIds(gl.allocate_shared_memory(gl.int32, [1], gl.SwizzledSharedLayout(1, 1, 1, order=[0])))
    for i in gl.static_range(NUM_CONSUMERS):
        mbarrier.init(q_bar.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=NUM_CONSUMERS)
    fence_async_shared()

    strides = (stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls, stride_bsb, stride_bss, stride_bsh,
               stride_bsg, stride_sink)
    if cfg.STASH_STRIDES:
        strides = stash_strides(strides)
    qs = QTiles(q_smem, qb_smem, q_bar, q_empty)
    kv = KVRing(k_smem, kb_smem, v_smem, k_ready, v_ready, kv_empty)
    outs = Outputs(o_desc, o_smem, Out, Lse, OutScale, BlockScale, Sinks, strides)
    splits = Splits(Partials, TileCounter + 1)
    loads = Loads(q_desc, qb_desc, k_desc, kb_desc, v_desc)
    # The default partition (the kernel's 4 warps) is consumer 0; the other consumers are 4-warp
    # workers, the producer a 1-warp worker.
    args = (cfg, sched, tile_ids, qs, kv, outs, splits, qk_scale)
    work = (cfg, sched, tile_ids, loads, qs, kv, TileCounter)
    if NUM_CONSUMERS == 3:
        gl.warp_specialize([(consumer, (args, 0)), (consumer, (args, 1)), (consumer, (args, 2)), (producer, work)],
                           [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([(consumer, (args, 0)), (consumer, (args, 1)), (producer, work)],
                           [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
