"""The environment check: a model's requirements.txt / conda.yaml against fake installed versions (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from berth.backends.base import ReplicaExit
from berth.runtimes.environment import EnvironmentReport, check_model, evaluate, model_dir
from tests.unit.test_reconciler import (
    one_entity,
    run,
    world,  # noqa: F401  # the reconciler on a fake backend (a fixture)
)

INSTALLED = {
    "scikit-learn": "1.5.2",
    "mlflow": "3.17.2",
    "numpy": "1.26.4",
    "torch": "2.1.0+cpu",
    "zope-interface": "6.4",
    "typing-extensions": "4.12.2",
    "ruamel-yaml": "0.18.6",
    "prerelease-pkg": "2.0rc1",
}
PY = "3.11.7"


def check(requirements: str | None = None, conda: str | None = None, *, installed: dict[str, str] | None = None,
        python: str = PY, environment: dict[str, str] | None = None) -> EnvironmentReport:
    lookup = installed if installed is not None else INSTALLED
    return evaluate(requirements, conda, installed=lookup.get, python_version=python, environment=environment)


def described(report: EnvironmentReport) -> list[str]:
    return [m.describe() for m in report.mismatches]


def test_a_matching_model_has_no_warning() -> None:
    report = check("mlflow==3.17.2\nscikit-learn==1.5.2\nnumpy>=1.26,<2\n")
    assert report.ok
    assert report.warning() == ""
    assert (report.checked, report.files, report.notes) == (3, ("requirements.txt",), ())


def test_a_different_version_and_a_missing_package_are_named_with_what_is_installed() -> None:
    report = check("scikit-learn==1.4.2\nfoo>=2\nnumpy==1.26.4\n")
    assert described(report) == ["scikit-learn==1.4.2 required, 1.5.2 installed", "foo>=2 required, not installed"]
    assert report.warning() == ("Environment warning: scikit-learn==1.4.2 required, 1.5.2 installed; "
                                "foo>=2 required, not installed.")
    assert [m.name for m in report.mismatches] == ["scikit-learn", "foo"]
    assert report.packages()[1] == {"name": "foo", "required": "foo>=2", "installed": None,
                                    "sources": ["requirements.txt"]}


def test_no_files_means_nothing_checked_and_no_warning() -> None:
    report = check(None, None)
    assert report.ok
    assert report.files == ()
    assert report.checked == 0
    assert report.warning() == ""


def test_comments_blank_lines_options_and_continuations() -> None:
    text = ("# logged by MLflow\n\n"
            "scikit-learn==1.4.2   # pinned at training\n"
            "-r more.txt\n-c constraints.txt\n--index-url https://pypi.example/simple\n-e .\n"
            "numpy==1.26.4 --hash=sha256:0123abcd\n"
            "foo \\\n  >=2\n")
    report = check(text)
    assert described(report) == ["scikit-learn==1.4.2 required, 1.5.2 installed", "foo>=2 required, not installed"]
    assert report.checked == 3
    assert len(report.notes) == 4
    assert all("skipped (pip options and included files are not followed)" in n for n in report.notes)
    assert report.notes[0].startswith("requirements.txt line 4: '-r more.txt'")


def test_urls_and_local_paths_are_skipped_with_a_note() -> None:
    text = ("git+https://github.com/org/pkg.git@v1\n./vendor/pkg\n/abs/dist/pkg-1.0.tar.gz\n"
            "pkg-1.0-py3-none-any.whl\nhttps://example.com/pkg-1.0.zip\n")
    report = check(text)
    assert report.ok
    assert report.checked == 0
    assert len(report.notes) == 5
    assert all("a URL or local path" in n for n in report.notes)


def test_a_named_url_requirement_needs_the_package_but_not_its_version() -> None:
    report = check("torch @ https://download.example/torch-2.1.0.whl\nmissing @ file:///wheels/missing-1.0.whl\n")
    assert described(report) == ["missing @ file:///wheels/missing-1.0.whl required, not installed"]
    assert report.notes == ("torch comes from a URL (https://download.example/torch-2.1.0.whl): 2.1.0+cpu "
                            "installed, its version not checked",)


def test_an_unparsable_line_is_a_note_not_a_failure() -> None:
    report = check("!!not a requirement\nnumpy==1.26.4\n")
    assert report.ok
    assert report.checked == 1
    assert report.notes[0].startswith("requirements.txt line 1: '!!not a requirement' skipped (not a requirement:")
    assert "\n" not in report.notes[0]


def test_markers_are_evaluated_for_the_running_interpreter() -> None:
    text = ('old-only==1.0; python_version < "3.0"\n'
            'scikit-learn==1.4.2; python_version >= "3.8"\n'
            'win-only==1.0; sys_platform == "win32"\n'
            'with-extra==1.0; extra == "gpu"\n')
    report = check(text, environment={"python_version": "3.11", "sys_platform": "linux"})
    assert described(report) == ["scikit-learn==1.4.2 required, 1.5.2 installed"]
    assert report.checked == 1  # what does not apply here is neither checked nor noted
    assert report.notes == ()
    on_windows = check(text, environment={"python_version": "3.11", "sys_platform": "win32"})
    assert [m.name for m in on_windows.mismatches] == ["scikit-learn", "win-only"]


def test_the_marker_is_not_part_of_the_required_spec() -> None:
    report = check('foo>=2; python_version >= "3"\n')
    assert described(report) == ["foo>=2 required, not installed"]


def test_extras_check_the_base_package_and_keep_the_extras_in_the_name() -> None:
    assert check("mlflow[extras]==3.17.2\n").ok
    report = check("mlflow[gateway,extras]==2.9.0\n")
    assert described(report) == ["mlflow[extras,gateway]==2.9.0 required, 3.17.2 installed"]


@pytest.mark.parametrize(("requirement", "ok"), [
    ("torch==2.1+cpu", True),  # 2.1 == 2.1.0, and the local label matches
    ("torch==2.1.0", True),  # a public pin accepts any local build
    ("torch==2.1.0+cu121", False),
    ("torch>=2.0,<2.2", True),
    ("torch~=2.1", True),
    ("torch~=2.2", False),
    ("numpy~=1.26.0", True),
    ("numpy~=1.25.0", False),
    ("numpy===1.26.4", True),
    ("numpy!=1.26.4", False),
    ("prerelease-pkg>=2.0rc1", True),
    ("prerelease-pkg>=1.0", True),  # a pre-release installed satisfies a plain range
    ("prerelease-pkg==2.0", False),
])
def test_specifiers(requirement: str, ok: bool) -> None:
    assert check(requirement).ok is ok


@pytest.mark.parametrize("spelling", ["scikit_learn", "Scikit-Learn", "scikit.learn", "SCIKIT__LEARN"])
def test_names_are_canonicalised(spelling: str) -> None:
    report = check(f"{spelling}==1.4.2\n")
    assert [(m.name, m.installed) for m in report.mismatches] == [("scikit-learn", "1.5.2")]
    assert described(report) == [f"{spelling}==1.4.2 required, 1.5.2 installed"]  # as the model wrote it


def test_dotted_and_underscored_names() -> None:
    assert check("zope.interface~=6.0\nruamel.yaml>=0.18\ntyping_extensions>=4.0\n").ok


def test_a_requirement_with_no_version_only_needs_the_package() -> None:
    report = check("numpy\nnot-here\n")
    assert described(report) == ["not-here required, not installed"]


def test_an_installed_version_that_is_not_a_version_is_noted_not_compared() -> None:
    report = check("weird>=1\n", installed={"weird": "not.a.version-x"})
    assert report.ok
    assert report.notes == ("weird: installed version 'not.a.version-x' is not a valid version, not compared",)


CONDA = """\
channels:
- conda-forge
dependencies:
- python=3.11.7
- pip<=24.0
- pip:
  - mlflow==3.17.2
  - scikit-learn==1.4.2
  - cloudpickle==3.0.0
name: mlflow-env
"""


def test_conda_pip_entries_are_checked_like_requirements() -> None:
    report = check(None, CONDA, installed={**INSTALLED, "cloudpickle": "3.0.0"})
    assert report.files == ("conda.yaml",)
    assert described(report) == ["scikit-learn==1.4.2 required, 1.5.2 installed"]
    assert report.mismatches[0].sources == ("conda.yaml",)
    assert report.python is None  # 3.11 == 3.11: the patch level does not matter


def test_a_package_in_both_files_is_reported_once() -> None:
    report = check("mlflow==3.17.2\nscikit_learn==1.4.2\ncloudpickle==3.0.0\n", CONDA)
    assert described(report) == ["scikit_learn==1.4.2 required, 1.5.2 installed",  # the first file's spelling
                                 "cloudpickle==3.0.0 required, not installed"]
    assert report.mismatches[0].sources == ("requirements.txt", "conda.yaml")
    assert report.checked == 3


def test_different_pins_of_one_package_are_each_checked() -> None:
    report = check("scikit-learn==1.4.2\n", CONDA.replace("scikit-learn==1.4.2", "scikit-learn>=1.5"))
    assert described(report) == ["scikit-learn==1.4.2 required, 1.5.2 installed", "cloudpickle==3.0.0 required, "
                                 "not installed"]


@pytest.mark.parametrize(("python", "spec", "mismatch"), [
    ("3.11.7", "python=3.11.7", False),
    ("3.11.9", "python=3.11.7", False),
    ("3.11.7", "python=3.10.12", True),
    ("3.12.1", "python==3.11", True),
    ("3.11.7", "python=3.11.7=h955ad1f_0", False),
    ("3.11.7", "python=3.10.12=h955ad1f_0", True),
])
def test_the_conda_python_version_is_compared_on_major_minor(python: str, spec: str, mismatch: bool) -> None:
    report = check(None, CONDA.replace("python=3.11.7", spec).replace("scikit-learn==1.4.2", "scikit-learn==1.5.2")
                 .replace("cloudpickle==3.0.0", "numpy"), python=python)
    assert (report.python is not None) is mismatch
    if mismatch:
        assert report.warning() == f"Environment warning: {spec} required, {python} running."


def test_a_python_range_in_conda_yaml_is_noted_not_compared() -> None:
    report = check(None, "dependencies:\n- python>=3.8\n- python\n")
    report2 = check(None, "dependencies:\n- python>=3.8\n")
    assert report.ok
    assert report2.ok
    assert report2.notes == ("conda.yaml: 'python>=3.8' not checked (only an exact python=X.Y pin is)",)


def test_conda_yaml_that_is_not_an_environment() -> None:
    assert check(None, "just a string").ok
    assert check(None, "dependencies: 3").ok
    bad = check(None, "dependencies: [unclosed\n")
    assert bad.ok
    assert bad.notes[0].startswith("conda.yaml: not valid YAML, not checked")


def test_conda_pip_options_and_markers() -> None:
    report = check(None, 'dependencies:\n- pip:\n  - --extra-index-url https://x\n  - old==1; python_version < "3"\n'
                       '  - foo==1\n')
    assert described(report) == ["foo==1 required, not installed"]
    assert report.notes == ("conda.yaml pip entry 1: '--extra-index-url https://x' skipped (pip options and "
                            "included files are not followed)",)


def test_model_dir_takes_paths_and_file_uris_only(tmp_path: Path) -> None:
    assert model_dir(str(tmp_path)) == tmp_path
    assert model_dir(f"file://{tmp_path}") == tmp_path
    assert model_dir(f"file:{tmp_path}") == tmp_path
    assert model_dir(str(tmp_path / "missing")) is None
    for uri in ("models:/iris/1", "runs:/abc/model", "s3://bucket/model", "mlflow-artifacts:/1/2", "iris",
                "file://otherhost/x"):
        assert model_dir(uri) is None


def test_check_model_reads_the_directory(tmp_path: Path) -> None:
    assert check_model("models:/iris/1") is None
    empty = check_model(str(tmp_path))
    assert empty is not None
    assert empty.files == ()
    assert empty.ok
    (tmp_path / "requirements.txt").write_text("berth-not-installed-pkg==1.0\npackaging>=1\n")
    (tmp_path / "conda.yaml").write_text("dependencies:\n- pip:\n  - berth-not-installed-pkg==1.0\n")
    report = check_model(f"file://{tmp_path}")
    assert report is not None
    assert report.files == ("requirements.txt", "conda.yaml")
    assert report.checked == 2
    assert report.warning() == "Environment warning: berth-not-installed-pkg==1.0 required, not installed."


def test_the_reconciler_shows_the_warning_and_logs_it_once(world, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    service, reconciler, backend, clock, _tables = world
    model = tmp_path / "model"
    model.mkdir()
    (model / "requirements.txt").write_text("berth-not-installed-pkg==1.0\n")

    async def scenario():  # type: ignore[no-untyped-def]
        await service.create({"name": "ep", "config": one_entity(str(model))}, creator="admin")
        await reconciler.reconcile_once()
        starting = service.get("ep")["pending_config"]["served_entities"][0]["state"]["deployment_state_message"]
        await reconciler.reconcile_once()
        entity = reconciler.endpoints["ep"].active.entities["a"]
        (rid,) = entity.replicas
        backend.exits[rid] = ReplicaExit(returncode=-9, log_tail="killed")  # its replacement is not re-checked
        await reconciler.reconcile_once()
        clock.t = entity.next_start_at
        await reconciler.reconcile_once()
        await reconciler.reconcile_once()
        return starting, service.get("ep")

    with caplog.at_level("WARNING", logger="berth.reconciler"):
        starting, view = run(scenario())
    warning = "Environment warning: berth-not-installed-pkg==1.0 required, not installed."
    assert starting == f"Starting replicas. {warning}"
    assert view["config"]["served_entities"][0]["state"]["deployment_state_message"] == (
        f"Serving with 1 replica(s) x 4 concurrent requests. {warning}")
    assert len(backend.started) == 2
    (record,) = [r for r in caplog.records if getattr(r, "event", None) == "environment_mismatch"]
    assert (record.endpoint, record.entity) == ("ep", "a")  # type: ignore[attr-defined]
    assert record.packages == [{"name": "berth-not-installed-pkg", "required": "berth-not-installed-pkg==1.0",  # type: ignore[attr-defined]
                                "installed": None, "sources": ["requirements.txt"]}]


def test_a_model_without_requirement_files_has_no_warning(world) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    service, reconciler, _backend, _clock, _tables = world

    async def scenario():  # type: ignore[no-untyped-def]
        await service.create({"name": "ep", "config": one_entity("/models/not-here")}, creator="admin")
        await reconciler.reconcile_once()
        await reconciler.reconcile_once()
        return service.get("ep"), reconciler.endpoints["ep"].active.entities["a"]

    view, entity = run(scenario())
    assert view["config"]["served_entities"][0]["state"]["deployment_state_message"] == (
        "Serving with 1 replica(s) x 4 concurrent requests.")
    assert entity.environment_warning == ""
