"""Build intents/data/negatives.csv, the generic out-of-domain questions every seed
calibrates against, from CLINC150's *train* split (CC BY 3.0, Larson et al. 2019).

Kept: every domain but banking and credit cards (a bank's own FAQ), 10 questions per
intent plus CLINC's 100 out-of-scope questions; the validation split is left alone so
out-of-domain figures measured on it stay held out. Left out too: the intents of other
domains that a bank answers (telling the bank of a trip, exchange rates, direct deposit)
and the out-of-scope questions about a bank's own business ("how much is an overdraft fee
for bank"). Every seed calibrates against these as questions never to answer: a bank's
FAQ that answers them would count its right answers as wrong, and learn them as out of
domain. They are dropped after the sampling, so every other question stays as it was.

    python scripts/build_negatives.py /work/shared/data/clinc150/train.csv
"""

from __future__ import annotations

import csv
import random
import re
import sys
from collections import defaultdict
from pathlib import Path

PER_INTENT = 10
SKIPPED_DOMAINS = {"banking", "credit_cards"}
BANK_INTENTS = {"travel_notification", "exchange_rate", "direct_deposit"}
# An out-of-scope question with one of these words asks about a bank's own business.
BANK_WORDS = re.compile(r"\b(bank|banks|banking|card|cards|account|accounts|overdraft|loan|"
                        r"loans|credit|debit|atm|deposit|withdraw\w*|transfer\w*)\b", re.I)
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
    chosen = [row for row in chosen if not asks_a_bank(row)]
    with OUT.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "domain", "intent"])
        for row in chosen:
            writer.writerow([row["text"], row["domain"], row["intent"]])
    print(f"{OUT}: {len(chosen)} questions from {len(by_intent)} intents")


def asks_a_bank(row: dict[str, str]) -> bool:
    """A question a bank's FAQ may answer (see the module's docstring)."""
    return row["intent"] in BANK_INTENTS or (row["domain"] == "oos"
                                              and BANK_WORDS.search(row["text"]) is not None)


def row_is_oos(rows: list[dict[str, str]]) -> bool:
    return rows[0]["domain"] == "oos"


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data/clinc150/train.csv")
