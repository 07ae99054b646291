"""The demo's targets, its summary table and its loss curves."""

from __future__ import annotations

from pathlib import Path

from vlft.demo import task

# Held-out accuracy after stage 2, per kind; frozen frames must cost each time kind this much and end below a ceiling.
PICTURE_TARGET, TIME_TARGET, FROZEN_DROP, FROZEN_CEILING = 90.0, 80.0, 40.0, 50.0
BEFORE_MARGIN = 10.0  # "at or below chance" before stage 2, with this many points of sampling noise allowed


def verdict(kinds: list[str], before: dict, after: dict, frozen: dict, agree: bool) -> dict[str, bool]:
    """The demo's targets, each as a named pass/fail."""
    checks = {}
    for k in kinds:
        needs, ch = task.KINDS[k][1], 100 * task.chance(k)
        checks[f"{k}: the base before stage 2 at or below chance ({ch:.0f}%)"] = before[k] <= ch + BEFORE_MARGIN
        target = PICTURE_TARGET if needs == "picture" else TIME_TARGET
        checks[f"{k}: after stage 2 >= {target:.0f}%"] = after[k] >= target
        if needs == "time":
            checks[f"{k}: frozen frames drop >= {FROZEN_DROP:.0f} points and end < {FROZEN_CEILING:.0f}%"] = (
                after[k] - frozen[k] >= FROZEN_DROP and frozen[k] < FROZEN_CEILING)
    checks["merged export reloaded in transformers gives the same answers"] = agree
    return checks


def table(kinds: list[str], before: dict, after: dict, frozen: dict) -> str:
    rows = [f"{'kind':<8} {'needs':<8} {'chance':>6} {'before':>7} {'after':>7} {'frozen':>7}"]
    for k in kinds:
        fz = f"{frozen[k]:6.1f}%" if k in frozen else f"{'-':>7}"
        rows.append(f"{k:<8} {task.KINDS[k][1]:<8} {100 * task.chance(k):5.0f}% {before[k]:6.1f}% {after[k]:6.1f}% "
                    f"{fz}")
    return "\n".join(rows)


def plot_losses(base: list[tuple[int, float]], lora: list[tuple[int, float]], lora_eval: list[tuple[int, float]],
                path: Path) -> None:
    """Two panels: stage 1 (the base's full training on captions) and stage 2 (LoRA on the questions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=120)
    ax1.plot([s for s, _ in base], [v for _, v in base], lw=1, label="train")
    ax1.set_title("stage 1: base, full training (captions)", fontsize=9)
    ax2.plot([s for s, _ in lora], [v for _, v in lora], lw=1, label="train")
    if lora_eval:
        ax2.plot([s for s, _ in lora_eval], [v for _, v in lora_eval], "o", label="held-out")
    ax2.set_title("stage 2: LoRA with vlft train (questions)", fontsize=9)
    for ax in (ax1, ax2):
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend()
    ax1.set_ylabel("cross-entropy per supervised token")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
