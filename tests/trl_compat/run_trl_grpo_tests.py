"""Run TRL's own GRPO trainer tests offline, once with GRPOTrainer and once with PBSDTrainer swapped in.

    python tests/trl_compat/run_trl_grpo_tests.py                      # clones huggingface/trl at v<installed trl>
    python tests/trl_compat/run_trl_grpo_tests.py --trl-src ~/src/trl  # a local checkout (its tests/ at that version)
    python tests/trl_compat/run_trl_grpo_tests.py -k "test_train and not vlm" --trainer pbsd

The test file is taken from TRL's repository at the tag of the installed trl (a network clone the first time, cached
under --workdir; or --trl-src). The hub models and datasets the tests load are replaced by offline stand-ins
(`stand_ins.py`): tiny random models of the same architectures in a local hub cache (`HF_HUB_OFFLINE=1`), and the
`zen` dataset rebuilt locally. Ids without a stand-in (vision-language models, image datasets) fail the same way under
both trainers and so do not count. GPU/vLLM-marked tests skip on CPU under both.

The PBSD run swaps `GRPOConfig`/`GRPOTrainer` for `PBSDConfig`/`PBSDTrainer` and adds a `privileged_context` column
to the datasets (`conftest_swap.py`). The report lists both pass counts and every test that passes with GRPO and fails
with PBSD; the README's "Swapping from GRPO" section gives the reason for each feature PBSD refuses by design.

Not part of the default test command: it runs TRL's whole GRPO suite twice. The two runs can go in parallel
(`--trainer grpo` and `--trainer pbsd` with separate `--workdir`s, then `--compare <grpo xml> <pbsd xml>`); a Ctrl-C
(SIGINT to pytest) still writes the report of the tests run so far, and the comparison counts only tests run in both.
"""

import argparse
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path


HERE = Path(__file__).resolve().parent


def trl_tests(args) -> Path:
    """A directory holding TRL's `tests/` at the installed version."""
    import trl

    if args.trl_src:
        return Path(args.trl_src).expanduser() / "tests"
    checkout = Path(args.workdir) / f"trl-v{trl.__version__}"
    if not checkout.exists():
        subprocess.run(
            [
                "git",
                "clone",
                "--depth",
                "1",
                "--branch",
                f"v{trl.__version__}",
                "https://github.com/huggingface/trl",
                str(checkout),
            ],
            check=True,
        )
    return checkout / "tests"


def prepare_suite(tests_dir: Path, workdir: Path) -> Path:
    """A copy of TRL's GRPO test module and its helpers, with the offline/swap plugin as conftest."""
    suite = workdir / "suite"
    shutil.rmtree(suite, ignore_errors=True)
    (suite / "tests").mkdir(parents=True)
    for name in ("__init__.py", "testing_utils.py", "test_grpo_trainer.py"):
        if (tests_dir / name).exists():
            shutil.copy(tests_dir / name, suite / "tests" / name)
    (suite / "tests" / "__init__.py").touch()
    shutil.copy(HERE / "conftest_swap.py", suite / "tests" / "conftest.py")
    return suite


def run(suite: Path, trainer: str, hub_cache: Path, pytest_args: list[str]) -> tuple[dict, float]:
    report = suite / f"report-{trainer}.xml"
    env = dict(os.environ)
    env.update(
        PBSD_TRL_COMPAT_TRAINER=trainer,
        HF_HUB_CACHE=str(hub_cache),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TRL_EXPERIMENTAL_SILENCE="1",
        PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parents[1]), env.get("PYTHONPATH", "")]),
    )
    start = time.time()
    report.unlink(missing_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/test_grpo_trainer.py",
            "-p",
            "no:cacheprovider",
            "-q",
            f"--junitxml={report}",
            "-o",
            "addopts=",
            *pytest_args,
        ],
        cwd=suite,
        env=env,
    )
    if not report.exists():
        sys.exit(f"pytest wrote no report for the {trainer} run (the suite failed before collection; see above)")
    return outcomes(report), time.time() - start


def outcomes(report: Path) -> dict[str, str]:
    results = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        if case.get("name") is None:  # the test a Ctrl-C interrupted: pytest reports it without a name
            continue
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        results[name] = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
        if results[name] == "failed":
            message = next(child for child in case if child.tag in ("failure", "error")).get("message") or ""
            results[name] += ": " + message.splitlines()[0][:200] if message else ""
    return results


def summary(results: dict[str, dict], durations: dict[str, float]) -> list[str]:
    lines = []
    for trainer, result in results.items():
        passed = sum(v == "passed" for v in result.values())
        failed = sum(v.startswith("failed") for v in result.values())
        skipped = sum(v == "skipped" for v in result.values())
        took = f" in {durations[trainer]:.0f} s" if trainer in durations else ""
        lines.append(f"{trainer}: {passed} passed, {failed} failed, {skipped} skipped{took}")
    if len(results) == 2:
        grpo_passed = [n for n, v in results["grpo"].items() if v == "passed"]
        regressions = sorted(n for n in grpo_passed if results["pbsd"].get(n, "passed") != "passed")
        lines.append(f"passing with GRPO, not with PBSD: {len(regressions)}")
        lines += [f"  {name}  ->  {results['pbsd'][name]}" for name in regressions]
        # an interrupted run (Ctrl-C writes the report of the tests done so far) leaves tests out of one report
        not_run = sorted(n for n in grpo_passed if n not in results["pbsd"])
        if not_run:
            lines.append(f"passing with GRPO, not run with PBSD: {len(not_run)}")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trl-src", help="local checkout of huggingface/trl at the installed version")
    parser.add_argument("--workdir", default=os.path.expanduser("~/.cache/pbsd_trl/trl_compat"))
    parser.add_argument("--trainer", choices=["both", "grpo", "pbsd"], default="both")
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("GRPO_XML", "PBSD_XML"),
        help="only compare two junit reports of earlier runs (e.g. the two trainers run in parallel "
        "with --trainer grpo / --trainer pbsd and separate --workdir)",
    )
    args, pytest_args = parser.parse_known_args()
    if args.compare:
        print(
            "\n".join(summary({"grpo": outcomes(Path(args.compare[0])), "pbsd": outcomes(Path(args.compare[1]))}, {}))
        )
        return
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    sys.path.insert(0, str(HERE))
    import stand_ins

    tests_dir = trl_tests(args)
    source = (tests_dir / "test_grpo_trainer.py").read_text()
    built = stand_ins.write_hub_cache(stand_ins.hub_ids(source), workdir / "hub")
    missing = [repo for repo, ok in built.items() if not ok and repo != f"{stand_ins.ORG}/zen"]
    print(f"stand-ins: {sum(built.values())} built; no stand-in for: {missing}")
    suite = prepare_suite(tests_dir, workdir)

    results, durations = {}, {}
    for trainer in ["grpo", "pbsd"] if args.trainer == "both" else [args.trainer]:
        results[trainer], durations[trainer] = run(suite, trainer, workdir / "hub", pytest_args)
    lines = summary(results, durations)
    print("\n".join(lines))
    (workdir / "summary.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
