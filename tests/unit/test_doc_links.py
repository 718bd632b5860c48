"""The documentation's relative links, anchors and named doc files all resolve.

Links are checked as GitHub renders them: a relative path from the Markdown file's own folder, an
anchor made from a heading (lower case, punctuation dropped, spaces to hyphens, -1, -2 for repeats).
Paths like `docs/x.md` written as plain text in the docs, the code, the configs and the Slurm
scripts are checked from the repository root, so a reference to a moved or missing doc fails here.
"""

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", ".venv", "runs", "gpu_bundle", "gpu_check_out", "node_modules", "__pycache__"}
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
DOC_PATH = re.compile(r"(?<![\w./-])((?:docs|slurm)/[\w.-]+\.(?:md|png))(?![\w/])")  # the project's own, flat
CODE_SUFFIXES = {".py", ".sh", ".sbatch", ".yaml", ".toml"}


def project_files(suffixes):
    """The checkout's files with these suffixes, never descending into the venv, runs or caches."""
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if Path(name).suffix in suffixes:
                yield Path(folder) / name


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans (whose brackets are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.replace("`", "").strip().lower())
    return text.replace(" ", "-")


def anchors(md: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    text = re.sub(r"^```.*?^```", "", md.read_text(), flags=re.S | re.M)
    for match in re.finditer(r"^#{1,6} +(.+?) *#* *$", text, flags=re.M):
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def broken_links(md: Path) -> list[str]:
    errors = []
    for target in LINK.findall(prose(md.read_text())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        dest = (md.parent / path_part).resolve() if path_part else md
        where = f"{md.relative_to(ROOT)}: ({target})"
        if not dest.exists():
            errors.append(f"{where}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            errors.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    return errors


def test_slug_matches_githubs_rules():
    assert slug("Run the paper's config") == "run-the-papers-config"
    assert slug("kill -9 at any moment, then the same command") == "kill--9-at-any-moment-then-the-same-command"
    assert slug("2026-12-02: The quickstart, three seeds") == "2026-12-02-the-quickstart-three-seeds"
    assert slug("Inheritance and `--dry-run`") == "inheritance-and---dry-run"


def test_relative_links_and_anchors_resolve():
    docs = list(project_files({".md"}))
    assert ROOT / "README.md" in docs and len(docs) >= 5
    errors = [e for md in docs for e in broken_links(md)]
    assert not errors, "\n".join(errors)


def test_doc_paths_named_in_text_exist():
    errors = []
    for path in [*project_files({".md"}), *project_files(CODE_SUFFIXES)]:
        if path == Path(__file__):
            continue
        for name in DOC_PATH.findall(path.read_text(errors="replace")):
            if not (ROOT / name).exists():
                errors.append(f"{path.relative_to(ROOT)}: names {name}, which does not exist")
    assert not errors, "\n".join(errors)
