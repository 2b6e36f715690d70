"""Command line: parse arguments, call one function per command, print. Nothing else lives here."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time

from replaceme_jax import interrupt
from replaceme_jax.errors import ReplaceMeError, UsageError

INTERRUPTED = 130

log = logging.getLogger("replaceme_jax")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse exits 2 with usage; keep that, but as one clear line
        raise UsageError(message)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="replaceme-jax", description="Training-free compression of LLMs in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("convert", help="convert an HF directory, GGUF file or orbax checkpoint")
    p.add_argument("src", help="HF model directory, GGUF file, orbax checkpoint of this tool, or 'smollm2-135m'")
    p.add_argument("dst", help="output directory")
    p.add_argument("--format", choices=("hf", "orbax"), default="hf")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the source's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    _add_common(p)

    for name, text in (("compress", "ReplaceMe: prune a block of layers and fold a linear map into the MLP"),
                       ("distances", "write only the angular-distance profile of candidate blocks")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", default=None, help="YAML config (keys as in the reference ReplaceMe tool)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
        p.add_argument("--overwrite", action="store_true", help="replace an existing save_path")
        p.add_argument("--restart", action="store_true", help="discard the saved state of an interrupted run")
        _add_common(p)

    p = sub.add_parser("experts", help="MoE expert pruning (frequency, EAN, REAP) or merging (REAM)")
    p.add_argument("--config", default=None, help="YAML config (method, num_experts or compression_ratio, ...)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--overwrite", action="store_true", help="replace an existing save_path")
    _add_common(p)

    p = sub.add_parser("evaluate", help="perplexity, zero-shot multiple-choice accuracy and greedy generations of "
                                        "one or more models")
    p.add_argument("--model", action="append", required=True, metavar="PATH",
                   help="HF directory, GGUF file, orbax checkpoint or 'smollm2-135m'; repeat to compare "
                        "(later models are also shown as %% of the first)")
    p.add_argument("--tasks", default=None, help="comma-separated: wikitext2, lambada_openai, arc_easy, "
                   "arc_challenge, piqa, hellaswag, winogrande, boolq, openbookqa, gen_exact (bundled greedy "
                   "exact match), ppl:FILE, mc:FILE, gen:FILE")
    p.add_argument("--data-dir", default=None, help="folder of the task files (default: ../shared/data/eval)")
    p.add_argument("--limit", default=None, metavar="N|TASK=N,...",
                   help="first N items of each task (windows for perplexity); per task as wikitext2=16,arc_easy=200; "
                        "a plain number beside them sets the rest (100,wikitext2=8)")
    p.add_argument("--max-length", type=int, default=1024,
                   help="perplexity window in tokens (each window scored alone); longer "
                        "multiple-choice inputs are cut on the left")
    p.add_argument("--bos", choices=("auto", "always", "never"), default="auto",
                   help="a BOS token in front of every scored sequence: auto (default) for the model types "
                        "lm-evaluation-harness gives one (Gemma), always, or never")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--generate", default=None, metavar="FILE",
                   help="prompts, one a line: every model's greedy continuation side by side in the report "
                        "and a printed table")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per --generate prompt")
    p.add_argument("--reference", default=None, metavar="MODEL",
                   help="a model with the same tokenizer (the original, say): every scoring task adds the mean "
                        "KL(reference || model) and top-1 agreement on the tokens it scores")
    p.add_argument("--output", default=None, help="JSON report; a bar chart PNG is written next to it")
    p.add_argument("--mesh", default=None, type=_mesh_arg, metavar="AXIS=SIZE[,AXIS=SIZE]",
                   help="shard the models over a device mesh (axes data, fsdp, tensor; one size may be -1: "
                        "the devices left), e.g. data=4,tensor=2; batches are split over data x fsdp "
                        "(default: one device)")
    _add_common(p)
    return parser


def _mesh_arg(text: str) -> dict[str, int]:
    """``data=4,tensor=2`` -> ``{"data": 4, "tensor": 2}`` (the axes and sizes are checked by make_mesh)."""
    out = {}
    for part in text.split(","):
        axis, sep, size = part.partition("=")
        try:
            out[axis.strip()] = int(size)
        except ValueError:
            sep = ""
        if not sep or not axis.strip():
            raise argparse.ArgumentTypeError(f"expected AXIS=SIZE[,AXIS=SIZE], e.g. data=4,tensor=2 (got {text!r})")
    return out


def cmd_convert(args) -> int:
    from replaceme_jax.conversion import export_hf, load_model, save_orbax
    from replaceme_jax.conversion.export import check_output_location, exported_bytes
    from replaceme_jax.conversion.model_io import check_finite

    from pathlib import Path

    from replaceme_jax.conversion.model_io import check_model_source
    from replaceme_jax.errors import OutputExistsError

    start = time.perf_counter()
    dst = Path(args.dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not args.overwrite:
        raise OutputExistsError(dst)
    check_output_location(dst, 0)
    check_model_source(args.src)
    model = load_model(args.src, dtype=args.dtype)
    check_finite(model.params, args.src)
    check_output_location(args.dst, exported_bytes(model.params, args.dtype or model.source_dtype))
    log.info("loaded %s (%s, %d layers) in %.1f s", args.src, model.config.model_type,
             model.config.num_hidden_layers, time.perf_counter() - start)
    if args.format == "orbax":
        out = save_orbax(model, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    else:
        out = export_hf(model, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {args.format} model to {out} ({time.perf_counter() - start:.1f} s)")
    return 0


def _compress_config(args):
    from replaceme_jax.config import CompressConfig, load_config

    overrides = list(args.set) + (["overwrite=true"] if args.overwrite else [])
    return load_config(CompressConfig, args.config, overrides)


def cmd_compress(args, distances_only: bool = False) -> int:
    from replaceme_jax.replaceme.pipeline import compress

    result = compress(_compress_config(args), distances_only=distances_only, restart=args.restart)
    report = result.report
    print(f"blocks removed: {report['blocks']} ({report['num_hidden_layers_before']} -> "
          f"{report['num_hidden_layers_after']} layers, {report['calibration_tokens']} calibration tokens)")
    for block in report["block_results"]:
        errors = [f"{block[key]:.4f} {label}" for key, label in (
            ("relative_error_without_T", "without T"), ("relative_error_with_T", "with T")) if block[key] is not None]
        unmeasured = "not measured (not a block of layers_to_skip layers)"
        print(f"  block {block['block']}: relative error {', '.join(errors) or unmeasured}")
    if result.save_path is not None:
        what = "distance profile" if distances_only else "model and report"
        print(f"wrote {what} to {result.save_path} (report: {result.save_path / 'replaceme_report.json'})")
    return 0


def cmd_distances(args) -> int:
    return cmd_compress(args, distances_only=True)


def cmd_evaluate(args) -> int:
    from pathlib import Path

    from replaceme_jax.evaluation import generation_table, markdown_table, paired_table, run_evaluation

    report = run_evaluation(args.model, args.tasks or (), data_dir=args.data_dir, limit=args.limit,
                            max_length=args.max_length, batch_size=args.batch_size, output=args.output,
                            progress=not args.quiet, generate=args.generate, max_new_tokens=args.max_new_tokens,
                            reference=args.reference, mesh=args.mesh,
                            bos={"auto": "auto", "always": True, "never": False}[args.bos])
    tables = [markdown_table(report), paired_table(report),
              generation_table(report) if "generation" in report else ""]
    print("\n\n".join(t for t in tables if t))
    if args.output:
        chart = Path(args.output).with_suffix(".png")
        print(f"wrote {args.output}" + (f" and {chart}" if report["settings"]["tasks"] else ""))
    return 0


def cmd_experts(args) -> int:
    from replaceme_jax.config import load_config
    from replaceme_jax.experts.config import ExpertsConfig
    from replaceme_jax.experts.pipeline import compress_experts

    overrides = list(args.set) + (["overwrite=true"] if args.overwrite else [])
    result = compress_experts(load_config(ExpertsConfig, args.config, overrides))
    report = result.report
    print(f"{report['method']}: {report['num_experts_before']} -> {report['num_experts_after']} experts per layer "
          f"({report['calibration_tokens']} calibration tokens)")
    print(f"wrote model, experts_report.json and experts_recipe.json to {result.save_path}")
    return 0


COMMANDS = {"convert": cmd_convert, "compress": cmd_compress, "distances": cmd_distances, "evaluate": cmd_evaluate,
            "experts": cmd_experts}


INTERRUPT_GRACE_S = 1.5  # how long the worker gets to stop at its next check before the process exits


def _configure_logging(quiet: bool, debug: bool) -> None:
    # Our own progress at INFO; other libraries' INFO chatter (orbax and absl print dozens of lines per
    # checkpoint) only with --debug.
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("replaceme_jax").setLevel(logging.WARNING if quiet else logging.INFO)
    if not debug:
        for name in ("absl", "orbax", "jax._src.xla_bridge"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _run_in_worker(command, args) -> int:
    """Run ``command(args)`` in a worker thread; the main thread stays free to take Ctrl-C at once."""
    outcome: dict = {}

    def work():
        try:
            outcome["value"] = command(args)
        except BaseException as e:  # re-raised in the main thread
            outcome["error"] = e

    interrupt.clear()
    worker = threading.Thread(target=work, name="replaceme-jax", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)
    except KeyboardInterrupt:
        interrupt.request()
        worker.join(INTERRUPT_GRACE_S)
        interrupt.remove_temporaries()  # if the worker is still inside a long XLA call
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        _configure_logging(args.quiet, debug)
        return _run_in_worker(COMMANDS[args.command], args)
    except ReplaceMeError as e:
        if debug:
            raise
        print(f"replaceme-jax: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # disk full, read-only location, ...: one line, no traceback
        if debug:
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"replaceme-jax: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("replaceme-jax: interrupted", file=sys.stderr)
        return INTERRUPTED


def entry() -> None:
    """The ``replaceme-jax`` console script."""
    code = main()
    if code == INTERRUPTED:
        # The worker may still be inside an XLA call, which interpreter shutdown would wait for.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
