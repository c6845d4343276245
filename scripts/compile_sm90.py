"""Compile the kernels ahead of time for Hopper (sm_90a) without a GPU, and report what
ptxas says about registers and spills (and, for the Gluon kernel, whether it serialized
the wgmmas: a silent 2x slowdown that would otherwise only show on the GPU).

    TRITON_INTERPRET=0 python scripts/compile_sm90.py [NAME ...] [--sass DIR]

Triton's interpreter (the CPU tests) never runs the real compiler, so a kernel that no
longer compiles would pass CI; tests/test_compile_sm90.py runs this script to catch that.
The spill report is also how the K/V address modes were chosen (docs/perf-notes.md).
"""

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import replace

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from attnquant.kernels.combine import combine_kernel
from attnquant.kernels.hopper.config import staging_fits, ws_config
from attnquant.kernels.hopper.kernel import attn_fwd_ws_kernel
from attnquant.kernels.portable.config import split_head_dim
from attnquant.kernels.portable.forward import attn_fwd_kernel

TARGET = GPUTarget("cuda", 90, 32)
NV_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
PTXAS = os.path.join(NV_BIN, "ptxas")
FP_ARGS = {"qk_scale", "softcap_in", "softcap_out"}


def signature(fn, pointers, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        else:
            sig[name] = "fp32" if name in FP_ARGS else "i32"
    return sig


def forward_variant(out="*bf16", kind=0, group_size=1, ue8m0=False, bs="*fp32", group=1, da=128, db=0, dv=128, bm=128, bn=64, warps=8, stages=3,
                    paged=False, page=1, block_ptr=False, varlen=False, window=(False, True), softcap=False,
                    kv="*bf16", sinks=False, aligned=True, f16_dots=False, pdl=False):
    """The portable forward for these constexprs; `aligned`: its pointers and its q/k/v/out
    strides marked divisible by 16, as Triton specializes a real call with aligned tensors and
    strides (without it, loads compile to per-element instructions and unpipelined shared
    memory, which a real call does not run)."""
    ptrs = {"Q": "*bf16", "K": kv, "V": kv, "Out": out, "Lse": "*fp32", "OutScale": "*fp32",
            "BlockScale": bs, "BlockTable": "*i32", "CuSeqlensQ": "*i32", "CuSeqlensK": "*i32", "SeqUsedK": "*i32",
            "Sinks": "*fp32", "QDescale": "*fp32", "KDescale": "*fp32", "VDescale": "*fp32"}
    c = dict(GROUP=group, DV=dv, BLOCK_M=bm, BLOCK_N=bn, BLOCK_DA=da, BLOCK_DB=db, BLOCK_DV=dv,
             VARLEN_Q=varlen, VARLEN_K=varlen, HAS_SEQUSED=paged, PAGED=paged, PAGE_SIZE=page, BLOCK_PTR=block_ptr,
             F16_DOTS=f16_dots, LAUNCH_DEPENDENTS=pdl, WINDOW_LEFT=window[0], WINDOW_RIGHT=window[1], HAS_SOFTCAP=softcap, HAS_SINKS=sinks,
             HAS_Q_DESCALE=False, HAS_K_DESCALE=kv != "*bf16", HAS_V_DESCALE=kv != "*bf16", STORE_LSE=True,
             OUT_KIND=kind, FP8_MAX=448.0 if kind else 0.0, ROUND_MANT=3, ROUND_EMIN=-6, EMULATE_ROUNDING=False,
             GROUP_SIZE=group_size, UE8M0=ue8m0)
    attrs = {}
    if aligned:
        names = attn_fwd_kernel.arg_names
        wide = [n for n in names if n in ptrs or n.startswith(("stride_q", "stride_k", "stride_v", "stride_o"))
                and not n.startswith(("stride_kd", "stride_vd", "stride_qd"))]
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in wide}
    src = ASTSource(fn=attn_fwd_kernel, signature=signature(attn_fwd_kernel, ptrs, c), constexprs=c, attrs=attrs)
    return src, dict(num_warps=warps, num_stages=stages)


def combine_variant(out="*fp8e4nv", kind=1, group_size=1, ue8m0=False, parts="*fp32", suffix=False, bs="*fp32",
                    pdl=False):
    ptrs = {"OPart": parts, "LsePart": "*fp32", "OSuffix": parts, "LseSuffix": "*fp32", "Out": out, "Lse": "*fp32",
            "OutScale": "*fp32", "BlockScale": bs, "Sinks": "*fp32"}
    c = dict(DV=128, BLOCK_R=16, BLOCK_DV=128, HAS_SUFFIX=suffix, HAS_SINKS=not suffix, STORE_LSE=True, WAIT_PRIOR=pdl, OUT_KIND=kind, FP8_MAX=448.0, ROUND_MANT=3, ROUND_EMIN=-6,
             EMULATE_ROUNDING=False, GROUP_SIZE=group_size, UE8M0=ue8m0)
    return ASTSource(fn=combine_kernel, signature=signature(combine_kernel, ptrs, c), constexprs=c), \
        dict(num_warps=4, **({"launch_pdl": True} if pdl else {}))


def gluon_variant(out="*fp8e4nv", kind=1, group_size=1, d=128, dv=128, group=1, varlen=False, causal=True,
                  pingpong=None, tma_store=True, lazy_rescale=None, split_tail=False, sinks=False, ones=(), **config):
    """The Hopper Gluon kernel with the tile config the launcher picks for (d, dv) (ping-pong
    as it says unless `pingpong` is given; the TMA-store epilogue if `tma_store` and its
    staging buffer fits, as in launch.tma_store_applies); `config`: WsConfig fields to change
    (consumers=3 starts from the 3-consumer config ws_config picks); `ones`: int arguments
    equal to 1, which Triton makes constexprs."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    cfg = replace(ws_config(d, dv, consumers=config.get("consumers", 2)), **config)
    da, db = split_head_dim(d)

    def desc(rows, cols, dtype="bf16"):
        gl_dtype = {"bf16": gl.bfloat16, "fp8e4nv": gl.float8e4nv, "fp8e5": gl.float8e5, "u8": gl.uint8}[dtype]
        layout = gl.NVMMASharedLayout.get_default_for([rows, cols], gl_dtype)
        return f"tensordesc<{dtype}[{rows}, {cols}],{layout!r}>"

    row_bytes = {"*bf16": 2 * dv, "*fp16": 2 * dv, "*u8": dv // 2}.get(out, dv)  # (u8: NVFP4's packed codes)
    tma_store = tma_store and staging_fits(d, dv, cfg, row_bytes)

    c = dict(GROUP=group, DA=da, DB=db, DV=dv, BLOCK_N=cfg.block_n, NUM_STAGES=cfg.num_stages, NUM_CONSUMERS=cfg.consumers, VARLEN=varlen,
             CAUSAL=causal, PINGPONG=cfg.pingpong if pingpong is None else pingpong, STORE_LSE=True, HAS_SINKS=sinks,
             OUT_KIND=kind, FP8_MAX=448.0 if kind else 0.0,
             GROUP_SIZE=group_size, UE8M0=kind == 2, TMA_STORE=tma_store, CONSUMER_REGS=cfg.registers()[1],
             PRODUCER_REGS=cfg.producer_regs,
             LAZY_RESCALE=cfg.lazy_rescale if lazy_rescale is None else lazy_rescale, INTRA_OVERLAP=cfg.intra_overlap, SPLIT_TAIL=split_tail,
             **{name: 1 for name in ones})
    ptrs = {"q_desc": desc(64, da), "qb_desc": desc(64, db or da), "k_desc": desc(cfg.block_n, da),
            "kb_desc": desc(cfg.block_n, db or da), "v_desc": desc(cfg.block_n, dv),
            "o_desc": desc(64, row_bytes // (2 if out in ("*bf16", "*fp16") else 1), out[1:]) if tma_store
            else desc(cfg.block_n, dv), "Out": out, "Lse": "*fp32",
            "OutScale": "*fp32", "BlockScale": "*fp8e4nv" if kind == 3 else "*fp32", "CuSeqlensQ": "*i32",
            "CuSeqlensK": "*i32", "TileCounter": "*i32", "Partials": "*fp32", "Sinks": "*fp32"}
    src = GluonASTSource(fn=attn_fwd_ws_kernel, signature=signature(attn_fwd_ws_kernel, ptrs, c), constexprs=c)
    return src, dict(num_warps=4, maxnreg=cfg.registers()[0])


VARIANTS = {
    "prefill d128 causal, fp8 out": forward_variant(out="*fp8e4nv", kind=1),
    "prefill d128 causal, group fp8 (G=64, ue8m0)": forward_variant(out="*fp8e4nv", kind=2, group_size=64,
                                                                    ue8m0=True),
    "prefill d192-128 mqa (two dots), bf16 out": forward_variant(group=16, db=64),
    "varlen d64 window+softcap, e5m2 out": forward_variant(out="*fp8e5", kind=1, da=64, dv=64, varlen=True,
                                                           window=(True, True), softcap=True),
    "decode 16-row tile, block pointers": forward_variant(out="*fp32", group=16, bm=16, bn=128, warps=4,
                                                          block_ptr=True),
    "decode paged, page 16 (gather)": forward_variant(out="*fp32", group=16, bm=16, bn=128, warps=4, paged=True,
                                                      page=16),
    "decode paged, page 64 (block pointers)": forward_variant(out="*fp32", group=16, bm=16, bn=64, warps=4,
                                                              stages=5, paged=True, page=64, block_ptr=True),
    "decode fp8 kv cache, paged page 64, sinks, fp8 out": forward_variant(
        out="*fp8e4nv", kind=1, group=8, bm=16, bn=128, warps=4, stages=5, block_ptr=True, kv="*fp8e4nv", sinks=True),
    # the contiguous FP8 cache's decode tile (5 stages: 139 KB, one CTA an SM), and the 3-stage
    # candidate (74 KB, three; lab_bench --fp8-kv-sweep times it)
    "decode fp8 kv cache, contiguous, 5 stages, fp8 out": forward_variant(
        out="*fp8e4nv", kind=1, group=16, bm=16, bn=128, warps=4, stages=5, block_ptr=True, kv="*fp8e4nv"),
    "decode fp8 kv cache, contiguous, 3 stages (candidate), fp8 out": forward_variant(
        out="*fp8e4nv", kind=1, group=16, bm=16, bn=128, warps=4, stages=3, block_ptr=True, kv="*fp8e4nv"),
    "decode fp8 kv cache, paged page 16 (gather, 5 stages), fp8 out": forward_variant(
        out="*fp8e4nv", kind=1, group=16, bm=16, bn=128, warps=4, stages=5, paged=True, page=16, kv="*fp8e4nv"),
    # the fp16-dot candidates (FwdConfig.f16_dots): the same tiles, fewer conversions
    "decode fp8 kv cache, contiguous, 3 stages, fp16 dots (candidate), fp8 out": forward_variant(
        out="*fp8e4nv", kind=1, group=16, bm=16, bn=128, warps=4, stages=3, block_ptr=True, kv="*fp8e4nv",
        f16_dots=True),
    "decode fp8 kv cache, paged page 16 (gather, 5 stages), fp16 dots (candidate), fp8 out": forward_variant(
        out="*fp8e4nv", kind=1, group=16, bm=16, bn=128, warps=4, stages=5, paged=True, page=16, kv="*fp8e4nv",
        f16_dots=True),
    # the PDL candidate (FwdConfig.pdl): the split decode's forward triggers its combine, which waits
    "decode 16-row tile, split, PDL trigger (candidate)": forward_variant(out="*fp32", group=16, bm=16, bn=128,
                                                                         warps=4, block_ptr=True, pdl=True),
    "split combine, fp8 out, PDL wait (candidate)": combine_variant(pdl=True),
    "split combine, fp8 out": combine_variant(),
    "split combine, group fp8 (G=128)": combine_variant(kind=2, group_size=128),
    "split combine, nvfp4": combine_variant(out="*u8", kind=3, group_size=16, bs="*fp8e4nv"),
    "prefill d128 gqa, nvfp4 out": forward_variant(out="*u8", kind=3, group_size=16, bs="*fp8e4nv", group=4),
    "merge_attn_states, bf16 parts, fp8 out": combine_variant(parts="*bf16", suffix=True),
    "gluon d128 causal, fp8 out": gluon_variant(),
    "gluon d64 gqa (gpt-oss), sinks, fp8 out": gluon_variant(d=64, dv=64, group=8, sinks=True),
    # a d=64 candidate (lab_bench --configs): FA3's 192-row tiles, three consumers, 128-key blocks
    "gluon d64 causal gqa, 3 consumers, 128-key blocks (candidate), fp8 out": gluon_variant(
        d=64, dv=64, group=4, consumers=3, block_n=128, intra_overlap=True, auto_consumers=False),
    "gluon d192-128 mqa, group fp8 (G=128)": gluon_variant(kind=2, group_size=128, d=192, group=16),
    "gluon d64 varlen non-causal, bf16 out": gluon_variant(out="*bf16", kind=0, d=64, dv=64, varlen=True,
                                                           causal=False),
    "gluon d256 gqa, e5m2 out": gluon_variant(out="*fp8e5", d=256, dv=256, group=4),
    "gluon d128 non-causal, one query head (a constexpr num_heads), last wave split": gluon_variant(
        causal=False, consumers=3, block_n=128, num_stages=2, intra_overlap=False, split_tail=True, ones=("num_heads",)),
    "gluon d128 gqa, nvfp4 out": gluon_variant(out="*u8", kind=3, group_size=16, group=4),
    "gluon d192-128 mqa, nvfp4 out": gluon_variant(out="*u8", kind=3, group_size=16, d=192, group=16),
    "gluon d128 gqa ping-pong, bf16 register stores, every O rescale": gluon_variant(
        out="*bf16", kind=0, group=4, pingpong=True, tma_store=False, lazy_rescale=False),
    "gluon d32 mha, bf16 out (16-value rescale blocks)": gluon_variant(out="*bf16", kind=0, d=32, dv=32),
    "gluon d192-128 mqa, 3 consumers x 64 rows, fp8 out": gluon_variant(d=192, group=16, consumers=3),
    "gluon d128 non-causal, 3 consumers, serial 128-key blocks, fp8 out": gluon_variant(
        causal=False, consumers=3, block_n=128, num_stages=2, intra_overlap=False),
    "gluon d128 non-causal, 3 consumers, serial, last wave split, fp8 out": gluon_variant(
        causal=False, consumers=3, block_n=128, num_stages=2, intra_overlap=False, split_tail=True),
    # the benchmark's per-group and bf16 calls on that path: their epilogue's strides once spilled
    # the loop
    "gluon d128 non-causal, 3 consumers, serial, last wave split, group fp8 (G=128)": gluon_variant(
        kind=2, group_size=128, causal=False, consumers=3, block_n=128, num_stages=2, intra_overlap=False,
        split_tail=True),
    "gluon d128 non-causal, 3 consumers, serial, last wave split, bf16 out": gluon_variant(
        out="*bf16", kind=0, causal=False, consumers=3, block_n=128, num_stages=2, intra_overlap=False,
        split_tail=True),
    "gluon d192-128 mqa non-causal, last wave split, group fp8 (G=64)": gluon_variant(
        kind=2, group_size=64, d=192, group=16, causal=False, split_tail=True),
}


def ptxas_report(ptx: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        r = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", path, "-o", os.devnull], capture_output=True,
                           text=True)
    return " | ".join(line.split("info    :")[-1].strip() for line in r.stderr.splitlines()
                      if "registers" in line or "spill" in line or "serialized" in line)


def sass_text(cubin: bytes) -> str:
    """cuobjdump's SASS listing of a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([os.path.join(NV_BIN, "cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout


def _is_wgmma(ins: str) -> bool:
    return "HGMMA" in ins or "QGMMA" in ins


def wgmma_loops(sass: str):
    """The innermost loops that issue wgmmas (HGMMA: 16-bit operands, QGMMA: FP8), as (first
    address, last address, their instructions), in address order."""
    code = [(int(m.group(1), 16), m.group(2).strip())
            for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    # loop back edges: predicated backward branches (the unconditional ones jump back from
    # out-of-line mbarrier retry code)
    loops = [(int(m.group(1), 16), addr) for addr, ins in code
             if (m := re.match(r"@!?U?P\d\s+BRA (?:`\()?0x([0-9a-f]+)", ins)) and int(m.group(1), 16) <= addr]
    with_mma = [(lo, hi) for lo, hi in loops if any(lo <= a <= hi and _is_wgmma(i) for a, i in code)]
    innermost = sorted((lo, hi) for lo, hi in with_mma
                       if not any((lo, hi) != (a, b) and lo <= a and b <= hi for a, b in with_mma))
    return [(lo, hi, [i for a, i in code if lo <= a <= hi]) for lo, hi in innermost]


def is_masked(body) -> bool:
    """A masked loop (the causal diagonal, the ragged end of the keys) is told by its mask: 32 or
    more FSELs of -inf."""
    return sum(1 for i in body if i.startswith("FSEL") and "-INF" in i) >= 32


def wgmma_loop_spills(cubin: bytes):
    """Local-memory loads/stores (spills) inside the innermost loops that issue wgmmas (SASS):
    (in the unmasked loops, in the masked ones).

    The persistent Gluon kernel keeps a few kernel-wide values (strides, schedule scalars)
    on the stack across the warpgroups' register reallocation and reloads them once per
    tile; that costs nothing. A spill inside a K/V loop would cost every block."""
    spills = [0, 0]
    for _, _, body in wgmma_loops(sass_text(cubin)):
        spills[is_masked(body)] += sum(1 for i in body if re.match(r"(@\S+\s+)?(LDL|STL)", i))
    return tuple(spills)


def normalized_sass(cubin: bytes) -> str:
    """The SASS instructions alone (no addresses, encodings or comments): what two builds of a
    kernel that compile to the same code share, line for line."""
    return "\n".join(m.group(1).strip() for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+([^;]*);", sass_text(cubin)))


def main(names=None, sass_dir=None):
    """Compile VARIANTS (those whose names contain one of `names`); with `sass_dir`, write each
    one's normalized SASS there (variant.sass) for a diff against another version's."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("run with TRITON_INTERPRET=0: the interpreter replaces the compiler")
    for name, (src, opts) in VARIANTS.items():
        if names and not any(n in name for n in names):
            continue
        k = triton.compile(src, target=TARGET, options=opts)
        assert k.asm["cubin"], name
        if sass_dir:
            os.makedirs(sass_dir, exist_ok=True)
            fname = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") + ".sass"
            with open(os.path.join(sass_dir, fname), "w") as f:
                f.write(normalized_sass(k.asm["cubin"]))
        extra = ""
        if name.startswith("gluon"):
            unmasked, masked = wgmma_loop_spills(k.asm["cubin"])
            extra = f" | wgmma-loop spills {unmasked}, masked-loop spills {masked}"
        print(f"{name:<45} smem {k.metadata.shared:6d} B  {ptxas_report(k.asm['ptx'])}{extra}", flush=True)
    if not names:
        print(f"variants: {len(VARIANTS)}")


if __name__ == "__main__":
    args = sys.argv[1:]
    sass = None
    if "--sass" in args:  # --sass DIR: also write each variant's normalized SASS to DIR
        i = args.index("--sass")
        sass = args[i + 1]
        args = args[:i] + args[i + 2:]
    main(args, sass)
