"""The report's plots: one matplotlib figure per view of a run, rendered to PNG bytes.

This module owns :func:`make_plots` and its ``_plot_*`` helpers (accuracy and win rate, reward vs KL,
response length, drops by reason, margin histogram) and :data:`PLOT_TITLES`. matplotlib is imported
on the first :func:`make_plots` call, with the Agg backend, so importing the report needs no display
and no plotting library.
"""

from __future__ import annotations

import io

from prefloop.report.data import RunMetrics

PLOT_TITLES = {
    "accuracy_winrate": "Accuracy and win rate by round",
    "reward_kl": "Reward vs KL to the reference",
    "length": "Response length by round",
    "drops": "Pairs kept and dropped by reason",
    "margins": "Margin histogram of kept pairs",
}


def make_plots(run: RunMetrics) -> dict[str, bytes]:
    """PNG bytes of every plot, by name. A plot without data still renders and says why it is empty."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plots = {}
    for name, draw in (("accuracy_winrate", _plot_accuracy_winrate), ("reward_kl", _plot_reward_kl),
                       ("length", _plot_length), ("drops", _plot_drops), ("margins", _plot_margins)):
        figure = draw(plt, run)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plt.close(figure)
        plots[name] = buffer.getvalue()
    return plots


def _series(run: RunMetrics, metric: str, scale: float = 1.0) -> tuple[list[int], list[float], list[float]]:
    xs, ys, errors = [], [], []
    for r in run.rounds:
        value = r.get(metric)
        if value is not None:
            xs.append(r.round)
            ys.append(value.value * scale)  # type: ignore[operator]
            errors.append((value.stderr or 0.0) * scale)
    return xs, ys, errors


def _empty(axis, message: str) -> None:
    axis.text(0.5, 0.5, message, ha="center", va="center", wrap=True, transform=axis.transAxes, color="0.35")
    axis.set_xticks([])
    axis.set_yticks([])


def _round_axis(axis, run: RunMetrics) -> None:
    axis.set_xticks([r.round for r in run.rounds])
    axis.set_xlabel("round")


def _plot_accuracy_winrate(plt, run: RunMetrics):
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    xs, ys, errors = _series(run, "accuracy", 100)
    if xs:
        left.errorbar(xs, ys, yerr=errors, marker="o", capsize=4, label="greedy accuracy ± SE")
    for k in run.pass_ks():
        kx, ky, kerr = _series(run, f"pass@{k}", 100)
        if kx:
            left.errorbar(kx, ky, yerr=kerr, marker=".", capsize=3, linestyle="--", label=f"pass@{k} (sampled)")
    left.set_ylabel("% of held-out prompts")
    left.set_title("held-out accuracy (verifier)")
    _round_axis(left, run)
    left.legend(fontsize=8)
    left.grid(alpha=0.3)

    opponents = [(o, label) for o, label in (("sft", "vs SFT"), ("previous", "vs previous round"))
                 if any(r.get(f"win_rate_vs_{o}") for r in run.rounds)]
    if not opponents:
        _empty(right, "no win rate: no other round to compare with")
    else:
        width = 0.8 / len(opponents)
        colours = {"win": "tab:green", "tie": "0.75", "loss": "tab:red"}
        for slot, (opponent, _) in enumerate(opponents):
            for r in run.rounds:
                x = r.round - 0.4 + width * (slot + 0.5)
                bottom = 0.0
                for outcome in ("win", "tie", "loss"):
                    value = r.get(f"{outcome}_rate_vs_{opponent}")
                    if value is None:
                        continue
                    right.bar(x, value.value * 100, width * 0.9, bottom=bottom, color=colours[outcome],
                              hatch="//" if slot else None, edgecolor="white")
                    bottom += value.value * 100  # type: ignore[operator]
                if bottom:
                    right.text(x, 101, "SFT" if opponent == "sft" else "prev", ha="center", fontsize=7)
        from matplotlib.patches import Patch

        handles = [Patch(color=c, label=o) for o, c in colours.items()]
        handles += [Patch(facecolor="white", edgecolor="0.3", hatch="//" if slot else None, label=label)
                    for slot, (_, label) in enumerate(opponents)]
        right.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        for r in run.rounds:
            if not any(r.get(f"win_rate_vs_{o}") for o, _ in opponents):
                right.text(r.round, 50, "nothing to\ncompare with", ha="center", fontsize=7, color="0.4")
        right.set_ylim(0, 108)
        right.set_ylabel("% of shared held-out prompts")
        _round_axis(right, run)
    judge = next((r.info.get("win_judge") for r in run.rounds if r.info.get("win_judge")), "verifier")
    right.set_title(f"win / tie / loss (judged by {judge})")
    figure.tight_layout()
    return figure


def _plot_reward_kl(plt, run: RunMetrics):
    figure, axis = plt.subplots(figsize=(6, 4.5))
    metric, label = ("mean_reward", "mean reward") if run.has_reward else ("accuracy", "greedy accuracy (fraction)")
    points = [(r, r.get("kl_to_reference"), r.get(metric)) for r in run.rounds]
    points = [(r, kl, y) for r, kl, y in points if kl is not None and y is not None]
    if not points:
        _empty(axis, "no round has both a KL estimate and a " + label)
    else:
        axis.errorbar([kl.value for _, kl, _ in points], [y.value for _, _, y in points],
                      xerr=[kl.stderr or 0 for _, kl, _ in points], yerr=[y.stderr or 0 for _, _, y in points],
                      marker="o", capsize=4, linestyle="-", alpha=0.8)
        for r, kl, y in points:
            axis.annotate(f"round {r.round}", (kl.value, y.value), textcoords="offset points", xytext=(6, 6), fontsize=8)
        axis.set_xlabel("KL(π ‖ π_ref) on held-out samples (nats)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    title = "reward vs KL to the reference"
    if not run.has_reward:
        title = "no reward model configured:\nverifier accuracy vs KL shown instead"
    axis.set_title(title, fontsize=10)
    figure.tight_layout()
    return figure


def _plot_length(plt, run: RunMetrics):
    figure, axis = plt.subplots(figsize=(6, 4))
    xs, ys, errors = _series(run, "mean_length")
    if not xs:
        _empty(axis, "no mean length recorded")
    else:
        axis.bar(xs, ys, yerr=errors, capsize=4, color="tab:blue", alpha=0.7, label="mean length (tokens) ± SE")
        axis.set_ylabel("completion tokens (greedy)")
        _round_axis(axis, run)
        tx, ty, _ = _series(run, "truncated_rate", 100)
        if tx:
            twin = axis.twinx()
            twin.plot(tx, ty, color="tab:red", marker="o", label="truncated %")
            twin.set_ylabel("truncated (%)", color="tab:red")
            twin.set_ylim(0, max(100.0, max(ty) * 1.1))
        axis.legend(fontsize=8, loc="lower left", framealpha=0.9)
    axis.set_title("response length by round (greedy) and truncated share (red)")
    figure.tight_layout()
    return figure


def _plot_drops(plt, run: RunMetrics):
    figure, axis = plt.subplots(figsize=(8, 4))
    rounds = [r for r in run.rounds if r.get("pairs_built") is not None]
    if not rounds:
        _empty(axis, "no round built preference pairs\n(round 0 is the SFT model's evaluation)")
    else:
        reasons = sorted({reason for r in rounds for reason in r.drops()})
        xs = [r.round for r in rounds]
        bottom = [r.get("pairs_kept").value if r.get("pairs_kept") else 0.0 for r in rounds]
        axis.bar(xs, bottom, color="tab:green", label="kept")
        cmap = plt.get_cmap("tab10")
        for index, reason in enumerate(reasons):
            heights = [r.drops().get(reason, 0.0) for r in rounds]
            axis.bar(xs, heights, bottom=bottom, color=cmap((index + 3) % 10), label=f"dropped: {reason}")
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        axis.set_ylabel("pairs")
        axis.set_xticks(xs)
        axis.set_xlabel("round")
        axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axis.set_title("pairs kept and dropped by reason")
    figure.tight_layout()
    return figure


def _plot_margins(plt, run: RunMetrics):
    figure, axis = plt.subplots(figsize=(6, 4))
    rounds = [r for r in run.rounds if r.margins]
    if not rounds:
        _empty(axis, "no kept preference pairs with a margin")
    else:
        distinct = sorted({round(m, 6) for r in rounds for m in r.margins or []})
        labels = [f"round {r.round} (n={len(r.margins or [])})" for r in rounds]
        if len(distinct) <= 8:
            # Discrete margins (a verifier's are all 1.0): one bar per value and round, labelled by value,
            # so a histogram's bin edges cannot suggest values that do not occur.
            width = 0.8 / len(rounds)
            for slot, (r, label) in enumerate(zip(rounds, labels, strict=True)):
                counts = [sum(round(m, 6) == value for m in r.margins or []) for value in distinct]
                axis.bar([i - 0.4 + width * (slot + 0.5) for i in range(len(distinct))], counts, width * 0.9, label=label)
            axis.set_xticks(range(len(distinct)), [f"{value:g}" for value in distinct])
        else:
            axis.hist([r.margins for r in rounds], bins=20, histtype="stepfilled", alpha=0.45, label=labels)
        axis.set_xlabel("margin = score(chosen) − score(rejected)")
        axis.set_ylabel("pairs")
        axis.legend(fontsize=8)
    axis.set_title("margin histogram of kept pairs")
    figure.tight_layout()
    return figure
