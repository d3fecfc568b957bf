#!/usr/bin/env python3
"""The import graph of src/, checked against the codemap's order.

The codemap (the `# Codemap` section of src/lib.rs's crate docs) lists the top-level
modules from the top of the stack to the bottom; a module may use only modules listed
below it (Architecture invariant: the import graph has no upward edge). This script
reads every `crate::` path outside comments (`use crate::a::b;`, `use crate::{a, b::c};`
and paths in code alike), keeps the edges between top-level modules, and exits 1 on an
upward edge, a module the codemap does not list, or a codemap entry that is not a
module. Modules on one codemap line are still ordered: the first named is the upper.

    .ci/import_graph.py           check; print the upward edges found
    .ci/import_graph.py --list    also print the graph, one module and its uses a line
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC = ROOT / "src"


def modules():
    """The crate's top-level modules, from `pub mod x;` / `mod x;` lines in lib.rs."""
    text = (SRC / "lib.rs").read_text()
    return re.findall(r"^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+([a-z_][a-z0-9_]*)\s*;", text, re.M)


def codemap_order(known):
    """Top-level modules in the order the codemap first names them."""
    text = (SRC / "lib.rs").read_text()
    docs = "\n".join(line[3:].removeprefix(" ") for line in text.splitlines() if line.startswith("//!"))
    start = docs.find("# Codemap")
    end = docs.find("\n# ", start + 1)
    if start < 0:
        sys.exit("src/lib.rs has no '# Codemap' section")
    section = docs[start:end if end > 0 else len(docs)]
    # The order is the bullet list's; the prose above it names modules in passing.
    first_bullet = re.search(r"^- ", section, re.M)
    if first_bullet is None:
        sys.exit("the codemap in src/lib.rs has no bullet list")
    section = section[first_bullet.start():]
    order = []
    for link in re.findall(r"\[`([A-Za-z_][A-Za-z0-9_:]*)`\]", section):
        top = link.split("::")[0]
        if top in known and top not in order:
            order.append(top)
    return order


def strip_comments(text):
    """The code without `//` comments and string literals (doc links are not imports)."""
    out = []
    for line in text.splitlines():
        line = re.sub(r'"(?:[^"\\]|\\.)*"', '""', line)
        cut = line.find("//")
        out.append(line if cut < 0 else line[:cut])
    text = "\n".join(out)
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def group_heads(text, open_at):
    """The first path segment of each item in the `{...}` group opening at `open_at`."""
    depth, item, heads = 0, "", []
    for ch in text[open_at:]:
        if ch == "{":
            depth += 1
            if depth == 1:
                continue
        elif ch == "}":
            depth -= 1
            if depth == 0:
                heads.append(item)
                break
        if depth == 1 and ch == ",":
            heads.append(item)
            item = ""
        elif depth >= 1:
            item += ch
    return [re.split(r"::|\s", h.strip())[0] for h in heads if h.strip()]


def uses(path):
    """Top-level modules a file names through `crate::`."""
    text = strip_comments(path.read_text())
    found = set()
    for m in re.finditer(r"\bcrate::(\{|[a-z_][a-z0-9_]*)", text):
        if m.group(1) == "{":
            found.update(group_heads(text, m.start(1)))
        else:
            found.add(m.group(1))
    return found


def owner(path):
    """The top-level module a source file belongs to (None: lib.rs, main.rs)."""
    rel = path.relative_to(SRC).parts
    if len(rel) == 1:
        name = rel[0][:-3]
        return None if name in ("lib", "main") else name
    return rel[0]


def main():
    known = modules()
    order = codemap_order(known)
    problems = []
    for name in known:
        if name not in order:
            problems.append(f"module `{name}` is not named in the codemap (src/lib.rs)")
    rank = {name: i for i, name in enumerate(order)}
    graph = {name: set() for name in order}
    for path in sorted(SRC.rglob("*.rs")):
        top = owner(path)
        if top is None or top not in rank:
            continue
        for used in uses(path):
            if used == top or used in ("self", "super"):
                continue
            if used not in rank:
                continue  # a crate-root item (e.g. `crate::Server`), not a module
            graph[top].add(used)
            if rank[used] < rank[top]:
                problems.append(
                    f"upward edge: {path.relative_to(ROOT)} ({top}) uses `{used}`, "
                    f"which the codemap lists above it"
                )
    if "--list" in sys.argv:
        for name in order:
            below = sorted(graph[name], key=rank.get)
            print(f"{name} -> {', '.join(below) if below else '(nothing)'}")
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"import graph: {len(order)} modules, "
          f"{sum(len(v) for v in graph.values())} edges, none upward")


if __name__ == "__main__":
    main()
