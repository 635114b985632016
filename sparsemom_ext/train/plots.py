"""PNG figures of a training run (``--plot DIR``), drawn from the results dict alone.

- ``curves.png``: training and validation loss and accuracy per epoch;
- ``density.png``: each layer's weight density per epoch (it moves when the engine
  redistributes by momentum);
- ``speedup.png``: per layer, the dense forward time, the paper-style estimate and the
  measured forward; and the speed-ups: estimated forward, measured forward, measured
  training step (median, and amortised with the topology updates).

matplotlib is optional: it is imported only here, and :func:`require_matplotlib` lets
the command line refuse ``--plot`` up front when it is missing.
"""

from pathlib import Path
from typing import List

__all__ = ["PLOT_FILES", "require_matplotlib", "write_plots"]

PLOT_FILES = ("curves.png", "density.png", "speedup.png")


def require_matplotlib() -> None:
    """Raise ImportError with an install hint when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install matplotlib") from exc


def write_plots(results: dict, directory: Path, title: str) -> List[Path]:
    """Write the figures of ``results`` (as :meth:`Run.finish` returns them) to ``directory``."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    epochs = results["epochs"]
    x = [r["epoch"] for r in epochs]
    paths = [directory / name for name in PLOT_FILES]

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(x, [r["train_loss"] for r in epochs], label="train")
    ax_acc.plot(x, [100 * r["train_acc"] for r in epochs], label="train")
    validated = [r for r in epochs if r["val_loss"] is not None]
    if validated:
        ax_loss.plot([r["epoch"] for r in validated], [r["val_loss"] for r in validated], label="validation")
        ax_acc.plot([r["epoch"] for r in validated], [100 * r["val_acc"] for r in validated], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)",
               title=f"accuracy (test error {100 * results['test']['error']:.2f}%)")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(epochs[0]["layer_density"]) if epochs else []
    for name in names:
        ax.plot(x, [r["layer_density"][name] for r in epochs], label=name or "(model)")
    ax.set(xlabel="epoch", ylabel="weight density", yscale="log", title="density per layer during each epoch")
    ax.grid(alpha=0.3)
    if names:
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)

    sp = results["speedup"]
    fig, (ax_layers, ax_speed) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    layers = sp["layers"]
    pos = range(len(layers))
    width = 0.27
    for offset, key, label in ((-width, "dense_s", "dense forward"), (0.0, "estimated_s", "estimated (paper)"),
                               (width, "measured_s", "measured forward")):
        ax_layers.bar([p + offset for p in pos], [1000 * layer[key] for layer in layers], width, label=label)
    ax_layers.set_xticks(list(pos), [layer["name"] for layer in layers], rotation=45, ha="right", fontsize="small")
    ax_layers.set(ylabel="ms per batch", title="forward time per layer")
    ax_layers.legend()
    bars = [("estimated\nforward", sp["estimated"]["speedup"]),
            ("measured\nforward", sp["measured_forward"]["speedup"])]
    measured = sp["measured_training"]
    if measured and "speedup_median" in measured:
        bars += [("measured\nstep", measured["speedup_median"]),
                 ("measured step\n+ updates", measured["speedup_amortised"])]
    ax_speed.bar(range(len(bars)), [b[1] for b in bars], color=["C1", "C2", "C3", "C4"][:len(bars)])
    ax_speed.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize="small")
    ax_speed.axhline(1.0, color="k", lw=0.8)
    for i, (_, value) in enumerate(bars):
        ax_speed.annotate(f"{value:.2f}x", (i, value), ha="center", va="bottom")
    ax_speed.set(ylabel="speed-up over dense", title="estimated vs measured")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)
    return paths
