"""Join the kept forecasts of runs that forecast disjoint trajectories of one split with one adapter and one setting
into one directory, as if one run had made them.

    python scripts/join_forecasts.py --part DIR --part DIR ... --out DIR

Made for lever c (the median of 20 samples, ``scripts/reforecast.py``), forecast in two parts: trajectories 800–839
(on which the temperature was chosen) and 840–899. Copies ``predictions_<tag>.csv`` and ``quantiles_trained.csv``
rows of every part, sorted by trajectory (refusing overlapping parts or parts with other settings), and writes a
README naming the parts and the 10–90 % band's coverage over all of them. Nothing is forecast or charged.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from miniqwen.atomic import atomic_write  # noqa: E402

SAME = ("run", "adapter", "weights_sha256", "precision", "split", "samples", "temperature")


def read_rows(path: Path) -> tuple[list[str], list[dict]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", action="append", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    parts, out = [Path(x) for x in a.part], Path(a.out)
    records = [json.loads((d / "results.json").read_text()) for d in parts]
    for d, r in zip(parts[1:], records[1:]):
        differ = [k for k in SAME if r.get(k) != records[0].get(k)]
        if differ:
            sys.exit(f"error: {d} differs from {parts[0]} in {', '.join(differ)}")
    out.mkdir(parents=True, exist_ok=False)
    names = sorted({f.name for d in parts for f in d.glob("*.csv")})
    seen: dict[str, set] = {}
    for name in names:
        header, rows = None, []
        for d in parts:
            fields, part_rows = read_rows(d / name)
            header = header or fields
            ids = {r["trajectory"] for r in part_rows}
            if ids & seen.setdefault(name, set()):
                sys.exit(f"error: {d / name} repeats trajectories of an earlier part")
            seen[name] |= ids
            rows += part_rows
        rows.sort(key=lambda r: (int(r["trajectory"]), int(r["step"])))
        atomic_write(out / name, ",".join(header) + "\n" + "".join(",".join(r[k] for k in header) + "\n"
                                                                   for r in rows))
    truth_note = ""
    if (out / "quantiles_trained.csv").is_file():  # the band's coverage over every part, from the parts' records
        n = [len(json.loads((d / "results.json").read_text())["evaluations"]["lora"]["trajectories"]) for d in parts]
        cover = {s: float(np.average([r["band"]["coverage_10_90"][s] for r in records], weights=n))
                 for s in ("prey", "predator")}
        truth_note = (f" 10–90 % band coverage over all {sum(n)} trajectories (weighted by the parts' sizes): prey "
                      f"{cover['prey']:.0%}, predator {cover['predator']:.0%}.")
    readme = [f"# {out.name}: the kept forecasts of {len(parts)} parts joined", "",
              f"`python scripts/join_forecasts.py {' '.join('--part ' + str(d) for d in parts)} --out {out}`", "",
              f"Parts (same run, adapter, weights, precision, split, samples, temperature): "
              f"{', '.join(d.name for d in parts)}; {records[0].get('samples')} samples at temperature "
              f"{records[0].get('temperature')} on the {records[0].get('split')} split.{truth_note}", ""]
    atomic_write(out / "README.md", "\n".join(readme))
    atomic_write(out / "results.json", json.dumps({"parts": [d.name for d in parts],
                                                   **{k: records[0].get(k) for k in SAME}}, indent=2) + "\n")
    print("\n".join(readme))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
