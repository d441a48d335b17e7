"""`converter convert` and `converter validate`: checkpoint -> artifacts/<name>/."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .checkpoint import ConversionError, sha256_file
from .onnx_export import DEFAULT_OPSET as ONNX_DEFAULT_OPSET


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@click.group()
def main() -> None:
    """Convert Whisper checkpoints (openai .pt, faster-whisper or Hugging Face folders) into this project's artifacts."""


@main.command()
@click.option("--model", "model_name", help="official model name, downloaded by openai-whisper's downloader")
@click.option("--checkpoint", "checkpoint_path", type=click.Path(path_type=Path),
              help="a local model: openai's .pt, a faster-whisper (CTranslate2) folder or a Hugging Face Whisper folder")
@click.option("--name", help="artifact folder name (default: the model name or the checkpoint's file or folder name)")
@click.option("--out-dir", type=click.Path(path_type=Path), default=Path("artifacts"), show_default=True)
@click.option("--download-root", type=click.Path(path_type=Path), default=Path.home() / ".cache" / "whisper", show_default=True)
@click.option("--force", is_flag=True, help="convert again even when the artifacts are up to date")
def convert(model_name, checkpoint_path, name, out_dir, download_root, force) -> None:
    """Extract every tensor to safetensors, record dims and assets, validate against torch."""
    from .extract import extract
    from .sources import read_source
    from .validate import validate

    try:
        if bool(model_name) == bool(checkpoint_path):
            raise ConversionError("give exactly one of --model NAME or --checkpoint PATH")
        if model_name:
            from .official import download

            checkpoint_path = download(model_name, download_root)
        name = name or model_name or (checkpoint_path.name if checkpoint_path.is_dir() else checkpoint_path.stem)
        target = out_dir / name
        if not force and _up_to_date(target, checkpoint_path):
            click.echo(f"{target}: up to date")
            return
        source = read_source(checkpoint_path)
        model = extract(source, target, name)
        click.echo(f"extracted {model['tensor_count']} tensors ({source.format} {'folder' if source.path.is_dir() else 'file'}) "
                   f"to {target / model['weights']['file']}")
        report = validate(source, target)
        click.echo(f"validated: {report['tensors']['bit_equal']} tensors bit-equal; "
                   f"encoder max abs error {report['encoder']['max_abs']:.2e}, "
                   f"logits max abs error {report['logits']['max_abs']:.2e}")
    except ConversionError as exc:
        _fail(str(exc))


@main.command("validate")
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--checkpoint", "checkpoint_path", type=click.Path(path_type=Path), required=True)
def validate_command(artifact_dir, checkpoint_path) -> None:
    """Check an artifact folder against its checkpoint; writes validation.json."""
    from .sources import read_source
    from .validate import validate

    try:
        if not (artifact_dir / "model.json").is_file():
            raise ConversionError(f"{artifact_dir} has no model.json; run make convert first")
        report = validate(read_source(checkpoint_path), artifact_dir)
        click.echo(json.dumps(report, indent=2))
    except ConversionError as exc:
        _fail(str(exc))


@main.command("export-onnx")
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="output folder (default: ARTIFACT_DIR/onnx)")
@click.option("--opset", type=int, default=ONNX_DEFAULT_OPSET, show_default=True, help="ONNX opset version")
@click.option("--force", is_flag=True, help="export again even when the ONNX models are up to date")
def export_onnx_command(artifact_dir, out_dir, opset, force) -> None:
    """Write encoder, decoder_init and decoder_step ONNX models from a converted folder, checked with onnxruntime."""
    from .onnx_export import export_onnx

    try:
        manifest = export_onnx(artifact_dir, out_dir, opset=opset, force=force)
    except ConversionError as exc:
        _fail(str(exc))
    target = out_dir or artifact_dir / "onnx"
    if manifest.get("up_to_date"):
        click.echo(f"{target}: up to date")
        return
    errors = manifest["validation"]
    click.echo(f"exported {', '.join(sorted(manifest['models']))} to {target} (opset {opset}); onnxruntime vs torch "
               f"max abs error: encoder {errors['encoder']:.2e}, decoder_init logits "
               f"{errors['decoder_init_logits']:.2e}, decoder_step logits {errors['decoder_step_logits']:.2e}")


def _up_to_date(target: Path, checkpoint_path: Path) -> bool:
    """The folder was made from these very source files and passed validation."""
    try:
        model = json.loads((target / "model.json").read_text())
        report = json.loads((target / "validation.json").read_text())
    except (OSError, ValueError):
        return False
    from .extract import CONVERTER_VERSION

    if report.get("passed") is not True or model.get("converter_version") != CONVERTER_VERSION:
        return False
    root = checkpoint_path if checkpoint_path.is_dir() else checkpoint_path.parent
    for source_file in model["source"]["files"]:
        path = root / source_file["file"]
        if not path.is_file() or sha256_file(path) != source_file["sha256"]:
            return False
    return (target / model["weights"]["file"]).is_file()


if __name__ == "__main__":
    main()
