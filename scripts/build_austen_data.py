"""Dev-time script: build ``proxrl/lm/tasks/data/austen_sentences.txt.gz`` from Jane Austen's six novels.

The novels themselves are in the public domain (first published 1811-1818). The source used here is the
text packaged by the R package ``janeaustenr`` (Debian: ``apt-get install -y r-cran-janeaustenr``), read
without R through its lazy-load database with the ``rdata`` Python package (``pip install rdata``).

Output: one sentence per line, gzip-compressed, deterministic (sorted by novel, then document order).
Run from the repository root::

    python scripts/build_austen_data.py [--src /usr/lib/R/site-library/janeaustenr/data] [--out proxrl/lm/tasks/data]
"""
from __future__ import annotations

import argparse
import gzip
import re
import zlib
from pathlib import Path

NOVELS = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion"]
MIN_CHARS, MAX_CHARS = 24, 160

_SPLIT = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z])")
_HONORIFIC = re.compile(r"\b(Mr|Mrs|Dr|St|Messrs|Ms)\.$")


def read_rdb(src: Path) -> dict[str, list[str]]:
    """Each novel's lines (character vector) from R's lazy-load database ``Rdata.rdb`` / ``Rdata.rdx``."""
    import rdata

    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((src / "Rdata.rdx").read_bytes())))
    blob = (src / "Rdata.rdb").read_bytes()
    out: dict[str, list[str]] = {}
    for name, (offset, length) in index["variables"].items():
        chunk = blob[int(offset): int(offset) + int(length)]
        raw = zlib.decompress(chunk[4:])  # 4-byte big-endian length, then zlib stream
        value = rdata.conversion.convert(rdata.parser.parse_data(raw))
        out[str(name)] = [str(x) for x in value]
    return out


def sentences(lines: list[str]) -> list[str]:
    """Paragraphs (blank-line separated) split into sentences; chapter headings and short fragments dropped."""
    paragraphs, cur = [], []
    for line in lines:
        line = line.strip()
        if not line:
            if cur:
                paragraphs.append(" ".join(cur))
                cur = []
        else:
            cur.append(line)
    if cur:
        paragraphs.append(" ".join(cur))
    out = []
    for para in paragraphs:
        if para.isupper() or para.lower().startswith(("chapter", "volume")):
            continue
        para = para.replace("_", "").replace("--", " -- ")
        para = re.sub(r"\s+", " ", para)
        pieces = _SPLIT.split(para)
        merged: list[str] = []
        for p in pieces:  # undo splits after "Mr." etc.
            if merged and _HONORIFIC.search(merged[-1]):
                merged[-1] += " " + p
            else:
                merged.append(p)
        for s in merged:
            s = s.strip().strip("\"'").strip()
            if MIN_CHARS <= len(s) <= MAX_CHARS and s[0].isupper() and s.isascii():
                out.append(s)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default="/usr/lib/R/site-library/janeaustenr/data")
    ap.add_argument("--out", default="proxrl/lm/tasks/data")
    args = ap.parse_args()
    novels = read_rdb(Path(args.src))
    all_sents: list[str] = []
    for name in NOVELS:
        s = sentences(novels[name])
        print(f"{name}: {len(novels[name])} lines -> {len(s)} sentences")
        all_sents.extend(s)
    out = Path(args.out) / "austen_sentences.txt.gz"
    out.parent.mkdir(parents=True, exist_ok=True)
    data = ("\n".join(all_sents) + "\n").encode("utf-8")
    with open(out, "wb") as fh:  # mtime=0 -> byte-identical output on every run
        with gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0, compresslevel=9) as gz:
            gz.write(data)
    print(f"wrote {out}: {len(all_sents)} sentences, {len(data)} bytes raw, {out.stat().st_size} bytes gzip")


if __name__ == "__main__":
    main()
