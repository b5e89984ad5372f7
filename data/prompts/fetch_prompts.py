"""Rebuild the real prompt sets of data/prompts from their public sources (SOURCES.md), with the standard library only.

    python data/prompts/fetch_prompts.py                 # every set
    python data/prompts/fetch_prompts.py hpsv2_anime     # some

Each source is downloaded, checked against its sha256 where one is pinned, converted to one prompt a line (line breaks
and tabs inside a prompt become spaces, leading and trailing whitespace is stripped, empty prompts are dropped, order
and duplicates are kept), checked against its expected count, and written as UTF-8 next to this script. The HPSv2
benchmark files live on the Hugging Face hub without a pinned revision: their sha256 is printed, to be noted in
SOURCES.md.
"""

from __future__ import annotations

import hashlib
import json
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

GITHUB = "https://raw.githubusercontent.com"
HPDV2 = "https://huggingface.co/datasets/zhwang/HPDv2/resolve/main/benchmark"


def _tsv_first_column(text: str) -> list[str]:
    """PartiPrompts.tsv: a header `Prompt<TAB>Category<TAB>Challenge<TAB>Note`, no quoting; the Prompt column."""
    header, *rows = text.splitlines()
    if not header.startswith("Prompt\t"):
        raise ValueError(f"unexpected header {header!r}")
    return [row.split("\t")[0] for row in rows]


def _json_list(text: str) -> list[str]:
    """An HPSv2 benchmark file: a JSON list of prompt strings."""
    prompts = json.loads(text)
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("not a JSON list of strings")
    return prompts


# name: (url, sha256 of the downloaded file or None, parser, expected count)
SOURCES: dict[str, tuple[str, str | None, Callable[[str], list[str]], int]] = {
    "parti": (
        f"{GITHUB}/google-research/parti/2c99f6652cbc7f0d0441aa91f4c7e7055bcb0071/PartiPrompts.tsv",
        "fab29e41bb512a169b56acab4cf2a41dcb675e285df2efcde6640c7dd3c440eb",
        _tsv_first_column,
        1632,
    ),
    "coco2014_val_30k": (
        f"{GITHUB}/tianweiy/DMD2/4e54501cbe96b31f8a90f15aae3d4e6658b6001c/main/coco_eval/captions_coco14_test.txt",
        "edabd2a556026cbf5d36a5fffa35ad43d7ba71b72f6d640b727c1edefb7f1945",
        str.splitlines,
        30000,
    ),
    **{
        f"hpsv2_{style.replace('-', '_')}": (f"{HPDV2}/{style}.json", None, _json_list, 800)
        for style in ("anime", "concept-art", "paintings", "photo")
    },
}


def clean(prompts: list[str]) -> list[str]:
    """One line per prompt: inner line breaks and tabs to spaces, outer whitespace stripped, empty prompts dropped."""
    flat = (p.replace("\r", " ").replace("\n", " ").replace("\t", " ").strip() for p in prompts)
    return [p for p in flat if p]


def convert(name: str, data: bytes) -> str:
    """The prompt file's text for a downloaded source; ValueError if its hash or prompt count is not the expected."""
    _, sha256, parse, count = SOURCES[name]
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise ValueError(f"{name}: source sha256 {digest}, expected {sha256}")
    prompts = clean(parse(data.decode("utf-8")))
    if len(prompts) != count:
        raise ValueError(f"{name}: {len(prompts)} prompts, expected {count}")
    return "\n".join(prompts) + "\n"


def main(names: list[str]) -> None:
    for name in names or SOURCES:
        url = SOURCES[name][0]
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
        out = Path(__file__).with_name(f"{name}.txt")
        out.write_text(convert(name, data), encoding="utf-8")
        print(f"{out}: from {url} (sha256 {hashlib.sha256(data).hexdigest()})")


if __name__ == "__main__":
    main(sys.argv[1:])
