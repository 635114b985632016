"""Text output of the training command: the run's header, one line per epoch, the final table."""

import math
from typing import List, Optional, Sequence

__all__ = ["epoch_line", "final_report", "header"]


def _table(rows: Sequence[Sequence[str]], right: Sequence[bool]) -> List[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)).rstrip()
            for row in rows]


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.3f}"


def header(args, data, steps_per_epoch: int, threads: int, freed_memory_kept: bool) -> str:
    """Two or three lines saying what is trained, on what, how."""
    shape = "x".join(map(str, data.in_shape))
    lines = [f"{args.model} on {args.dataset}: {len(data.train_y)} train / {len(data.val_y)} validation / "
             f"{len(data.test_y)} test images of {shape}, {data.num_classes} classes"]
    if args.dense:
        lines.append("dense baseline (no sparsity)")
    else:
        when = f"every {args.update_every} steps" if args.update_every else "at epoch ends"
        lines.append(f"density {args.density} ({args.distribution}, layout {args.layout}); growth {args.growth}, "
                     f"prune {args.prune}, redistribution {args.redistribution}, prune rate {args.prune_rate} "
                     f"{args.prune_decay} to {args.final_prune_rate}, updates {when}, connectivity {args.connectivity}"
                     + (f", lr ramp {args.lr_ramp_start} x lr to lr over the {args.lr_ramp_steps} steps after each update"
                        if args.lr_ramp_steps else ""))
    opt = f"{args.optimizer} lr {args.lr}"
    if args.optimizer == "sgd":
        opt += f" momentum {args.momentum}{' nesterov' if args.nesterov else ''}"
    opt += f" weight decay {args.weight_decay}"
    sched = (f"lr x{args.lr_decay} every {args.lr_decay_every} steps" if args.lr_schedule == "step"
             else "lr cosine to 0")
    lines.append(f"{opt}, {sched}; batch {args.batch_size}, {steps_per_epoch} steps/epoch, {args.epochs} epochs; "
                 f"device {args.device}, {threads} threads{', denormals flushed' if args.flush_denormal else ''}"
                 f"{', freed memory kept' if freed_memory_kept else ''}, "
                 f"seed {args.seed}")
    return "\n".join(lines)


def epoch_line(record: dict, epochs: int) -> str:
    """The one-line summary of an epoch."""
    width = len(str(epochs))
    parts = [f"epoch {record['epoch']:>{width}}/{epochs}",
             f"loss {record['train_loss']:.4f} acc {_pct(record['train_acc'])}"]
    if record["val_loss"] is not None:
        parts.append(f"val loss {record['val_loss']:.4f} acc {_pct(record['val_acc'])}")
    parts.append(f"lr {record['lr']:.3g}")
    densities = record["layer_density"]
    parts.append("densities " + " ".join(f"{d:.3f}" for d in densities.values()))
    if record["prune_rate"] is not None:
        parts.append(f"pruned {record['prune_rate']:.3f}")
    parts.append(f"{record['train_s']:.1f}s (step {1000 * record['step_median_s']:.2f} ms)")
    if record["update_s"]:
        parts.append(f"update {1000 * record['update_s']:.0f} ms")
    return "  ".join(parts)


def final_report(args, results: dict) -> str:
    """Test error, per-layer densities and forward times, time per epoch, both speed-ups side by side."""
    test, timing, sp = results["test"], results["timing"], results["speedup"]
    epochs = results["epochs"]
    lines = [f"== {args.model} on {args.dataset}, " + ("dense" if args.dense else f"density {args.density}")
             + f", {len(epochs)} epoch{'s' if len(epochs) != 1 else ''} ==",
             f"test error {_pct(test['error'])} (accuracy {_pct(test['accuracy'])}, loss {test['loss']:.4f})"]
    if epochs:
        n = len(epochs)
        train_s, eval_s = sum(r["train_s"] for r in epochs) / n, sum(r["eval_s"] for r in epochs) / n
        lines.append(
            f"time per epoch (mean of {n}): training {train_s:.2f} s (median step {_ms(timing['step_median_s'])} ms), "
            f"validation {eval_s:.2f} s, topology update {1000 * sum(r['update_s'] for r in epochs) / n:.1f} ms")
    lines.append("")

    rows = [("layer", "kind", "shape", "density", "input density", "dense fwd ms", "estimated ms", "measured fwd ms")]
    numel_total = active_total = 0
    for layer in sp["layers"]:
        numel = math.prod(layer["shape"])
        numel_total += numel
        active_total += layer["weight_density"] * numel
        rows.append((layer["name"], layer["kind"], "x".join(map(str, layer["shape"])), f"{layer['weight_density']:.4f}",
                     f"{layer['input_density']:.4f}", _ms(layer["dense_s"]), _ms(layer["estimated_s"]),
                     _ms(layer["measured_s"])))
    est, fwd = sp["estimated"], sp["measured_forward"]
    rows.append(("total", "", str(numel_total), f"{active_total / numel_total:.4f}", "",
                 _ms(est["dense_forward_s"]), _ms(est["sparse_forward_s"]), _ms(fwd["forward_s"])))
    lines += _table(rows, (False, False, True, True, True, True, True, True))
    lines.append(f"(forward of one batch of {args.batch_size} test images in eval mode; input density over the "
                 "test set enters the estimate of conv layers only)")
    lines.append("")

    measured = sp["measured_training"]
    rows = [("speed-up over dense", "estimated (the paper's method)", "measured (wall clock, this process)")]
    rows.append(("forward", f"{est['speedup']:.2f}x  sum t / sum t*density[*input density]",
                 f"{fwd['speedup']:.2f}x  the layers' own forward"))
    if measured is None:
        rows.append(("training step", "-", "not measured (--compare-dense 0)"))
    elif "note" in measured:
        rows.append(("training step", "-", measured["note"]))
    else:
        rows.append(("training step", "-",
                     f"{measured['speedup_median']:.2f}x  median {_ms(measured['step_median_s'])} ms vs dense "
                     f"{_ms(measured['dense_step_median_s'])} ms ({measured['dense_steps_timed']} steps)"))
        rows.append(("incl. topology updates", "-",
                     f"{measured['speedup_amortised']:.2f}x  median step + updates/steps "
                     f"{_ms(measured['step_amortised_s'])} ms; whole loop {_ms(timing['wall_per_step_s'])} ms/step"))
    lines += _table(rows, (False, False, False))
    return "\n".join(lines)
