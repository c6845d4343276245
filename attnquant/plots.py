"""The benchmark's plots (matplotlib, an optional extra: pip install 'attnquant[plots]'):

    python -m attnquant.bench --sweep --block --json results.json --plots docs/img   # on the GPU
    python -m attnquant.plots results.json docs/img                                   # redraw anywhere

- sweep.png: TFLOP/s against sequence length, one panel per head dim, ours (fused FP8 out)
  next to FA4 and cuDNN SDPA (bf16 out);
- block.png: attention + o_proj per layer, each way of building it, one group of bars a shape.
"""

from __future__ import annotations

import json
import os
import sys


def draw(results: dict, folder: str) -> list:
    """PNGs of the tables in `results` (bench.RESULTS or its JSON) written to folder; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    device = results.get("device", "")
    written = []
    sweep = results.get("sweep")
    if sweep:
        fig, axes = plt.subplots(1, len(sweep), figsize=(4 * len(sweep), 3.6), sharey=True, squeeze=False)
        for ax, (dims, series) in zip(axes[0], sweep.items()):
            for label, style in (("ours fp8", "o-"), ("FA4 bf16", "s--"), ("SDPA bf16", "^:")):
                ax.plot(series["seqlen"], series[label], style, label=label)
            ax.set_xscale("log", base=2)
            ax.set_title(dims)
            ax.set_xlabel("sequence length (causal)")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("TFLOP/s")
        axes[0][0].legend()
        fig.suptitle(f"prefill, 16k tokens a call: attnquant fused FP8 out vs bf16 out peers ({device})")
        fig.tight_layout()
        written.append(_save(fig, folder, "sweep.png"))
    block = results.get("block")
    if block:
        labels = ["fused fp8", "fused grp", "ours+q", "FA4+q", "SDPA bf16"]
        fig, ax = plt.subplots(figsize=(9, 3.8))
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            ys = [row.get(label, float("nan")) for row in block.values()]
            ax.bar([x + i * width for x in range(len(block))], ys, width, label=label)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(block))], list(block))
        ax.set_ylabel("µs per layer (attention + o_proj)")
        ax.set_yscale("log")
        ax.legend(fontsize=8, ncol=len(labels))
        ax.set_title(f"attention + output projection ({device})")
        fig.tight_layout()
        written.append(_save(fig, folder, "block.png"))
    return written


def _save(fig, folder, name):
    path = os.path.join(folder, name)
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        print("\n".join(draw(json.load(f), sys.argv[2])))
