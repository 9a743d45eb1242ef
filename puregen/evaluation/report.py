"""Measurements of `puregen eval` and `puregen demo`, their summary, and the reports both write.

A row is one trained classifier and what it measured. A cell is one
(attack, defense) pair. For a backdoor attack it holds one measurement per
classifier seed and reports mean and sample standard deviation; for a
targeted attack it holds one measurement per target and reports the share
of targets flipped with a 95% Wilson score interval (a binomial interval that
stays inside [0, 100]% at 0 or n successes). For an availability attack
(unlearnable examples) the measure is the victim's clean test accuracy, over
seeds, against that of a victim trained on the clean set.

Both commands write `results.json` and `results.md` with `write_report`;
`puregen eval` adds the rows as CSV (its cache of trained classifiers), the
cells as CSV and a plot.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from ..data.atomic import atomic_write_file
from ..errors import InputError

Z95 = 1.959963984540054


@dataclass
class Row:
    """One trained classifier and what it measured."""

    attack: str
    case: int
    defense: str
    seed: int
    natural_accuracy: float  # fraction
    poison_success: float  # backdoor: share of triggered non-target test images; targeted: 1.0 if flipped
    train_seconds: float
    target_index: int = -1
    adversarial_class: int = -1
    key: str = ""


ROW_FIELDS = [f.name for f in fields(Row)]


def read_rows(path: Path) -> list[Row]:
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            try:
                rows.append(Row(rec["attack"], int(rec["case"]), rec["defense"], int(rec["seed"]),
                                float(rec["natural_accuracy"]), float(rec["poison_success"]),
                                float(rec["train_seconds"]), int(rec["target_index"]),
                                int(rec["adversarial_class"]), rec["key"]))
            except (KeyError, ValueError):
                continue  # a row cut short by an interrupted run is measured again
    return rows


def write_rows(path: Path, rows: list[Row]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=ROW_FIELDS)
    w.writeheader()
    for r in rows:
        w.writerow(asdict(r))
    with atomic_write_file(path) as f:
        f.write(buf.getvalue().encode())


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Cell:
    attack: str
    defense: str
    targeted: bool
    n: int  # seeds (backdoor) or targets (targeted)
    success_mean: float  # percent
    success_std: float  # percent; backdoor only
    success_low: float  # percent; targeted only: the 95% interval
    success_high: float
    natural_mean: float  # percent
    natural_std: float
    flipped: int = 0
    availability: bool = False  # unlearnable examples: the natural accuracy is the measure


def summarize(rows: list[Row], targeted: dict[str, bool] | None = None,
              availability: dict[str, bool] | None = None) -> list[Cell]:
    """One cell per (attack, defense), in first-seen order; `targeted` names the targeted attacks and
    `availability` the unlearnable-example ones (the others are backdoors; both those are summarised over
    seeds)."""
    targeted, availability = targeted or {}, availability or {}
    cells = []
    for attack, defense in dict.fromkeys((r.attack, r.defense) for r in rows):
        group = [r for r in rows if r.attack == attack and r.defense == defense]
        suc = np.array([r.poison_success for r in group]) * 100
        nat = np.array([r.natural_accuracy for r in group]) * 100
        ddof = 1 if len(group) > 1 else 0
        if targeted.get(attack, False):
            k = int(round(sum(r.poison_success for r in group)))
            low, high = wilson_interval(k, len(group))
            cells.append(Cell(attack, defense, True, len(group), 100 * k / len(group), math.nan, 100 * low,
                              100 * high, float(nat.mean()), float(nat.std(ddof=ddof)), k))
        else:
            cells.append(Cell(attack, defense, False, len(group), float(suc.mean()), float(suc.std(ddof=ddof)),
                              math.nan, math.nan, float(nat.mean()), float(nat.std(ddof=ddof)),
                              availability=availability.get(attack, False)))
    return cells


def success_text(c: Cell) -> str:
    """Poison success %: mean ± std over seeds, or the share of targets flipped with its interval."""
    if c.targeted:
        return f"{c.success_mean:.0f} [{c.success_low:.0f}, {c.success_high:.0f}] ({c.flipped}/{c.n})"
    return f"{c.success_mean:.1f} ± {c.success_std:.1f}"


def cell_text(c: Cell) -> str:
    if c.availability:
        return f"{c.natural_mean:.1f} ± {c.natural_std:.1f}"
    return f"{success_text(c)} / {c.natural_mean:.1f}"


def _markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def markdown_table(cells: list[Cell], attack_labels: dict[str, str], defense_labels: dict[str, str],
                   chance: dict[str, float] | None = None) -> str:
    """Rows: defenses; columns: attacks; each cell `poison success % / natural accuracy %` (Table 1's layout)."""
    attacks = list(dict.fromkeys(c.attack for c in cells))
    defenses = list(dict.fromkeys(c.defense for c in cells))
    by = {(c.attack, c.defense): c for c in cells}
    body = [[defense_labels.get(d, d)] + [cell_text(by[(a, d)]) if (a, d) in by else "-" for a in attacks]
            for d in defenses]
    kinds = {c.attack: c.availability for c in cells}
    if chance and not all(kinds.values()):
        body.append(["*chance (clean model)*"] + [f"{chance[a]:.1f}" if a in chance and not kinds[a] else "-"
                                                  for a in attacks])
    if chance and any(kinds.values()):  # the availability attacks' chance is the clean model's error
        body.append(["*clean training set*"] + [f"{100 - chance[a]:.1f}" if a in chance and kinds[a] else "-"
                                                for a in attacks])
    return _markdown(["defense"] + [attack_labels.get(a, a) for a in attacks], body)


MIN_TAKEN_POINTS = 1.0  # below this an attack did not work, and a share of what it took means nothing


def recovery_table(cells: list[Cell], attack_labels: dict[str, str], defense_labels: dict[str, str],
                   chance: dict[str, float]) -> str:
    """Unlearnable examples: the share of the accuracy each attack took (clean victim minus undefended
    victim) that each defense wins back, in percent; a row per defense other than none, "-" where the
    attack took less than `MIN_TAKEN_POINTS`."""
    attacks = [a for a in dict.fromkeys(c.attack for c in cells if c.availability) if a in chance]
    by = {(c.attack, c.defense): c for c in cells}
    defenses = [d for d in dict.fromkeys(c.defense for c in cells) if d != "none"]
    body = []
    for d in defenses:
        row = [defense_labels.get(d, d)]
        for a in attacks:
            taken = (100 - chance[a]) - by[(a, "none")].natural_mean if (a, "none") in by else math.nan
            if (a, d) not in by or not taken >= MIN_TAKEN_POINTS:
                row.append("-")
            else:
                row.append(f"{100 * (by[(a, d)].natural_mean - by[(a, 'none')].natural_mean) / taken:.0f}")
        body.append(row)
    drop = ["*accuracy taken (points)*"] + [
        f"{(100 - chance[a]) - by[(a, 'none')].natural_mean:.1f}" if (a, "none") in by else "-" for a in attacks]
    return _markdown(["defense"] + [attack_labels.get(a, a) for a in attacks], [drop] + body)


def markdown_seed_table(cells: list[Cell]) -> str:
    """One backdoor attack: a row per defense with poison success and natural accuracy (both mean ± std, %)
    and the number of seeds behind them."""
    if len({c.attack for c in cells}) > 1 or any(c.targeted for c in cells):
        raise ValueError("a seed table summarises one backdoor attack")
    body = [[c.defense, success_text(c), f"{c.natural_mean:.1f} ± {c.natural_std:.1f}", str(c.n)] for c in cells]
    return _markdown(["defense", "poison success %", "natural accuracy %", "seeds"], body)


def write_report(folder: Path, result: dict, markdown: str) -> None:
    """`results.json` (everything in `result`) and `results.md` (the human-readable report) in `folder`."""
    with atomic_write_file(folder / "results.json") as f:
        f.write((json.dumps(result, indent=2, default=str) + "\n").encode())
    with atomic_write_file(folder / "results.md") as f:
        f.write(markdown.encode())


def write_summary_csv(path: Path, cells: list[Cell]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[f.name for f in fields(Cell)])
    w.writeheader()
    for c in cells:
        w.writerow({k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(c).items()})
    with atomic_write_file(path) as f:
        f.write(buf.getvalue().encode())


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise InputError("matplotlib is needed for puregen eval's plots: pip install 'puregen[eval]'") from e


def plot_cells(path: Path, cells: list[Cell], attack_labels: dict[str, str], defense_labels: dict[str, str]) -> None:
    """One panel per attack: poison success per defense (bars, with std or 95% interval) and natural
    accuracy (dots, right axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = list(dict.fromkeys(c.attack for c in cells))
    fig, axes = plt.subplots(1, len(attacks), figsize=(4.2 * len(attacks), 3.8), squeeze=False)
    for ax, attack in zip(axes[0], attacks):
        group = [c for c in cells if c.attack == attack]
        x = np.arange(len(group))
        heights = [c.success_mean for c in group]
        if group[0].targeted:
            err = np.array([[c.success_mean - c.success_low for c in group],
                            [c.success_high - c.success_mean for c in group]])
        else:
            err = np.array([c.success_std for c in group])
        ax.bar(x, heights, yerr=err, color="#c0504d", capsize=3, label="poison success %")
        ax.set_ylim(0, 100)
        ax.set_xticks(x, [defense_labels.get(c.defense, c.defense) for c in group], rotation=45, ha="right",
                      fontsize=8)
        ax.set_title(attack_labels.get(attack, attack), fontsize=9)
        ax.set_ylabel("poison success %")
        twin = ax.twinx()
        twin.plot(x, [c.natural_mean for c in group], "o", color="#1f4e79", label="natural accuracy %")
        twin.set_ylim(0, 100)
        twin.set_ylabel("natural accuracy %")
    fig.tight_layout()
    with atomic_write_file(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
