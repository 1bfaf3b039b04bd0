"""mkdocs hook: the cluster guides (docs/cluster-*.md) join the nav as they are added, under
"Cluster guides", before "Performance"; each is titled by its first heading."""

from __future__ import annotations

from pathlib import Path

SECTION = "Cluster guides"
BEFORE = "Performance"


def on_config(config):
    guides = sorted(p.name for p in Path(config["docs_dir"]).glob("cluster-*.md"))
    nav = config["nav"]
    if not guides or nav is None:
        return config
    titles = [next(iter(entry)) if isinstance(entry, dict) else None for entry in nav]
    if SECTION in titles:
        return config
    at = titles.index(BEFORE) if BEFORE in titles else len(nav)
    nav.insert(at, {SECTION: guides})
    return config
