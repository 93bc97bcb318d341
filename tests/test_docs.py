"""The manual (README.md and docs/**/*.md) against the code: links, commands, config keys, layout.

What is checked, all in this process (a few seconds, one Hydra composition):

- Links: every relative Markdown link `[text](target)` (and reference definition `[id]: target`)
  outside code resolves to an existing file or directory; a `#anchor` into a Markdown file (or
  into the same file) names one of its headings, by GitHub's rule (lowercase; spaces to '-';
  punctuation other than '-' and '_' dropped; a repeated heading gets -1, -2, ...). Skipped:
  absolute URLs (http:, https:, mailto:) and anchors into non-Markdown files.
- Commands: every `sdrun <word>` in command position inside code (fenced blocks and inline
  spans: at the start of a line or span, after `$ `, a path such as `.venv/bin/`,
  `--no-python`, `time` or a shell separator) names a subcommand of sdrun.cli.COMMANDS. Prose
  is not read (it says "sdrun offers ..."), nor words inside a code line ("imports no sdrun
  module"); paths and modules (`sdrun/...`, `sdrun.x`) are not commands.
- Config keys: in code, every word of the form `key=value` after `sdrun train` (to the end of
  the line or span, before a `#` comment), and every inline span made only of such words
  (`dataset.check_md5=false`), must be a key of the composed config (tests.conftest.compose_cfg,
  looked up with OmegaConf.select, so `optim.milestones` and `resume` (null) both count).
  Handled differently:
    * group selections `dataset=`, `experiment=`, `fidelity=`, `hydra/launcher=` (and any
      other `a/b=` group): every option named (a sweep's comma list, one by one) must be one
      Hydra's config loader offers for that group (conf/ plus the launcher plugins' configs);
      `a|b` lists alternatives, an upper-case option (`experiment=NAME`) is a placeholder;
    * `hydra.*` keys are Hydra's own config (run dirs, sweeper, launcher fields), not sdrun's:
      skipped;
    * `+key=`, `++key=`, `~key` add or delete keys on purpose: skipped;
    * flags (`-m`, `--cfg`), upper-case words (environment variables such as
      `HYDRA_FULL_ERROR=1`) and anything that is not `name=value`: not config keys, skipped;
    * REMOVED_KEYS (`bf16`, `compile`): the docs name them as gone, so they must NOT be keys
      (a shim coming back, or the docs calling a live key removed, fails).
  Values are not checked (the docs use placeholders: DIR, N, K, ...).
- Paths: every repository path inside code (`sdrun/engine/loop.py`, `conf/experiment/`,
  `scripts/...`, `tests/...`, `docs/...`) exists, so a moved module cannot linger in the docs.
  Skipped: globs and placeholders (`docs/**/*.md`, `<preset>`, an upper-case segment such as
  `DATE_GPU`) and future GPU report folders (`docs/gpu/2026-12-01_H200/`, the runbook's example).
- docs/config.md names every key of the composed config ("every key" stays true).
- docs/development.md's layout block lists every module under sdrun/ (`__init__.py` aside)
  and no path that does not exist.

test_the_checks_can_fail feeds each checker a deliberately broken line.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
REMOVED_KEYS = {"bf16", "compile"}  # docs/config.md "Removed keys": Hydra's unknown-key error now
GROUPS = ("dataset", "experiment", "fidelity")  # root-level groups selected as `group=option`

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
SPAN = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"(?<!!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFDEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t#]*$", re.M)
# `sdrun WORD` where a command starts: a line's or span's start (after an optional `$ `), after
# a path (.venv/bin/sdrun), `--no-python`, `time`, or a shell separator.
COMMAND = re.compile(r"(?:^[ \t]*(?:\$[ \t]+)?|/|--no-python[ \t]+|\btime[ \t]+|[;&|(][ \t]*)sdrun[ \t]+([a-z][a-z_-]*)",
                     re.M)
TRAIN = re.compile(r"(?<![\w.\-])sdrun[ \t]+train\b(.*)")
PATH = re.compile(r"(?<![\w./-])((?:sdrun|conf|scripts|tests|docs)/[\w./*<>{}-]*)")
ASSIGN = re.compile(r"^([+~]{0,2})([A-Za-z_][\w.\-]*(?:/[\w.\-]+)*)=(.*)$")


# ---------------------------------------------------------------- reading Markdown

def split_code(text: str) -> tuple[str, list[str], list[str]]:
    """(prose with code removed, fenced blocks' lines, inline spans)."""
    blocks = []

    def keep_block(m):
        blocks.extend(m.group(0).splitlines()[1:-1])
        return "\n" * m.group(0).count("\n")

    rest = FENCE.sub(keep_block, text)
    spans = [m.group(2).strip() for m in SPAN.finditer(rest)]
    prose = SPAN.sub(" ", rest)
    return prose, blocks, spans


def code_lines(text: str) -> list[str]:
    _, blocks, spans = split_code(text)
    return blocks + spans


def github_anchor(heading: str) -> str:
    """GitHub's heading id: inline markup and links reduced to their text, lowercased, spaces to
    '-', every character that is not a letter, digit, '-', '_' or space dropped."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = text.replace("`", "").lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in "-_ ")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), path.read_text())  # a '#' line in a shell block is no heading
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(prose):
        base = github_anchor(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


# ---------------------------------------------------------------- the checks

def link_problems(path: Path, text: str) -> list[str]:
    prose, _, _ = split_code(text)
    targets = [m.group(1) for m in LINK.finditer(prose)] + [m.group(1) for m in REFDEF.finditer(prose)]
    problems = []
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = path if not file_part else (path.parent / file_part).resolve()
        if not dest.exists():
            problems.append(f"{target}: no such file or directory")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: no heading #{anchor} in {dest.name}")
    return problems


def path_problems(text: str) -> list[str]:
    problems = []
    for line in code_lines(text):
        for m in PATH.finditer(line):
            path = m.group(1).rstrip(".,;:")
            if (re.search(r"[*<>{}]", path) or any(part.isupper() for part in re.split(r"[/.]", path))
                    or re.match(r"docs/gpu/\d{4}-\d{2}-\d{2}_", path)):
                continue
            if not (ROOT / path).exists():
                problems.append(f"{path}: no such file or directory")
    return problems


def command_problems(text: str, commands) -> list[str]:
    return [f"sdrun {m.group(1)}: not a subcommand (sdrun.cli.COMMANDS)"
            for line in code_lines(text) for m in COMMAND.finditer(line) if m.group(1) not in commands]


def assignments(text: str) -> list[str]:
    """The `key=value` words the docs set: after `sdrun train` in code, and inline spans that are
    nothing but such words."""
    words = []
    _, blocks, spans = split_code(text)
    for line in blocks + spans:
        for m in TRAIN.finditer(line):
            words += _words(m.group(1).split(" #")[0])
    for span in spans:
        ws = span.split()
        if ws and all(ASSIGN.match(w) and not w.split("=")[0].isupper() for w in ws):
            words += ws
    return words


def _words(tail: str) -> list[str]:
    out = []
    for w in tail.split():
        w = w.strip("'\"")
        if w.startswith("-") or w in ("|", "&&", ";", ">", "2>&1") or w.startswith(("$", ">")):
            continue
        out.append(w)
    return out


def key_problems(words: list[str], cfg, group_options, removed=frozenset(REMOVED_KEYS)) -> list[str]:
    problems = []
    for word in words:
        m = ASSIGN.match(word)
        if not m:
            continue
        prefix, key, value = m.groups()
        if prefix or key.isupper() or key == "hydra" or key.startswith("hydra."):
            continue
        if "/" in key or key in GROUPS:
            options = group_options(key)
            for option in (v.strip("'\"[]") for v in re.split(r"[,|]", value)):
                if option and not option.isupper() and option not in options:
                    problems.append(f"{key}={option}: no such option (there are: {', '.join(sorted(options))})")
            continue
        missing = OmegaConf.select(cfg, key, default=_MISSING) is _MISSING
        if key in removed:
            if not missing:
                problems.append(f"{key}: the docs call it removed, but it is a config key")
        elif missing:
            problems.append(f"{key}: not a key of the composed config ({word})")
    return problems


_MISSING = object()


# ---------------------------------------------------------------- the config, composed once

@lru_cache(maxsize=1)
def composed():
    from tests.conftest import compose_cfg

    return compose_cfg()


@lru_cache(maxsize=None)
def group_options(group: str) -> frozenset[str]:
    import sdrun.launch.launchers  # noqa: F401 (registers hydra/launcher=parallel's schema)
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from sdrun.launch.compose import register_configs

    register_configs()
    with initialize_config_module("sdrun.conf", version_base="1.3"):
        return frozenset(GlobalHydra.instance().config_loader().get_group_options(group))


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---------------------------------------------------------------- the tests

def test_there_are_docs_to_check():
    names = {rel(p) for p in DOCS}
    assert {"README.md", "docs/config.md", "docs/development.md"} <= names


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_relative_links_resolve(path):
    assert link_problems(path, path.read_text()) == []


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_named_paths_exist(path):
    assert path_problems(path.read_text()) == []


def test_named_subcommands_exist():
    from sdrun.cli import COMMANDS

    problems = {rel(p): command_problems(p.read_text(), COMMANDS) for p in DOCS}
    assert {k: v for k, v in problems.items() if v} == {}
    assert sum(len(COMMAND.findall("\n".join(code_lines(p.read_text())))) for p in DOCS) > 20  # it looked


def test_named_config_keys_exist():
    cfg = composed()
    problems, checked = {}, 0
    for p in DOCS:
        words = [w for w in assignments(p.read_text()) if ASSIGN.match(w)]
        checked += len(words)
        if found := key_problems(words, cfg, group_options):
            problems[rel(p)] = found
    assert problems == {}
    assert checked > 100  # it looked


def unnamed_keys(config_page: str, cfg) -> list[str]:
    from sdrun.config import flatten, to_plain

    named = set(re.findall(r"`([A-Za-z_][\w.]*)`", config_page))
    return sorted(set(flatten(to_plain(cfg))) - named)


def layout_problems(development_page: str) -> list[str]:
    layout = development_page.split("## Layout", 1)[1].split("```", 2)[1]
    listed = set(re.findall(r"^(sdrun/\S+)", layout, re.M))
    modules = {rel(p) for p in (ROOT / "sdrun").rglob("*.py") if p.name != "__init__.py"}
    return ([f"{m}: missing from the layout" for m in sorted(modules - listed)]
            + [f"{p}: listed, but there is no such path" for p in sorted(listed) if not (ROOT / p).exists()])


def test_config_page_names_every_key():
    assert unnamed_keys((ROOT / "docs" / "config.md").read_text(), composed()) == []


def test_layout_lists_every_module():
    assert layout_problems((ROOT / "docs" / "development.md").read_text()) == []


def test_the_checks_can_fail(tmp_path):
    """Each checker, given a deliberately broken copy of real docs, reports the break."""
    from sdrun.cli import COMMANDS

    # A copy of the real README beside a real docs/config.md, with two broken links added.
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "config.md").write_text((ROOT / "docs" / "config.md").read_text())
    readme = (ROOT / "README.md").read_text()
    copy = tmp_path / "README.md"
    ok = [*link_problems(ROOT / "README.md", readme)]
    broken = readme + ("\n[gone](docs/nope.md) [bad anchor](docs/config.md#no-such-heading) "
                       "[fine](docs/config.md#every-key) [self](#manual) [self, bad](#no-manual)\n")
    copy.write_text(broken)
    found = link_problems(copy, broken)
    assert ok == [] and "docs/nope.md: no such file or directory" in found
    assert "docs/config.md#no-such-heading: no heading #no-such-heading in config.md" in found
    assert "#no-manual: no heading #no-manual in README.md" in found
    assert not [f for f in found if "every-key" in f or f.startswith("#manual")]

    assert path_problems("Code: `sdrun/train.py`, `sdrun/engine/loop.py`, `docs/gpu/DATE_GPU/`.") == [
        "sdrun/train.py: no such file or directory"]

    assert command_problems("```sh\nsdrun trian dataset=cifar10\n```\n", COMMANDS) == [
        "sdrun trian: not a subcommand (sdrun.cli.COMMANDS)"]

    cfg = composed()
    line = ("```sh\nsdrun train dataset=cifar10 pL=0.5 optim.milestone=[1] hydra.run.dir=x +extra=1 -m\n```\n"
            "Set `dataset.check_md55=false`, `bf16=on`, `HYDRA_FULL_ERROR=1`; "
            "`sdrun train -m experiment=table1_cifar10,table1_cifar1000 hydra/launcher=parallel,slurmm`.\n")
    assert sorted(key_problems(assignments(line), cfg, group_options)) == sorted([
        "optim.milestone: not a key of the composed config (optim.milestone=[1])",
        "dataset.check_md55: not a key of the composed config (dataset.check_md55=false)",
        f"experiment=table1_cifar1000: no such option (there are: {', '.join(sorted(group_options('experiment')))})",
        f"hydra/launcher=slurmm: no such option (there are: {', '.join(sorted(group_options('hydra/launcher')))})",
    ])
    config_page = (ROOT / "docs" / "config.md").read_text()
    assert unnamed_keys(config_page.replace("`log.grad_stats`", "`log.grad_statz`"), cfg) == ["log.grad_stats"]
    development = (ROOT / "docs" / "development.md").read_text()
    broken_layout = re.sub(r"^sdrun/engine/clock\.py.*$", "sdrun/engine/eta.py  gone", development, flags=re.M)
    assert layout_problems(broken_layout) == ["sdrun/engine/clock.py: missing from the layout",
                                              "sdrun/engine/eta.py: listed, but there is no such path"]

    # A key the docs call removed that is a key after all (a shim back, or a wrong claim).
    assert key_problems(["seed=2"], cfg, group_options) == []
    assert key_problems(["seed=2"], cfg, group_options, removed={"seed"}) == [
        "seed: the docs call it removed, but it is a config key"]


def test_github_anchor_rule():
    assert github_anchor("Results: Table 1, test error in percent") == "results-table-1-test-error-in-percent"
    assert github_anchor("`check=true`: will it work, and how long will it take?") == \
        "checktrue-will-it-work-and-how-long-will-it-take"
    assert github_anchor("One run, many processes (torchrun / DDP)") == "one-run-many-processes-torchrun--ddp"
    assert github_anchor("SVHN and ImageNet (Table 1's other two columns)") == \
        "svhn-and-imagenet-table-1s-other-two-columns"
