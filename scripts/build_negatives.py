"""Build intents/data/negatives.csv, the generic out-of-domain questions every seed
calibrates against, from CLINC150's *train* split (CC BY 3.0, Larson et al. 2019).

Kept: every domain but banking and credit cards (a bank's own FAQ), 10 questions per
intent (120 intents) plus CLINC's 100 out-of-scope questions; the validation split is
left alone so out-of-domain figures measured on it stay held out.

    python scripts/build_negatives.py /work/shared/data/clinc150/train.csv
"""

from __future__ import annotations

import csv
import random
import sys
from collections import defaultdict
from pathlib import Path

PER_INTENT = 10
SKIPPED_DOMAINS = {"banking", "credit_cards"}
OUT = Path(__file__).resolve().parent.parent / "intents" / "data" / "negatives.csv"


def main(train_csv: str) -> None:
    by_intent: dict[str, list[dict[str, str]]] = defaultdict(list)
    with open(train_csv, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["domain"] not in SKIPPED_DOMAINS:
                by_intent[row["intent"]].append(row)
    rng = random.Random(0)
    chosen = []
    for intent in sorted(by_intent):
        rows = by_intent[intent]
        chosen.extend(rows if row_is_oos(rows) else rng.sample(rows, min(PER_INTENT, len(rows))))
    with OUT.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "domain", "intent"])
        for row in chosen:
            writer.writerow([row["text"], row["domain"], row["intent"]])
    print(f"{OUT}: {len(chosen)} questions from {len(by_intent)} intents")


def row_is_oos(rows: list[dict[str, str]]) -> bool:
    return rows[0]["domain"] == "oos"


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data/clinc150/train.csv")
