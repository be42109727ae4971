"""`sts check` (the static TensorRT check), `sts selftest` (build and run the tiny models' engines on this machine's
TensorRT), `sts ort-form` (add or rewrite an export's ONNX Runtime form)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from sts_export.cli.options import CONTEXT, ENVIRONMENT, MAX_NEW_TOKENS_OPTION, TRT_VERSION
from sts_export.errors import cli_errors


def check_and_exit(paths: list[Path], trt_version: str | None) -> None:
    """The static check of `paths` (export directories, .onnx files) for each TensorRT version: its report, then one
    verdict line per version; exit 0 when every version passes, else 1. Shared by `sts check` and
    `sts export --target trt --check-only`."""
    from sts_export.export.tensorrt.check import default_version, parse_versions
    from sts_export.export.tensorrt.engines import check_versions

    versions = parse_versions(trt_version) if trt_version is not None else [default_version()]
    results = check_versions(paths, versions)
    for v, _, report in results:
        if len(results) > 1:
            click.echo(f"== TensorRT {v} ==")
        click.echo(report)
    for v, ok, _ in results:
        click.echo(f"TensorRT {v} compatibility: {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if all(ok for _, ok, _ in results) else 1)


@click.command("check", context_settings=CONTEXT, epilog=ENVIRONMENT)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@TRT_VERSION
def check(paths: tuple[Path, ...], trt_version: str | None) -> None:
    """Would TensorRT's ONNX parser take these graphs? Export directories (every *.onnx) or .onnx files, checked
    without TensorRT against onnx-tensorrt's importer rules of each version (docs/tensorrt.md); exit 1 on problems."""
    with cli_errors():
        check_and_exit(list(paths), trt_version)


@click.command("selftest", context_settings=CONTEXT, epilog=ENVIRONMENT)
@click.option("--families", default="tiny-llava,tiny-llava-gqa,tiny-llava-next,tiny-qwen2.5-vl,tiny-qwen3-vl",
              show_default=True, help="Comma-separated tiny families.")
@click.option("--dtypes", default="fp32,fp16", show_default=True, help="fp32, fp16 or both.")
@click.option("--work", type=click.Path(path_type=Path), default=None,
              help="Where exports and engines go (default: a temporary directory, removed afterwards).")
@click.option("--use-export", "exports", multiple=True,
              help="FAMILY:DTYPE=DIR: use this export (copied) instead of making one; repeatable; then only the given "
                   "ones run.")
@click.option("--exports-dir", type=click.Path(path_type=Path), default=None,
              help="A --work directory of an --export-only run: use its FAMILY-DTYPE exports.")
@click.option("--export-only", is_flag=True, help="Only make the exports in --work (needs torch; no TensorRT).")
@MAX_NEW_TOKENS_OPTION
@click.option("--report", "report_file", type=click.Path(path_type=Path), default=None,
              help="Also write the report to this file.")
def selftest(families: str, dtypes: str, work: Path | None, exports: tuple[str, ...], exports_dir: Path | None,
             export_only: bool, max_new_tokens: int, report_file: Path | None) -> None:
    """Build the tiny models' TensorRT engines on this machine and compare them with ONNX Runtime on the same feeds;
    print one report to paste into an issue (sts_export/show/selftest.py). Exit 0: every row PASS."""
    from sts_export.show.selftest import selftest as run_selftest

    with cli_errors():
        sys.exit(run_selftest(families, dtypes, work, exports, exports_dir, export_only, max_new_tokens, report_file))


@click.command("ort-form", context_settings=CONTEXT, epilog=ENVIRONMENT)
@click.argument("export_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
def ort_form(export_dirs: tuple[Path, ...]) -> None:
    """Add the fused ONNX Runtime form of the decoder segments to fp32 exports (or rewrite an older one), checked
    against their portable graphs before it is recorded."""
    from sts_export.export.ort_form import add_ort_form

    with cli_errors():
        for d in export_dirs:
            add_ort_form(d)
