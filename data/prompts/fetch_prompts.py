"""Rebuild the real prompt sets of data/prompts from their public sources (SOURCES.md), with the standard library only.

    python data/prompts/fetch_prompts.py                               # every set
    python data/prompts/fetch_prompts.py hpsv2_anime                   # some
    python data/prompts/fetch_prompts.py --hub --check hpsv2_photo     # compare with the Hugging Face hub's file

Each source is downloaded, checked against its sha256 where one is pinned, converted to one prompt a line (line breaks
and tabs inside a prompt become spaces, leading and trailing whitespace is stripped, empty prompts are dropped, order
and duplicates are kept), checked against its expected count, and written as UTF-8 next to this script; the sha256 of
every downloaded file is printed.

The HPSv2 benchmark sets have two sources: the original files on the Hugging Face hub (zhwang/HPDv2,
`benchmark/<style>.json`, one JSON list each, at a pinned revision but with no sha256 known to us) and a third-party
GitHub copy of all four (one JSON object keyed by style, pinned by commit and sha256). The GitHub copy is used by
default; `--hub` takes the hub's files instead. `--check` writes nothing: it reports whether each rebuilt file equals
the one in place (exit status 1 if any differs), which is how the committed HPSv2 files can be verified against the
hub (`--hub --check hpsv2_anime hpsv2_concept_art hpsv2_paintings hpsv2_photo`).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

GITHUB = "https://raw.githubusercontent.com"
# the hub's benchmark prompt files have not changed since the commit that added them (260dbde, 2023-07-28)
HPDV2 = "https://huggingface.co/datasets/zhwang/HPDv2/resolve/260dbde75ab1c68e86d32a8e7739f1b49b100578/benchmark"
HPSV2_COPY = (
    f"{GITHUB}/xiaobingling93-pixel/Ascend-ModelZoo-PyTorch/1f0a317a8c1c61aee98e0dce0cee4dfda0343126"
    "/MindIE/MindIE-Torch/built-in/foundation/stable_diffusion_xl/hpsv2_benchmark_prompts.json"
)
HPSV2_COPY_SHA256 = "ce6e0af81cbb36c61bc421764533d74e69a2bd665e608f52f6a0d94f578387b2"
HPSV2_STYLES = ("anime", "concept-art", "paintings", "photo")


def _tsv_first_column(text: str) -> list[str]:
    """PartiPrompts.tsv: a header `Prompt<TAB>Category<TAB>Challenge<TAB>Note`, no quoting; the Prompt column."""
    header, *rows = text.splitlines()
    if not header.startswith("Prompt\t"):
        raise ValueError(f"unexpected header {header!r}")
    return [row.split("\t")[0] for row in rows]


def _string_list(value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ValueError("not a JSON list of strings")
    return value


def _json_list(text: str) -> list[str]:
    """An HPSv2 benchmark file of the hub: a JSON list of prompt strings."""
    return _string_list(json.loads(text))


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):  # an earlier version of the GitHub copy had "concept-art" twice, no "paintings"
        raise ValueError(f"repeated JSON keys in {keys}")
    return dict(pairs)


def _json_style(style: str, text: str) -> list[str]:
    """The GitHub copy of the HPSv2 benchmark: one JSON object, style -> list of prompt strings; one style's list."""
    styles = json.loads(text, object_pairs_hook=_unique_keys)
    if not isinstance(styles, dict) or style not in styles:
        raise ValueError(f"no style {style!r} in the JSON object")
    return _string_list(styles[style])


Source = tuple[str, str | None, Callable[[str], list[str]], int]  # url, sha256 (None: not pinned), parser, count

# the original sources: name -> Source
SOURCES: dict[str, Source] = {
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
    **{f"hpsv2_{style.replace('-', '_')}": (f"{HPDV2}/{style}.json", None, _json_list, 800) for style in HPSV2_STYLES},
}

# copies pinned by sha256, used instead of the original (no sha256 known) unless --hub: name -> Source
COPIES: dict[str, Source] = {
    f"hpsv2_{style.replace('-', '_')}": (
        HPSV2_COPY,
        HPSV2_COPY_SHA256,
        functools.partial(_json_style, style),
        800,
    )
    for style in HPSV2_STYLES
}


def clean(prompts: list[str]) -> list[str]:
    """One line per prompt: inner line breaks and tabs to spaces, outer whitespace stripped, empty prompts dropped."""
    flat = (p.replace("\r", " ").replace("\n", " ").replace("\t", " ").strip() for p in prompts)
    return [p for p in flat if p]


def convert(name: str, data: bytes, copy: bool = False) -> str:
    """The prompt file's text for a downloaded source (the original, or the pinned copy if `copy`); ValueError if its
    hash or prompt count is not the expected."""
    _, sha256, parse, count = (COPIES if copy else SOURCES)[name]
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise ValueError(f"{name}: source sha256 {digest}, expected {sha256}")
    prompts = clean(parse(data.decode("utf-8")))
    if len(prompts) != count:
        raise ValueError(f"{name}: {len(prompts)} prompts, expected {count}")
    return "\n".join(prompts) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"default: all of {', '.join(SOURCES)}")
    parser.add_argument("--hub", action="store_true", help="HPSv2 sets from the Hugging Face hub, not the GitHub copy")
    parser.add_argument("--check", action="store_true", help="compare with the files in place instead of writing")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in SOURCES]
    if unknown:
        parser.error(f"unknown sets {unknown}; known: {list(SOURCES)}")
    downloads: dict[str, bytes] = {}  # the GitHub copy holds all four HPSv2 sets: downloaded once
    differ = False
    for name in args.names or SOURCES:
        copy = name in COPIES and not args.hub
        url = (COPIES if copy else SOURCES)[name][0]
        if url not in downloads:
            with urllib.request.urlopen(url, timeout=60) as response:
                downloads[url] = response.read()
        data = downloads[url]
        text = convert(name, data, copy)
        out = Path(__file__).with_name(f"{name}.txt")
        source = f"from {url} (sha256 {hashlib.sha256(data).hexdigest()})"
        if args.check:
            same = out.is_file() and out.read_bytes() == text.encode("utf-8")
            differ |= not same
            print(f"{out}: {'same as' if same else 'DIFFERS from'} the set made {source}")
        else:
            out.write_bytes(text.encode("utf-8"))
            print(f"{out}: {source}")
    return int(differ)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
