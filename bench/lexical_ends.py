"""How often the end of turn's word rule misreads a finished question, and a prefix.

    .venv/bin/python bench/lexical_ends.py [--show 0]

`gateway.call.end_of_turn.lexically_incomplete` judges a pause's words unfinished when they
end on a continuation ("my card number is", "transfer it to my", "four one" of a number).
A finished question it judges so waits the long silence (1200 ms) even when it is a cache
hit; an unfinished prefix it lets through may end the turn mid-sentence. Both are counted
here, with the closed-phrase exceptions (a wh-clause's copula, "one" as a pronoun,
"a while") and without them (the last word alone), on training data only:

- finished: every question of Banking77 train and CLINC150 train as published;
- unfinished: every strict word prefix of 2 or more words of those questions that is
  not itself a question of the set ("where is the money" of "where is the money I sent"
  is not counted, "what my password" is).

The rule has no parameter that was fitted: the exceptions were written from the misread
Banking77 train questions this bench lists (``--show``).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.call.end_of_turn import lexically_incomplete  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
CORPORA = {"banking77 train": (DATA / "banking77" / "train.csv", "text"),
           "clinc150 train": (DATA / "clinc150" / "train.csv", "text")}
_WORD = re.compile(r"\S+")


def questions(path: Path, column: str) -> list[str]:
    with path.open(newline="", encoding="utf-8") as f:
        return [row[column] for row in csv.DictReader(f)]


def prefixes(texts: list[str]) -> list[str]:
    whole = {t.lower().strip(" ?.!") for t in texts}
    found: set[str] = set()
    for text in texts:
        words = _WORD.findall(text)
        for n in range(2, len(words)):
            prefix = " ".join(words[:n]).rstrip(",;:-")
            if prefix.lower().strip(" ?.!") not in whole:
                found.add(prefix)
    return sorted(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--show", type=int, default=0,
                        help="list this many finished questions each rule reads unfinished")
    args = parser.parse_args()
    print(f"{'corpus':16} {'set':10} {'n':>7} | {'read unfinished: last word':>27} "
          f"{'with exceptions':>16}")
    for name, (path, column) in CORPORA.items():
        finished = questions(path, column)
        for label, texts in (("finished", finished), ("prefixes", prefixes(finished))):
            plain = [t for t in texts if lexically_incomplete(t, closed_phrases=False)]
            closed = [t for t in texts if lexically_incomplete(t)]
            print(f"{name:16} {label:10} {len(texts):>7} | "
                  f"{len(plain):>9} ({len(plain) / len(texts):6.2%})          "
                  f"{len(closed):>6} ({len(closed) / len(texts):6.2%})")
            if args.show and label == "finished":
                for text in [t for t in plain if t not in closed][:args.show]:
                    print(f"    now finished: {text[-90:]}")
                for text in closed[:args.show]:
                    print(f"    still unfinished: {text[-90:]}")
    print("finished: a question of the set (read unfinished = a false hold of 1200 ms); "
          "prefixes: its strict word prefixes (read unfinished = a held pause)")


if __name__ == "__main__":
    main()
