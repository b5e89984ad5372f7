"""Where benchmark sections go: appended to benchmarks/RESULTS.md, each headed with its machine and date."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def append_section(lines: list[str]) -> None:
    """Print a section and append it to RESULTS.md (created with its title if absent)."""
    text = "\n".join(lines) + "\n\n"
    print(text)
    RESULTS.write_text((RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n") + text)
