"""Where a served entity's model comes from, parsed from `entity_name` / `entity_version` (pure).

A local directory (or `file://` URI) is served in place. Everything else is resolved through the MLflow
tracking server and registry (`BERTH_MLFLOW_TRACKING_URI`), pinned to an immutable artifact location when
the config is accepted, and fetched once into the artifact cache before replicas start.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from berth.errors import InvalidParameterValue

SourceKind = Literal["local", "version", "alias", "latest", "logged", "run", "uri"]
_ALIAS_RE = re.compile(r"^[A-Za-z0-9_-]{1,255}\Z")  # MLflow's alias names
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
_LOGGED_ID_RE = re.compile(r"^m-[0-9a-f]{8,64}\Z")
_REFUSED_SCHEMES = {"http", "https", "ftp", "sftp", "file+http"}


@dataclass(frozen=True)
class ModelSource:
    """A parsed model reference. `name`/`ref` depend on the kind:

    - local: `ref` is the path or file:// URI;
    - version / alias / latest: `name` is the registered model, `ref` the version number or alias;
    - logged: `ref` is an MLflow 3 logged model's id (`models:/m-…`, what `log_model` returns);
    - run: `name` is the run id, `ref` the artifact path in the run;
    - uri: `ref` is any other artifact URI MLflow can download (`mlflow-artifacts:/…`, `s3://…`).
    """

    kind: SourceKind
    ref: str
    name: str = ""

    @property
    def remote(self) -> bool:
        return self.kind != "local"

    @property
    def uri(self) -> str:
        """The MLflow URI this source names (as a user would write it)."""
        if self.kind == "version":
            return f"models:/{self.name}/{self.ref}"
        if self.kind == "alias":
            return f"models:/{self.name}@{self.ref}"
        if self.kind == "latest":
            return f"models:/{self.name}/latest"
        if self.kind == "logged":
            return f"models:/{self.ref}"
        if self.kind == "run":
            return f"runs:/{self.name}/{self.ref}"
        return self.ref


def is_local(entity_name: str) -> bool:
    """A local path or file:// URI (anything without a scheme that is a path)."""
    if entity_name.startswith("file:"):
        return True
    return ":" not in entity_name and ("/" in entity_name or entity_name.startswith("."))


def parse_source(entity_name: str, entity_version: str | None, where: str = "served entity") -> ModelSource:
    """Parse `entity_name` (+ `entity_version`) into a `ModelSource`; 400 for what cannot name a model."""
    if is_local(entity_name):  # an entity_version here is only a label (it names the served entity)
        return ModelSource("local", entity_name)
    if entity_name.startswith("models:/"):
        rest = entity_name.removeprefix("models:/")
        if "@" in rest:
            name, _, alias = rest.rpartition("@")
            if not name or "/" in name or not _ALIAS_RE.match(alias):
                raise InvalidParameterValue(f"{where}.entity_name {entity_name!r} is not models:/<name>@<alias>.")
            if entity_version is not None:
                raise InvalidParameterValue(f"{where}: {entity_name!r} names an alias; omit entity_version.")
            return ModelSource("alias", alias, name)
        name, _, version = rest.rpartition("/")
        if not name and _LOGGED_ID_RE.match(rest):  # MLflow 3: models:/m-<id>
            if entity_version is not None:
                raise InvalidParameterValue(f"{where}: {entity_name!r} names a logged model; omit entity_version.")
            return ModelSource("logged", rest)
        if not name:
            raise InvalidParameterValue(
                f"{where}.entity_name {entity_name!r} names no version: use models:/<name>/<version>, "
                "models:/<name>@<alias> or models:/<name>/latest.")
        if version == "latest":
            source = ModelSource("latest", "latest", name)
        else:
            source = ModelSource("version", _version(version, where, entity_name), name)
        if entity_version is not None and (source.kind != "version" or _version(entity_version, where, entity_name)
                                           != source.ref):
            raise InvalidParameterValue(f"{where}: entity_version {entity_version!r} contradicts {entity_name!r}; "
                                        "give the version in one place.")
        return source
    if entity_name.startswith("runs:/"):
        run_id, _, path = entity_name.removeprefix("runs:/").partition("/")
        if not _RUN_ID_RE.match(run_id) or not path.strip("/"):
            raise InvalidParameterValue(f"{where}.entity_name {entity_name!r} is not runs:/<run_id>/<artifact path>.")
        if entity_version is not None:
            raise InvalidParameterValue(f"{where}.entity_version does not apply to a runs:/ URI.")
        return ModelSource("run", path.strip("/"), run_id)
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", entity_name)
    if scheme:  # another scheme: an artifact URI
        if scheme.group(1).lower() in _REFUSED_SCHEMES:
            raise InvalidParameterValue(
                f"{where}.entity_name {entity_name!r}: {scheme.group(1)} URIs are not served (the server would "
                "fetch any address a caller names); register the model, or use an artifact store URI.")
        if entity_version is not None:
            raise InvalidParameterValue(f"{where}.entity_version does not apply to an artifact URI.")
        return ModelSource("uri", entity_name)
    # A registered model name (Databricks' form: entity_name + entity_version).
    if entity_version is None:
        raise InvalidParameterValue(
            f"{where}.entity_name {entity_name!r} names a registered model: give entity_version, or use "
            f"models:/{entity_name}@<alias>.")
    return ModelSource("version", _version(entity_version, where, entity_name), entity_name)


def _version(text: str, where: str, entity_name: str) -> str:
    if not text.isdecimal() or len(text) > 18 or int(text) < 1:
        raise InvalidParameterValue(f"{where}: model version {text!r} of {entity_name!r} must be a positive integer.")
    return str(int(text))


@dataclass(frozen=True)
class PinnedModel:
    """A remote source resolved when its config was accepted: what replicas load, whatever moves later."""

    artifact_uri: str  # the immutable artifact location (e.g. mlflow-artifacts:/0/models/m-…/artifacts)
    version: str | None = None  # the registered model version it resolved to
    run_id: str | None = None

    def to_dict(self) -> dict[str, str]:
        out = {"artifact_uri": self.artifact_uri}
        if self.version is not None:
            out["version"] = self.version
        if self.run_id is not None:
            out["run_id"] = self.run_id
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, str]) -> PinnedModel:
        return cls(raw["artifact_uri"], raw.get("version"), raw.get("run_id"))
