"""The ``automp`` command line. Each command builds its typed settings and calls the pipeline.

With ``--json`` a command prints exactly one JSON object as the last line of stdout; progress bars
and logs go to stderr. Errors print one line, ``error: ...``, and exit with status 2.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from automp.errors import AutompError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Automated mixed-precision quantization of LLMs.")

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML file of settings; flags override it.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Local model directory or hub id.")]
SeqlenOpt = Annotated[int | None, typer.Option("--seqlen", help="Window length (default 2048, capped at the model's).")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="auto, float32, float16 or bfloat16.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto, cpu or cuda.")]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", help="Windows per forward pass.")]
RemoteOpt = Annotated[bool | None, typer.Option("--trust-remote-code", help="Run the model repo's own code.")]


def _command(func):
    """Turn AutompError into one clear line on stderr and exit status 2, with no traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        _quiet_libraries()
        try:
            return func(*args, **kwargs)
        except AutompError as err:
            typer.echo("error: " + " ".join(str(err).split()), err=True)  # always one line
            raise typer.Exit(2) from None

    return wrapper


def _quiet_libraries() -> None:
    import warnings

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning)


def _flags(params: dict) -> dict:
    """A command's own option values, without the ones that steer the CLI itself."""
    return {k: v for k, v in params.items() if k not in ("config", "json_out")}


def _emit(result: dict, as_json: bool, human: str) -> None:
    if as_json:
        print(json.dumps(result, default=str), flush=True)
    else:
        print(human, flush=True)


@app.command()
@_command
def quantize(
    model: ModelOpt = None,
    scheme: Annotated[str | None, typer.Option(help="Format for every layer, e.g. w4g128, w3g128a, nf4g64.")] = None,
    method: Annotated[str | None, typer.Option(help="rtn or gptq.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output directory.")] = None,
    calib: Annotated[str | None, typer.Option(help="Calibration text: .txt, .jsonl, wikitext2 or c4.")] = None,
    nsamples: Annotated[int | None, typer.Option(help="Calibration windows.")] = None,
    seqlen: SeqlenOpt = None,
    eval: Annotated[str | None, typer.Option("--eval", help="Evaluation text for perplexity.")] = None,
    damp: Annotated[float | None, typer.Option(help="GPTQ relative damping.")] = None,
    act_order: Annotated[bool | None, typer.Option("--act-order/--no-act-order", help="GPTQ column order.")] = None,
    lm_head: Annotated[bool | None, typer.Option("--lm-head", help="Quantize lm_head too.")] = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    batch_size: BatchOpt = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the calibration windows.")] = None,
    trust_remote_code: RemoteOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Quantize every layer uniformly with RTN or GPTQ and save the packed model."""
    flags = _flags(locals())
    from automp.pipeline import quantize as run
    from automp.settings import QuantizeSettings, load_settings

    metrics = run(load_settings(QuantizeSettings, config, flags))
    human = f"{metrics['scheme']} ({metrics['method']}): {metrics['avg_bits']:.4f} bits/weight, "
    human += f"{metrics['bytes'] / 1e6:.3f} MB" + (f", ppl {metrics['ppl']:.3f}" if "ppl" in metrics else "")
    _emit(metrics, json_out, human)


@app.command("eval")
@_command
def eval_(
    model: ModelOpt = None,
    ppl: Annotated[str | None, typer.Option("--ppl", help="Perplexity text: .txt, .jsonl, wikitext2, c4.")] = None,
    seqlen: SeqlenOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    batch_size: BatchOpt = None,
    trust_remote_code: RemoteOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Evaluate a model (or an automp output directory): perplexity."""
    flags = _flags(locals())
    from automp.pipeline import evaluate
    from automp.settings import EvalSettings, load_settings

    result = evaluate(load_settings(EvalSettings, config, flags))
    _emit(
        result, json_out, f"perplexity {result['ppl']:.3f} over {result['windows']} windows ({result['tokens']} tokens)"
    )


@app.command()
@_command
def demo(
    out: Annotated[Path | None, typer.Option(help="Also write the results here (JSON).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Offline demo on a small model trained here from the standard library's documentation."""
    from automp.demo import run_demo

    result = run_demo(out)
    table = result.pop("table")
    _emit(result, json_out, table)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
