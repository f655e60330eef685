"""The three text-classification tasks of `make bench-quality`, built offline from what the machine
already holds, with deterministic splits.

  debian   a Debian package's one-line description -> its archive section (10 sections), from the
           package lists of apt (`apt-cache dumpavail`). The split is by source package, so that the
           binaries of one source ("foo - data files", "foo - runtime") never straddle it.
  man      a man page's NAME line and first DESCRIPTION paragraph -> its section (1, 2, 3, 5, 7, 8),
           from /usr/share/man (English pages, roff stripped; no SYNOPSIS, which would give the
           section away), without the Google Cloud SDK's ~16,000 generated pages. Split by page
           family (git-add and git-commit go together).
  pydoc    a docstring of the Python standard library -> the top-level package it comes from
           (8 packages), parsed with ast from the stdlib of the Python that runs the benchmark.

Each task is sorted, deduplicated (a text with two labels is dropped), and split per class with a
fixed seed: whole groups (at most PER_GROUP texts of each) go to the test set until it has its
number per class, then to the training set up to its cap. The tasks hold what this machine's image holds: the JSON that the
benchmark writes records each task's sizes and the sha256 of its examples, so that two runs can be
told apart when the data differs.
"""

import ast
import collections
import gzip
import hashlib
import json
import random
import re
import subprocess
import sysconfig
from pathlib import Path

SEED = 20250101
PER_GROUP = 8  # at most this many texts from one group (source package, page family)

# name: (classes, test examples per class, at most this many training examples per class)
SPEC = {
    "debian": (["admin", "devel", "games", "graphics", "net", "science", "sound", "text", "utils", "x11"], 60, 240),
    "man": (["1", "2", "3", "5", "7", "8"], 80, 300),
    "pydoc": (["asyncio", "email", "importlib", "logging", "multiprocessing", "tkinter", "unittest", "xml"], 60, 240),
}

MAX_CHARS = 400  # longer texts are cut (the tokenizer cuts again at the model's max_len)


def _norm(text):
    return re.sub(r"\s+", " ", text).strip()[:MAX_CHARS]


def debian_examples():
    """(group, text, label): group is the source package."""
    out = subprocess.run(["apt-cache", "dumpavail"], check=True, capture_output=True, text=True).stdout
    if "Package:" not in out:
        raise SystemExit("bench-quality: apt has no package lists; run `apt-get update` once")
    wanted = set(SPEC["debian"][0])
    seen = {}
    for stanza in out.split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        name, section, desc = fields.get("Package"), fields.get("Section"), fields.get("Description")
        if not name or section not in wanted or not desc:
            continue
        source = fields.get("Source", name).split()[0]
        seen.setdefault(name, (source, _norm(desc), section))  # one stanza per package name
    return list(seen.values())


_ROFF_ESC = [
    (re.compile(r"\\f(\[[^]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\s[+-]?\d"), ""),
    (re.compile(r"\\\*(\[[^]]*\]|\(..|.)"), ""),  # strings
    (re.compile(r"\\\((em|en|hy)"), "-"),
    (re.compile(r"\\\(..|\\\[[^]]*\]"), ""),
    (re.compile(r"\\[-&|^%:]"), lambda m: "-" if m.group(0) == "\\-" else ""),
    (re.compile(r"\\e"), "\\\\"),
    (re.compile(r'\\".*'), ""),
]


def _roff_text(line):
    if line.startswith((".", "'")):
        macro, _, rest = line[1:].partition(" ")
        if macro.strip() not in ("B", "I", "BR", "BI", "IR", "IB", "RB", "RI", "SM", "SB"):
            return None  # a request or a paragraph macro: no text of its own
        line = rest.replace('"', "")
    for pattern, repl in _ROFF_ESC:
        line = pattern.sub(repl, line)
    return line


def _man_sections(raw):
    """{SECTION NAME: [paragraphs]} of a man(7) page."""
    sections, name, para = collections.defaultdict(list), None, []

    def flush():
        if name is not None and para:
            sections[name].append(_norm(" ".join(para)))
        para.clear()

    for line in raw.splitlines():
        if line.startswith((".SH", ".Sh")):
            flush()
            name = line[3:].strip().strip('"').upper()
            continue
        if re.match(r"^\.(PP|P|LP|TP|IP|HP|sp|br|Pp)\b", line) or not line.strip():
            flush()
            continue
        text = _roff_text(line)
        if text:
            para.append(text)
    flush()
    return sections


def man_examples(root=Path("/usr/share/man")):
    out = []
    for section in SPEC["man"][0]:
        folder = root / f"man{section}"
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.is_symlink() or not path.name.endswith(".gz") or path.name.startswith("gcloud"):
                continue  # (the Google Cloud SDK's ~16,000 generated pages would be most of section 1)
            try:
                raw = gzip.decompress(path.read_bytes()).decode("utf-8", "replace")
            except (OSError, EOFError):
                continue
            if raw.lstrip().startswith(".so ") or "\n.so " in raw[:200]:
                continue  # a redirect to another page
            secs = _man_sections(raw)
            name = " ".join(secs.get("NAME", []))
            desc = (secs.get("DESCRIPTION") or [""])[0]
            if " - " in name:
                name = name.split(" - ", 1)[1]
            text = _norm(f"{name}. {desc}")
            if len(text) >= 40:
                out.append((re.split(r"[-_.]", path.name)[0], text, section))  # git-add -> git
    return out


def pydoc_examples():
    lib = Path(sysconfig.get_paths()["stdlib"])
    wanted = set(SPEC["pydoc"][0])
    out = []
    for path in sorted(lib.rglob("*.py")):
        rel = path.relative_to(lib).parts
        top = rel[0].removesuffix(".py")
        if top not in wanted or "test" in rel or "tests" in rel:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 30:
                    out.append((f"{'/'.join(rel)}:{getattr(node, 'lineno', 0)}", _norm(doc), top))
    return out


BUILDERS = {"debian": debian_examples, "man": man_examples, "pydoc": pydoc_examples}


def split(name, examples):
    """Deduplicate, then a seeded per-class split by group: {"train": [...], "test": [...]}."""
    classes, n_test, n_train = SPEC[name]
    labels_of = collections.defaultdict(set)
    for _, text, label in examples:
        labels_of[text].add(label)
    groups = collections.defaultdict(lambda: collections.defaultdict(set))  # label -> group -> texts
    for group, text, label in examples:
        if len(labels_of[text]) == 1:
            groups[label][group].add(text)
    rng = random.Random(f"{SEED}/{name}")
    taken = set()
    train, test = [], []
    for label in classes:
        keys = sorted(groups[label])
        rng.shuffle(keys)
        picked_test, picked_train = [], []
        for key in keys:
            texts = [t for t in sorted(groups[label][key]) if t not in taken]
            taken.update(texts)
            texts = texts[:PER_GROUP]
            if len(picked_test) < n_test:
                picked_test.extend(texts)
            elif len(picked_train) < n_train:
                picked_train.extend(texts)
        test += [(t, label) for t in picked_test[:n_test]]
        train += [(t, label) for t in picked_train[:n_train]]
    rng.shuffle(train)
    return {"classes": classes, "train": train, "test": test}


def load(name, cache_dir):
    """The task, built once and cached as JSON under cache_dir."""
    path = Path(cache_dir) / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    task = split(name, BUILDERS[name]())
    body = json.dumps({"train": task["train"], "test": task["test"]}, sort_keys=True).encode()
    task["sha256"] = hashlib.sha256(body).hexdigest()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(task))
    return task


if __name__ == "__main__":
    import sys

    for name in sys.argv[1:] or BUILDERS:
        task = split(name, BUILDERS[name]())
        counts = collections.Counter(label for _, label in task["train"])
        print(name, "train", len(task["train"]), "test", len(task["test"]), dict(sorted(counts.items())))
        for text, label in task["test"][:: max(1, len(task["test"]) // 4)]:
            print(f"  [{label}] {text[:150]}")
