"""Look at a dataset: counts, action statistics, and one frame with its reasoning drawn on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_vla.data.sample import Sample
from edge_vla.io import atomic_write_bytes


def summarize(path, cameras=("agentview", "wrist")) -> dict:
    from edge_vla.data.dataset import open_dataset

    ds = open_dataset(path, split="all", drop_noops=True, cameras=cameras)
    stats = ds.action_stats
    return {
        "path": str(path),
        "files": len(ds.files),
        "episodes": len(ds.all_episodes),
        "steps_recorded": ds.n_steps_recorded,
        "steps_kept": len(ds),
        "noop_steps_dropped": ds.n_steps_recorded - len(ds),
        "instructions": ds.instructions,
        "has_reasoning": ds.has_reasoning,
        "action_stats": {k: getattr(stats, k) for k in ("q01", "q99", "mean", "std", "min", "max")},
    }, ds


def draw_sample(sample: Sample, out_png: str | Path) -> Path:
    """PNG of the agentview frame (upscaled) with boxes, gripper track, subtask and move text."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    img = sample.images.get("agentview", next(iter(sample.images.values())))
    s = img.shape[0]
    r = sample.reasoning
    fig, ax = plt.subplots(figsize=(6.4, 7.6), dpi=100)
    # Pixel centres at integer coordinates, as the annotations are written.
    ax.imshow(img, extent=(-0.5, s - 0.5, s - 0.5, -0.5), interpolation="nearest")
    if r is not None:
        for name, (x1, y1, x2, y2) in r.visible_objects or []:
            ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1 + 1, y2 - y1 + 1, fill=False, lw=1.5, ec="yellow"))
            ax.text(x1 - 0.5, y1 - 1, name, color="yellow", fontsize=7, va="bottom",
                    bbox=dict(facecolor="black", alpha=0.5, pad=1, lw=0))
        if r.gripper:
            g = np.asarray(r.gripper, dtype=float)
            ax.plot(g[:, 0], g[:, 1], "-o", color="red", ms=3, lw=1.5)
            ax.plot(g[0, 0], g[0, 1], "o", color="lime", ms=7, mfc="none", mew=2)
        text = f"SUBTASK: {r.subtask}\nMOVE: {r.move}\n{(r.move_reason or '')[:90]}"
    else:
        text = "(no reasoning in this dataset)"
    ax.set_xlim(-0.5, s - 0.5)
    ax.set_ylim(s - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{sample.instruction}\n{sample.episode} step {sample.step}", fontsize=9)
    fig.text(0.03, 0.02, text, fontsize=9, family="monospace", va="bottom", wrap=True)
    fig.subplots_adjust(left=0.03, right=0.97, top=0.9, bottom=0.16)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(out_png, buf.getvalue())
    return Path(out_png)


__all__ = ["summarize", "draw_sample"]
