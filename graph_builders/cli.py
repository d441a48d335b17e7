"""`graph-builders compile`: model.json -> compiled MAX artifacts for one device."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .compile import DECODER_WEIGHTS, DEFAULT_GPU_ARCH, CompileError, compile_model


@click.group()
def main() -> None:
    """Build and compile Whisper's MAX graphs."""


@main.command("compile")
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.option("--arch", default=None, help=f"GPU architecture (default {DEFAULT_GPU_ARCH}); cross-compiled when no GPU is attached")
@click.option("--decoder-weights", type=click.Choice(DECODER_WEIGHTS), default="auto", show_default=True,
              help="auto: fp16 when the checkpoint's tensors are fp16 (exact), else fp32; "
                   "fp16: round an fp32 checkpoint's decoder weights to fp16 (faster, other numerics); "
                   "int8: the decoder's per-token weights and the encoder's matmuls in int8, CPU, into "
                   "<model>/cpu-int8 beside the exact build (faster, not exact; the runtime's --compute-type int8)")
def compile_command(artifact_dir: Path, device: str, arch: str | None, decoder_weights: str) -> None:
    try:
        target = compile_model(artifact_dir, device, arch, log=lambda m: click.echo(m, err=True),
                               decoder_weights=decoder_weights)
    except CompileError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(str(target))


if __name__ == "__main__":
    main()
