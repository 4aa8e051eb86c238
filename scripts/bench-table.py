#!/usr/bin/env python3
"""Prints target/bench/summary.tsv (scripts/bench) as a table, with ratios.

    scripts/bench-table.py target/bench/summary.tsv             aligned text
    scripts/bench-table.py --markdown target/bench/summary.tsv  the README's table

Each handover row gets `× floor`: its p50 and p99 over the p50 and p99 of the `floor` row of
the same backend and measure (`handover_start`, `handover`), else of the backend's `handover`.
"""
import csv
import sys

HEADER = ["backend", "measure", "system", "n", "p50_ms", "p99_ms"]


def load(path):
    with open(path, newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader)
        if header != HEADER:
            sys.exit(f"{path}: header {header}, expected {HEADER}")
        return [dict(zip(header, row)) for row in reader if row]


def ratios(rows):
    floors = {
        (r["backend"], r["measure"]): (float(r["p50_ms"]), float(r["p99_ms"]))
        for r in rows
        if r["system"] == "floor"
    }
    for r in rows:
        # The floor of the same measure (handover_start: back to back; handover: after the
        # same idle pauses), else the backend's handover floor.
        floor = floors.get((r["backend"], r["measure"])) or floors.get((r["backend"], "handover"))
        if floor and r["measure"].startswith("handover") and r["system"] != "floor":
            p50, p99 = float(r["p50_ms"]), float(r["p99_ms"])
            r["x_floor"] = f"{p50 / floor[0]:.1f}× / {p99 / floor[1]:.1f}×"
        else:
            r["x_floor"] = ""
    return rows


def fmt(ms):
    value = float(ms)
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def main():
    args = sys.argv[1:]
    markdown = "--markdown" in args
    paths = [a for a in args if a != "--markdown"]
    if len(paths) != 1:
        sys.exit(__doc__)
    rows = ratios(load(paths[0]))
    columns = ["backend", "measure", "system", "n", "p50 ms", "p99 ms", "× floor (p50 / p99)"]
    table = [
        [r["backend"], r["measure"], r["system"], r["n"], fmt(r["p50_ms"]), fmt(r["p99_ms"]),
         r["x_floor"]]
        for r in rows
    ]
    if markdown:
        print("| " + " | ".join(columns) + " |")
        print("|" + "|".join("---" for _ in columns) + "|")
        for row in table:
            print("| " + " | ".join(row) + " |")
        return
    widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(columns)]
    for row in [columns] + table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


if __name__ == "__main__":
    main()
