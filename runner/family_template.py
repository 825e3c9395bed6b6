"""`forge trainers new NAME`: write the template of an external family (runner/templates/
family/*.tmpl, formatted with the family's name) into a new folder. Nothing here runs it."""

from __future__ import annotations

from pathlib import Path

from runner.errors import InvalidInput
from trainers import family as families

TEMPLATES = Path(__file__).resolve().parent / "templates" / "family"
FILES = ("forge-family.yaml", "train.py", "test_train.py", "README.md")


def write(name: str, folder: Path) -> list[Path]:
    """The template's files in `folder` (made here: it must not exist), for family `name`."""
    if not isinstance(name, str) or not families.NAME.match(name) or name in families.FAMILIES:
        raise InvalidInput(f"{name!r} is not a family name (lowercase letters, digits and _, "
                           "starting with a letter, at most 32) or is a built-in one",
                           field="name", fix="e.g. forge trainers new my_mlp")
    folder = Path(folder)
    if folder.exists():
        raise InvalidInput(f"{folder} exists already", field="dir",
                           fix="name a new folder with --dir")
    folder.mkdir(parents=True)
    written = []
    for file in FILES:
        path = folder / file
        path.write_text((TEMPLATES / f"{file}.tmpl").read_text().format(name=name))
        written.append(path)
    return written
