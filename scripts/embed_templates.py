"""server_setup.sh carries the templates of conf/ inside it, so the script copied alone to a
server (the guide's step 1) has everything it installs. conf/ stays the one source: this module
writes the script's embedded block from it, and nothing else in the script.

    python -m scripts.embed_templates           # rewrite server_setup.sh's block from conf/
    python -m scripts.embed_templates --check   # exit 1 when the block is behind conf/

The output depends only on the script outside its block and the files of conf/ (sorted by name),
so running it twice, or on two machines, writes the same bytes."""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

from scripts.errors import ToolkitError
from scripts.settings import REPO_ROOT

SETUP_SCRIPT = REPO_ROOT / "server_setup.sh"
CONF_DIR = REPO_ROOT / "conf"
COMMAND = "python -m scripts.embed_templates"
BEGIN = "# >>> embedded templates"
END = "# <<< embedded templates"
DELIMITER = "END_OF_FLASK_DEPLOY_TEMPLATE"
_BLOCK = re.compile(rf"^{re.escape(BEGIN)}.*?^{re.escape(END)}\n", re.S | re.M)


def templates(conf_dir: Path = CONF_DIR) -> dict[str, str]:
    """Every file of conf/, by name, in the order the script lists them (C locale)."""
    found = {}
    for path in sorted(conf_dir.iterdir(), key=lambda p: p.name.encode()):
        if not path.is_file():
            continue
        text = path.read_text()
        # A heredoc always ends with a newline, and ends at a line equal to its delimiter.
        if not text.endswith("\n"):
            raise ToolkitError(f"{path}: add a newline at its end (an embedded template keeps "
                               f"every byte, and a heredoc always ends with one)")
        if f"\n{DELIMITER}\n" in f"\n{text}":
            raise ToolkitError(f"{path}: a line equal to {DELIMITER} would end its heredoc")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", path.name):
            raise ToolkitError(f"{path}: a template's name may hold only letters, digits, "
                               f"'.', '_' and '-'")
        found[path.name] = text
    return found


def block(found: dict[str, str]) -> str:
    lines = [f"{BEGIN}: GENERATED from conf/ by `{COMMAND}`.",
             "# Edit conf/, not these lines; the script uses them when no conf/ is beside it.",
             "embedded_template_names() {",
             *(f"  echo {name}" for name in found),
             "}",
             "",
             "embedded_template() {",
             '  case "$1" in']
    for name, text in found.items():
        lines += [f"    {name})", f"      cat <<'{DELIMITER}'", text + DELIMITER, "      ;;"]
    lines += ['    *) return 1 ;;', "  esac", "}", END]
    return "\n".join(lines) + "\n"


def embedded_script(script: str, found: dict[str, str]) -> str:
    """script with its embedded block rewritten from found."""
    if len(_BLOCK.findall(script)) != 1:
        raise ToolkitError(f"server_setup.sh: expected one block from '{BEGIN}' to '{END}'")
    return _BLOCK.sub(lambda _: block(found), script)


def without_block(script: str) -> str:
    """The script's own logic: what stays when the templates are taken out."""
    return _BLOCK.sub("", script)


def templates_digest(found: dict[str, str]) -> str:
    """What server_setup.sh's templates_digest prints: sha256 of `sha256sum` lines, by name."""
    listing = "".join(f"{hashlib.sha256(text.encode()).hexdigest()}  {name}\n"
                      for name, text in found.items())
    return hashlib.sha256(listing.encode()).hexdigest()


def script_digest(script: str) -> str:
    """What server_setup.sh's script_digest prints: sha256 of the script without its block."""
    return hashlib.sha256(without_block(script).encode()).hexdigest()


def current_script() -> str:
    """server_setup.sh as it should be committed: its block rewritten from conf/ now."""
    return embedded_script(SETUP_SCRIPT.read_text(), templates())


def main(argv: list[str]) -> int:
    try:
        wanted = current_script()
    except ToolkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if SETUP_SCRIPT.read_text() == wanted:
        print(f"ok: {SETUP_SCRIPT.name} embeds conf/ ({len(templates())} templates)")
        return 0
    if "--check" in argv:
        print(f"error: {SETUP_SCRIPT.name} is behind conf/; run `{COMMAND}`", file=sys.stderr)
        return 1
    SETUP_SCRIPT.write_text(wanted)
    print(f"changed: {SETUP_SCRIPT.name} embeds conf/ ({len(templates())} templates)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
