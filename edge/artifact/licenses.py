"""Which licence a model is under, and its text: from flags, the source's own files, or the model's name."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from edge import report
from qwen_edge.contract import LICENSE_FILE
from qwen_edge.errors import QwenEdgeError

APACHE = "Apache-2.0"
LICENSE_NAMES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE")

# Licence of Qwen checkpoints by model name, first match wins (from the Hub model cards).
# Qwen2.5-3B / Coder-3B use the Qwen Research licence, the 72B models the Qwen licence.
_LICENSE_TABLE = (
    (re.compile(r"qwen2\.5-(coder-)?3b"), "qwen-research"),
    (re.compile(r"qwen2\.5-(math-)?72b"), "qwen"),
    (re.compile(r"qwen2-72b"), "tongyi-qianwen"),
    (re.compile(r"qwen3-"), APACHE),
    (re.compile(r"qwen2\.5-(coder-|math-)?(0\.5|1\.5|7|14|32)b"), APACHE),
    (re.compile(r"qwen2-(0\.5|1\.5|7)b"), APACHE),
)


@dataclass(frozen=True)
class LicenseFacts:
    """What a source says about its licence: an explicit id, a licence file, and model names to look up."""

    license_id: str | None = None
    license_file: Path | None = None
    names: tuple[str, ...] = ()


def license_id_for_name(name: str) -> str | None:
    """Licence id of a Qwen model from its Hub id or name ("Qwen/Qwen2.5-3B-Instruct" → "qwen-research")."""
    key = re.sub(r"[\s_]+", "-", name.strip().lower()).split("/")[-1]
    for pattern, license_id in _LICENSE_TABLE:
        if pattern.search(key):
            return license_id
    return None


def readme_license(directory: Path) -> str | None:
    """`license_name` (or `license`) from a model card's YAML front matter."""
    readme = directory / "README.md"
    if not readme.is_file():
        return None
    import yaml

    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    try:
        card = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return None
    value = card.get("license_name") or card.get("license") if isinstance(card, dict) else None
    return str(value) if value and value != "other" else None


def directory_facts(directory: Path) -> LicenseFacts:
    """Licence facts of a Hugging Face model directory: its LICENSE file and model card."""
    license_file = next((directory / n for n in LICENSE_NAMES if (directory / n).is_file()), None)
    return LicenseFacts(readme_license(directory), license_file, (directory.name,))


def apache_text() -> bytes:
    """The Apache-2.0 licence text shipped with qwen-edge."""
    return resources.files("edge").joinpath("data/licenses/Apache-2.0.txt").read_bytes()


def identify(facts: LicenseFacts) -> str | None:
    """The licence id the facts give: an explicit id, else the first model name the table knows."""
    return facts.license_id or next((i for i in map(license_id_for_name, facts.names) if i), None)


def choose(
    facts: LicenseFacts, license_file: str | Path | None, license_id: str | None, where: str
) -> tuple[str, bytes]:
    """(licence id, licence text): the flags win, then the source's facts, then the name table.

    Apache-2.0 text ships with qwen-edge; any other licence needs its text from the source or a file.
    """
    found_id = identify(facts)
    final_id = license_id or found_id
    if license_file is not None:
        path = Path(license_file)
        if not path.is_file():
            raise QwenEdgeError(f"--license {path} does not exist; pass the model's LICENSE file")
        if final_id is None:
            raise QwenEdgeError(
                f"cannot tell which licence {path} is; add --license-id (e.g. Apache-2.0, qwen-research)"
            )
        return final_id, path.read_bytes()
    if final_id is None:
        raise QwenEdgeError(
            f"cannot tell the licence of the model in {where} (no licence in its manifest or source); "
            "pass --license-id ID, and --license FILE unless it is Apache-2.0"
        )
    if facts.license_file is not None and final_id == found_id:
        return final_id, facts.license_file.read_bytes()
    if final_id.lower() == APACHE.lower():
        return APACHE, apache_text()
    raise QwenEdgeError(
        f"the model is licensed under {final_id!r}, whose text is not in the artifact or its source; "
        "pass --license FILE with the LICENSE from the model's Hub page"
    )


def write_license(facts: LicenseFacts, where: str, out_dir: Path) -> dict | None:
    """Copy the model's licence text into the artifact (contract.LICENSE_FILE) and return its manifest
    entry; a licence whose text is not at hand is recorded by id alone, with a warning (`qwen-edge
    package` asks for it)."""
    try:
        license_id, text = choose(facts, None, None, where)
    except QwenEdgeError as e:
        report.current().warning(str(e))
        license_id = identify(facts)
        return {"id": license_id, "file": None} if license_id else None
    (Path(out_dir) / LICENSE_FILE).write_bytes(text)
    return {"id": license_id, "file": LICENSE_FILE}
