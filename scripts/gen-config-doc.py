#!/usr/bin/env python3
"""Regenerates the key tables of docs/CONFIG.md from config/pitboss.toml.

Run after changing config/pitboss.toml:  python3 scripts/gen-config-doc.py
The text before the first table and the "Cross-key rules" section are kept as they
are. `cargo test` checks that every key of the default config is documented.
"""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "config", "pitboss.toml")
DOC = os.path.join(ROOT, "docs", "CONFIG.md")


def tables(lines):
    out, rows, comment, section = [], [], [], None
    for line in lines:
        s = line.strip()
        m = re.match(r"^\[(.+)\]$", s)
        if m:
            if rows:
                out += rows + [""]
                rows = []
            section, comment = m.group(1), []
            out += ["## `[%s]`" % section, "", "| key | default | meaning |", "|-----|---------|---------|"]
            continue
        if s.startswith("#"):
            comment.append(s.lstrip("#").strip())
            continue
        m = re.match(r"^(\w+)\s*=\s*(.+)$", s)
        if m and section:
            key, val = m.groups()
            rows.append("| `%s.%s` | `%s` | %s |" % (section, key, val.replace("|", "\\|"),
                                                    " ".join(comment).replace("|", "\\|")))
            comment = []
    return out + rows + [""]


def main():
    doc = open(DOC).read()
    head = doc[:doc.index("## `[server]`")]
    tail = doc[doc.index("## Cross-key rules"):]
    body = "\n".join(tables(open(CONFIG).read().splitlines()))
    open(DOC, "w").write(head + body + "\n" + tail)


if __name__ == "__main__":
    main()
