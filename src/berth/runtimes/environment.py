"""Does a model's MLflow environment match the one it is served in?

A served entity runs in Berth's own Python environment (per-model environments come later). The
packages its model was logged with (`requirements.txt`, and the `pip:` list of `conda.yaml`) are
compared with what that environment has installed, and `conda.yaml`'s Python with the running
interpreter's major.minor. What differs becomes one sentence for the entity's state message and its
build logs, naming each package: "scikit-learn==1.4.2 required, 1.5.2 installed".

`evaluate` is the pure part (file texts and an installed-version lookup in, a report out);
`check_model` reads a local model directory and this interpreter's installed distributions.
Lines the check cannot judge (pip options, bare URLs and paths, unparsable lines) are skipped and
listed in the report's notes; requirements whose environment markers exclude this interpreter are
skipped as pip would skip them.
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

REQUIREMENTS_TXT = "requirements.txt"
CONDA_YAML = "conda.yaml"
WARNING_PREFIX = "Environment warning:"

# Per-requirement pip options (`--hash=...`, `--config-settings ...`) end the requirement itself.
_LINE_OPTION = re.compile(r"\s--\S.*$")
_COMMENT = re.compile(r"(^|\s)#.*$")
_ARCHIVE = (".whl", ".tar.gz", ".tgz", ".tar.bz2", ".zip")
# conda's exact pins: python=3.11, python=3.11.7, python==3.11.7, python=3.11.7=h955ad1f_0
_CONDA_PYTHON = re.compile(r"^python\s*==?\s*(\d+)\.(\d+)[\w.*]*(=\S*)?$")


@dataclass(frozen=True)
class Mismatch:
    """A requirement this environment does not meet: `installed` is None when the package is missing."""

    name: str  # canonical (PEP 503)
    required: str  # as the model states it, without its marker: "scikit-learn==1.4.2", "mlflow[extras]>=2"
    installed: str | None
    sources: tuple[str, ...] = ()  # the files that ask for it

    def describe(self) -> str:
        return f"{self.required} required, {self.installed or 'not'} installed"


@dataclass(frozen=True)
class PythonMismatch:
    required: str  # as conda.yaml states it: "python=3.10.12"
    running: str  # platform.python_version()

    def describe(self) -> str:
        return f"{self.required} required, {self.running} running"


@dataclass(frozen=True)
class EnvironmentReport:
    """What the model asks for that this environment lacks, and what the check left aside."""

    files: tuple[str, ...] = ()  # the files read (none: the model states no environment)
    checked: int = 0  # requirements compared
    mismatches: tuple[Mismatch, ...] = ()
    python: PythonMismatch | None = None
    notes: tuple[str, ...] = ()  # lines skipped and why

    @property
    def ok(self) -> bool:
        return not self.mismatches and self.python is None

    def warning(self) -> str:
        """One sentence naming every mismatch ("" when there is none)."""
        parts = ([self.python.describe()] if self.python else []) + [m.describe() for m in self.mismatches]
        return f"{WARNING_PREFIX} {'; '.join(parts)}." if parts else ""

    def packages(self) -> list[dict[str, Any]]:
        """The mismatches as records (for structured logs)."""
        out: list[dict[str, Any]] = []
        if self.python is not None:
            out.append({"name": "python", "required": self.python.required, "installed": self.python.running})
        out += [{"name": m.name, "required": m.required, "installed": m.installed, "sources": list(m.sources)}
                for m in self.mismatches]
        return out


@dataclass
class _Wanted:
    requirement: Requirement
    sources: list[str] = field(default_factory=list)


def evaluate(
    requirements_txt: str | None,
    conda_yaml: str | None,
    *,
    installed: Callable[[str], str | None],
    python_version: str,
    environment: Mapping[str, str] | None = None,
) -> EnvironmentReport:
    """Compare a model's requirement files (their texts; None when absent) with an environment.

    `installed(canonical_name)` is the installed version or None; `environment` overrides the
    marker variables of the running interpreter (PEP 508), for tests."""
    files: list[str] = []
    notes: list[str] = []
    wanted: dict[tuple[str, str, str, str], _Wanted] = {}
    python: PythonMismatch | None = None

    def take(lines: Iterable[tuple[str, str]], source: str) -> None:
        for where, line in lines:
            req = _parse(line, f"{source} {where}", notes, environment)
            if req is None:
                continue
            key = (canonicalize_name(req.name), ",".join(sorted(req.extras)), str(req.specifier), req.url or "")
            wanted.setdefault(key, _Wanted(req)).sources.append(source)

    if requirements_txt is not None:
        files.append(REQUIREMENTS_TXT)
        take(_logical_lines(requirements_txt), REQUIREMENTS_TXT)
    if conda_yaml is not None:
        files.append(CONDA_YAML)
        pip, python_spec = _conda(conda_yaml, notes)
        take(((f"pip entry {i}", line) for i, line in enumerate(pip, 1)), CONDA_YAML)
        if python_spec is not None:
            python = _python(python_spec, python_version, notes)

    mismatches = []
    for item in wanted.values():
        mismatch = _compare(item.requirement, installed(canonicalize_name(item.requirement.name)), notes)
        if mismatch is not None:
            mismatches.append(Mismatch(canonicalize_name(item.requirement.name), mismatch[0], mismatch[1],
                                       tuple(item.sources)))
    return EnvironmentReport(tuple(files), len(wanted), tuple(mismatches), python, tuple(notes))


def _logical_lines(text: str) -> Iterable[tuple[str, str]]:
    """pip's reading of a requirements file: comments stripped, `\\` continuations joined."""
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = _COMMENT.sub("", raw).rstrip()
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = (pending + line).strip(), ""
        if line:
            yield f"line {start}", line
    if pending.strip():
        yield f"line {start}", pending.strip()


def _parse(line: str, where: str, notes: list[str],
           environment: Mapping[str, str] | None) -> Requirement | None:
    """The requirement on one line if it applies to this interpreter; a note when it cannot be judged."""
    line = line.strip()
    if line.startswith("-"):
        notes.append(f"{where}: '{line}' skipped (pip options and included files are not followed)")
        return None
    text = _LINE_OPTION.sub("", line).strip()
    try:
        req = Requirement(text)
    except InvalidRequirement as exc:
        if _is_location(text):
            notes.append(f"{where}: '{line}' skipped (a URL or local path: no version to check)")
        else:
            notes.append(f"{where}: '{line}' skipped (not a requirement: {str(exc).splitlines()[0]})")
        return None
    if req.url is None and req.name.lower().endswith(_ARCHIVE):  # a wheel's file name parses as a name
        notes.append(f"{where}: '{line}' skipped (a URL or local path: no version to check)")
        return None
    if req.marker is not None and not req.marker.evaluate(dict(environment) if environment else None):
        return None
    return req


def _is_location(text: str) -> bool:
    return "://" in text or text.startswith((".", "/", "~")) or "/" in text or "\\" in text or text.endswith(_ARCHIVE)


def _compare(req: Requirement, version: str | None, notes: list[str]) -> tuple[str, str | None] | None:
    """(required, installed) when the installed version does not satisfy `req`, else None."""
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    if req.url:
        if version is None:
            return f"{req.name}{extras} @ {req.url}", None
        notes.append(f"{req.name} comes from a URL ({req.url}): {version} installed, its version not checked")
        return None
    required = f"{req.name}{extras}{req.specifier}"
    if version is None:
        return required, None
    if not req.specifier:
        return None
    try:
        Version(version)
    except InvalidVersion:
        notes.append(f"{req.name}: installed version {version!r} is not a valid version, not compared")
        return None
    if req.specifier.contains(version, prereleases=True):
        return None
    return required, version


def _conda(text: str, notes: list[str]) -> tuple[list[str], str | None]:
    """conda.yaml's pip entries and its python dependency."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        notes.append(f"{CONDA_YAML}: not valid YAML, not checked ({str(exc).splitlines()[0]})")
        return [], None
    deps = data.get("dependencies") if isinstance(data, dict) else None
    if not isinstance(deps, list):
        return [], None
    pip: list[str] = []
    python = None
    for dep in deps:
        if isinstance(dep, dict) and isinstance(dep.get("pip"), list):
            pip += [str(entry) for entry in dep["pip"] if entry is not None]
        elif isinstance(dep, str) and re.match(r"^python(\W|$)", dep.strip()):
            python = dep.strip()
    return pip, python


def _python(spec: str, running: str, notes: list[str]) -> PythonMismatch | None:
    match = _CONDA_PYTHON.match(spec)
    if match is None:
        if spec != "python":
            notes.append(f"{CONDA_YAML}: '{spec}' not checked (only an exact python=X.Y pin is)")
        return None
    required = (int(match[1]), int(match[2]))
    have = tuple(int(part) for part in running.split(".")[:2])
    return None if have == required else PythonMismatch(spec, running)


def installed_version(name: str) -> str | None:
    """The version of distribution `name` installed in this interpreter's environment, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def model_dir(model_uri: str) -> Path | None:
    """The local directory of a model URI (a path or a file:// URI); None for anything else."""
    if "://" in model_uri or model_uri.startswith("file:"):
        parsed = urlparse(model_uri)
        if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
            return None
        path = Path(unquote(parsed.path))
    elif ":" in model_uri.split("/", 1)[0]:  # models:/..., runs:/..., s3:... : not a local path
        return None
    else:
        path = Path(model_uri).expanduser()
    return path if path.is_dir() else None


def check_model(model_uri: str) -> EnvironmentReport | None:
    """Check a local model's requirement files against this environment; None when the URI is not
    a local directory (nothing to read)."""
    path = model_dir(model_uri)
    if path is None:
        return None
    texts = []
    for name in (REQUIREMENTS_TXT, CONDA_YAML):
        try:
            texts.append((path / name).read_text(errors="replace"))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            texts.append(None)
    return evaluate(texts[0], texts[1], installed=installed_version, python_version=platform.python_version())
