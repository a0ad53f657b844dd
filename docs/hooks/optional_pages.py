"""mkdocs hook: nav entries for pages that other branches add are optional until their file exists.

A page listed in ``OPTIONAL_PAGES`` but absent from ``docs/`` is dropped from the nav with an INFO line, so
``mkdocs build --strict`` passes before the page arrives; once the file is added it appears where the nav
puts it. Every other nav entry must exist (a missing one fails the strict build as usual).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.optional_pages")

OPTIONAL_PAGES = {
    "noise.md",
    "fsdp.md",
    "integrations.md",
    "speed.md",
    "coverage.md",
    "rules.md",
    "contract.md",
    "spot-check.md",
}


def _prune(items: list[Any], docs: Path) -> list[Any]:
    kept = []
    for item in items:
        target = next(iter(item.values())) if isinstance(item, dict) else item
        if isinstance(target, list):
            target = _prune(target, docs)
            if not target:
                continue
            item = {next(iter(item)): target} if isinstance(item, dict) else target
        elif isinstance(target, str) and target in OPTIONAL_PAGES and not (docs / target).is_file():
            log.info("optional page %s is not in docs/ yet: left out of the nav", target)
            continue
        kept.append(item)
    return kept


def on_config(config: Any) -> Any:
    if config.nav:
        config.nav = _prune(config.nav, Path(config.docs_dir))
    return config
