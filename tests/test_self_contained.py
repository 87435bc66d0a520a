"""The repository refers to nothing outside itself: no paths to folders beside it or on the machine that built it,
and every in-repository document that code or docs point to exists, anchors included."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {".git", ".venv", "build", "out", "runs", "__pycache__", ".pytest_cache", ".hypothesis"}
TEXT_EXT = (".py", ".md", ".txt", ".cpp", ".cu", ".h", ".tsv", ".cfg", ".toml", ".ini", ".yml", ".yaml", "")
# Spelled in pieces so this file does not match itself.
OUTSIDE = [re.compile(p) for p in (r"\.\./" + "shared", r"/" + "work/", r"\bSPEC" + r"(\.md|\s*§)",
                                   r"\b(DATASETS|KERNELS|STYLE)" + r"\.md", r"GPU" + "_NOTES")]


def text_files():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in files:
            if name == ".git":                                 # a worktree's pointer to its repository
                continue
            path = os.path.join(folder, name)
            if os.path.splitext(name)[1] in TEXT_EXT and os.path.getsize(path) < 2_000_000:
                try:
                    with open(path, encoding="utf-8") as f:
                        yield os.path.relpath(path, ROOT), f.read()
                except UnicodeDecodeError:
                    continue


def test_outside_reference_patterns_match_what_they_should():
    hits = ["see ../" + "shared/reference", "/" + "work/main/x", "SPEC" + " §4", "DATASETS" + ".md §5"]
    assert all(any(p.search(h) for p in OUTSIDE) for h in hits)
    assert not any(p.search("docs/design.md section 4; shared_with=") for p in OUTSIDE)


def test_nothing_points_outside_the_repository():
    found = [f"{rel}:{text[:m.start()].count(chr(10)) + 1}: {m.group(0)}"
             for rel, text in text_files() for p in OUTSIDE for m in p.finditer(text)]
    assert found == [], "references to material outside the repository:\n" + "\n".join(found)


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def anchors(path: str) -> set:
    with open(path, encoding="utf-8") as f:
        return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", f.read(), re.M)}


def test_slug_follows_github():
    assert slug("12. Where we follow the authors' code") == "12-where-we-follow-the-authors-code"
    assert slug("CelebAMask-HQ (`celebamask_hq`)") == "celebamask-hq-celebamask_hq"


@pytest.mark.parametrize("doc", ["README.md", "docs/design.md", "docs/datasets.md"])
def test_markdown_links_resolve(doc):
    path = os.path.join(ROOT, doc)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):                    # http(s) and the like
            continue
        file, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(dest):
            broken.append(target)
        elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
            broken.append(target)
    assert broken == [], f"{doc}: broken links {broken}"


def test_docs_named_in_code_exist():
    named = {m for _, text in text_files() for m in re.findall(r"\bdocs/[\w\-]+\.md", text)}
    assert named, "the code points at docs/*.md somewhere"
    missing = sorted(n for n in named if not os.path.exists(os.path.join(ROOT, n)))
    assert missing == [], f"documents named but absent: {missing}"
