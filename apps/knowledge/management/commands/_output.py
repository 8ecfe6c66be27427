"""Plain-text tables and progress bars shared by the knowledge commands (output stays greppable)."""
from __future__ import annotations

from collections.abc import Sequence


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [line, "| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |", line]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells[1:]]
    out.append(line)
    return "\n".join(out)


def progress(total: int, description: str, *, unit: str = "doc", disable: bool = False):
    from tqdm import tqdm

    # tqdm writes to stderr so the summary on stdout stays clean for pipes and tests.
    return tqdm(total=total, desc=description, unit=unit, disable=disable, dynamic_ncols=True, leave=False)
