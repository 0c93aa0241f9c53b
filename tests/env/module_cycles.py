"""Fails when the modules of a Rust crate depend on each other in a cycle.

Usage: module_cycles.py SRC_DIR...   (e.g. sidecar/src operator/src)

Modelled on `cargo modules dependencies --acyclic`, read from the source without type-checking:

- each file (`foo.rs`, `foo/mod.rs`) and each inline `mod name { ... }` is a module, named by its
  path (`crate::store::tiered`); `lib.rs` and `main.rs` are each the root of their own tree
  (main.rs reaches the library by the crate's name, which is outside its tree);
- A depends on B when A's code names an item of B: in a `use` (plain, `pub`, grouped) or in a
  path in the code (`crate::metrics::Source`, `super::sink::Sink`, `sink::Sink` for a child
  module, `store::Tiered` after `use crate::store`). A path names the longest prefix of it that
  is a module: `crate::store::ObjectInfo` names `crate::store`;
- declaring a child (`mod sink;`) is not a dependency; code and modules under `#[cfg(test)]`
  are left out, as cargo-modules leaves them out without `--cfg-test`.

Prints each cycle with the file of each module and the line where each names the next, and
exits 1 when a crate has a cycle. Standard library only.
"""

import re
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

TOKEN = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<line_comment>//[^\n]*)
    | (?P<block_comment>/\*)
    | (?P<raw_string>[bc]?r(?P<hashes>\#*)")
    | (?P<string>[bc]?"(?:\\.|[^"\\])*")
    | (?P<char>b?'(?:\\(?:x[0-9a-fA-F]{2}|u\{[0-9a-fA-F_]+\}|.)|[^\\'\n])')
    | (?P<lifetime>'[A-Za-z_]\w*)
    | (?P<ident>(?:r\#)?[A-Za-z_]\w*)
    | (?P<number>[0-9]\w*)
    | (?P<path_separator>::)
    | (?P<punct>.)
    """,
    re.VERBOSE | re.DOTALL,
)
IDENT = re.compile(r"[A-Za-z_]\w*")
BLOCK_COMMENT_DELIMITER = re.compile(r"/\*|\*/")
# After `#[cfg(test)]`, these start an item that ends at `;` or at its closing brace; anything
# else (a field, a variant, a match arm) may also end at a comma.
ITEM_KEYWORDS = {"fn", "impl", "mod", "struct", "enum", "trait", "use", "const", "static",
                 "type", "union", "macro_rules", "let", "extern", "async", "unsafe"}
OPENERS, CLOSERS = "([{", ")]}"


@dataclass(frozen=True)
class Token:
    text: str
    line: int


@dataclass(eq=False)
class Module:
    path: str  # crate::store::tiered
    file: Path
    child_dir: Path  # where the files of its `mod child;` declarations are
    parent: "Module | None"
    tokens: list = field(default_factory=list)  # its own code: no test code, no child's body
    children: dict = field(default_factory=dict)


def tokenize(source):
    """The identifiers, `::` and punctuation of Rust source; comments and literals dropped."""
    tokens, pos, line = [], 0, 1
    while pos < len(source):
        match = TOKEN.match(source, pos)
        kind, end = match.lastgroup, match.end()
        if kind == "block_comment":
            end = end_of_block_comment(source, end)
        elif kind == "raw_string":
            end = source.index('"' + match.group("hashes"), end) + 1 + len(match.group("hashes"))
        elif kind in ("ident", "path_separator", "punct"):
            tokens.append(Token(match.group().removeprefix("r#"), line))
        line += source.count("\n", pos, end)
        pos = end
    return tokens


def end_of_block_comment(source, pos):
    """The index after the block comment whose `/*` ends at pos; they nest in Rust."""
    depth = 1
    while depth:
        match = BLOCK_COMMENT_DELIMITER.search(source, pos)
        depth += 1 if match.group() == "/*" else -1
        pos = match.end()
    return pos


def is_cfg_test(tokens, i):
    return [t.text for t in tokens[i:i + 7]] == ["#", "[", "cfg", "(", "test", ")", "]"]


def end_of_group(tokens, i):
    """The index after the bracket group that opens at tokens[i]."""
    depth = 0
    for j in range(i, len(tokens)):
        depth += (tokens[j].text in OPENERS) - (tokens[j].text in CLOSERS)
        if depth == 0:
            return j + 1
    return len(tokens)


def end_of_test_item(tokens, i):
    """The index after the item that the `#[cfg(test)]` at tokens[i] switches off."""
    i += 7
    while i < len(tokens) and tokens[i].text == "#":  # its other attributes
        i = end_of_group(tokens, i + 1)
    start = i
    if i < len(tokens) and tokens[i].text == "pub":
        i += 1
        if i < len(tokens) and tokens[i].text == "(":
            i = end_of_group(tokens, i)
    is_item = i < len(tokens) and tokens[i].text in ITEM_KEYWORDS
    depth = 0
    for j in range(start, len(tokens)):
        text = tokens[j].text
        if text in CLOSERS:
            if depth == 0:  # the end of what encloses it
                return j
            depth -= 1
            if depth == 0 and text == "}":
                return j + 1
        elif text in OPENERS:
            depth += 1
        elif depth == 0 and (text == ";" or (text == "," and not is_item)):
            return j + 1
    return len(tokens)


def without_test_code(tokens):
    kept, i = [], 0
    while i < len(tokens):
        if is_cfg_test(tokens, i):
            i = end_of_test_item(tokens, i)
        else:
            kept.append(tokens[i])
            i += 1
    return kept


def load_module(path, file, child_dir, tokens, parent, modules):
    """Adds the module and its non-test children to `modules`, keyed by path."""
    module = Module(path, file, child_dir, parent)
    modules[path] = module
    depth, i = 0, 0
    while i < len(tokens):
        text = tokens[i].text
        depth += (text in OPENERS) - (text in CLOSERS)
        is_declaration = (depth == 0 and text == "mod" and i + 2 < len(tokens)
                          and IDENT.fullmatch(tokens[i + 1].text))
        if not is_declaration:
            module.tokens.append(tokens[i])
            i += 1
            continue
        name, after = tokens[i + 1].text, tokens[i + 2].text
        if after == "{":
            end = end_of_group(tokens, i + 2)
            body = tokens[i + 3:end - 1]
            child = load_module(f"{path}::{name}", file, child_dir / name, body, module, modules)
            i = end
        else:
            child = load_file_module(f"{path}::{name}", child_dir, name, module, modules)
            i += 3
        module.children[name] = child
    return module


def load_file_module(path, directory, name, parent, modules):
    for file, child_dir in ((directory / f"{name}.rs", directory / name),
                            (directory / name / "mod.rs", directory / name)):
        if file.is_file():
            tokens = without_test_code(tokenize(file.read_text()))
            return load_module(path, file, child_dir, tokens, parent, modules)
    sys.exit(f"{parent.file}: `mod {name};` has neither {directory / name}.rs nor "
             f"{directory / name}/mod.rs")


def resolve(module, segments, aliases):
    """The module a path written in `module` names (the longest prefix of it that is a module),
    and the segments after that prefix; None when the path leads out of the crate."""
    first, rest = segments[0], segments[1:]
    if first == "crate":
        target = module
        while target.parent:
            target = target.parent
    elif first == "self":
        target = module
    elif first == "super":
        target = module.parent
        while rest and rest[0] == "super" and target:
            target, rest = target.parent, rest[1:]
    elif first in module.children:
        target = module.children[first]
    elif first in aliases:
        target = aliases[first]
    else:
        return None, rest  # another crate, or something local
    while target and rest and rest[0] in target.children:
        target, rest = target.children[rest[0]], rest[1:]
    return target, rest


def use_leaves(tokens, i, prefix):
    """The paths (with their alias) of the use tree at tokens[i], and the index after it."""
    path = list(prefix)
    if tokens[i].text == "::":  # `use ::name::...` is another crate; no module is named ""
        path.append("")
        i += 1
    while True:
        text = tokens[i].text
        if text == "{":
            leaves, i = [], i + 1
            while tokens[i].text != "}":
                subtree, i = use_leaves(tokens, i, path)
                leaves += subtree
                i += tokens[i].text == ","
            return leaves, i + 1
        if text == "*":
            return [(path, None)], i + 1
        path.append(text)
        i += 1
        if tokens[i].text != "::":
            break
        i += 1
    if path[-1] == "self" and len(path) > 1:  # `use a::{self}` names `a`
        path.pop()
    alias = path[-1]
    if tokens[i].text == "as":
        alias, i = tokens[i + 1].text, i + 2
    return [(path, alias)], i


def dependencies(module, evidence):
    """Fills evidence with {each module that `module`'s code names: (line, the path written)},
    where it is first named; `use` declarations first, as they bring module names in scope."""
    tokens, aliases, in_use = module.tokens, {}, set()

    def depend_on(target, line, written):
        if target is not None and target is not module and target not in evidence:
            evidence[target] = (line, written)

    for i, token in enumerate(tokens):
        if token.text != "use":
            continue
        leaves, end = use_leaves(tokens, i + 1, [])
        in_use.update(range(i, end))
        for path, alias in leaves:
            target, rest = resolve(module, path, aliases)
            depend_on(target, token.line, "use " + "::".join(path))
            if target and not rest and alias not in (None, "_"):  # `use crate::store;`
                aliases[alias] = target
    for i, token in enumerate(tokens):
        starts_path = (i not in in_use and IDENT.fullmatch(token.text)
                       and i + 1 < len(tokens) and tokens[i + 1].text == "::"
                       and (i == 0 or tokens[i - 1].text != "::"))
        if not starts_path:
            continue
        segments = [token.text]
        j = i + 1
        while j + 1 < len(tokens) and tokens[j].text == "::" and IDENT.fullmatch(tokens[j + 1].text):
            segments.append(tokens[j + 1].text)
            j += 2
        depend_on(resolve(module, segments, aliases)[0], token.line, "::".join(segments))


def strongly_connected(graph):
    """Tarjan's strongly connected components of {node: {successor: ...}}."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = set()
            while not component or node not in component:
                component.add(stack.pop())
            on_stack.difference_update(component)
            components.append(component)

    for node in graph:
        if node not in index:
            visit(node)
    return components


def shortest_path(graph, start, goal, allowed):
    """The shortest path from start to goal through the allowed nodes (breadth first)."""
    previous, queue = {start: None}, deque([start])
    while queue:
        node = queue.popleft()
        if node is goal:
            path = []
            while node is not None:
                path.append(node)
                node = previous[node]
            return path[::-1]
        for successor in graph[node]:
            if successor in allowed and successor not in previous:
                previous[successor] = node
                queue.append(successor)


def cycles(graph):
    """For each dependency that is part of a cycle, the shortest cycle through it."""
    found = {}
    for component in strongly_connected(graph):
        for source in component:
            for target in graph[source]:
                if target in component:
                    cycle = [source] + shortest_path(graph, target, source, component)
                    first = min(range(len(cycle) - 1), key=lambda k: cycle[k].path)
                    rotated = cycle[first:-1] + cycle[:first] + [cycle[first]]
                    found[tuple(m.path for m in rotated)] = rotated
    return [found[key] for key in sorted(found, key=lambda key: (len(key), key))]


def check_crate(src):
    """Prints the crate's cycles, or that it has none; returns whether it has none."""
    graph = {}
    for root in ("lib.rs", "main.rs"):
        if (src / root).is_file():
            modules = {}
            tokens = without_test_code(tokenize((src / root).read_text()))
            load_module("crate", src / root, src, tokens, None, modules)
            for module in modules.values():
                graph[module] = {}
                dependencies(module, graph[module])
    edges = sum(len(targets) for targets in graph.values())
    found = cycles(graph)
    if not found:
        print(f"no cycles in {src} ({len(graph)} modules, {edges} edges)")
        return True
    plural = "s" if len(found) > 1 else ""
    print(f"{len(found)} cycle{plural} in {src} ({len(graph)} modules, {edges} edges):")
    for cycle in found:
        print("  " + " -> ".join(f"{m.path} ({m.file.relative_to(src)})" for m in cycle))
        for source, target in zip(cycle, cycle[1:]):
            line, written = graph[source][target]
            print(f"      {source.file.relative_to(src)}:{line}: {written}")
    return False


def main(arguments):
    if not arguments:
        sys.exit(__doc__.splitlines()[2])
    results = [check_crate(Path(src)) for src in arguments]
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main(sys.argv[1:])
