"""``spinquant quantize`` and ``spinquant eval``.

Flags and their defaults come from the dataclasses that own them: the bit
preset, rotation and weight method from ``SpinQuantConfig`` and its enums,
the run options (steps, samples, learning rate, ...) from
``pipeline.PipelineOptions``, evaluation defaults from the signatures in
``evaluate``. Bad input (a missing model or checkpoint, a bad value) exits with
status 2 and a message naming the flag and the value.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import sys
import time
import typing
from collections.abc import Sequence

from spinquant_kernels import format as fmt

# Help texts only; defaults live in the dataclasses.
_HELP = {
    "steps": "Cayley SGD iterations of rotation learning",
    "calib_samples": "calibration windows for rotation learning",
    "seqlen": "tokens per calibration window",
    "lr": "initial learning rate of Cayley SGD (decays linearly to 0)",
    "batch_size": "windows per rotation-learning step",
    "seed": "seed of the random Hadamard init and of the calibration windows",
    "gptq_samples": "calibration windows for GPTQ",
    "act_order": "GPTQ: quantize columns in order of decreasing Hessian diagonal",
    "weight_clip_search": "weight scales by the MSE clip search (else absmax), in learning and quantization",
    "device": "torch device for the pipeline (cpu, cuda, cuda:1, ...)",
    "progress": "show progress bars",
    "act_clip": "activation clipping ratio (1.0 = min-max)",
    "kv_clip": "KV cache clipping ratio (1.0 = min-max)",
    "r4_size": "block size of the online Hadamard R4 on the down_proj input: a Hadamard order dividing "
               "the intermediate size (blocks smaller than it for tensor-parallel shards); unset: derived "
               "from the model, the whole intermediate size (rotation none has no R4)",
}
# SpinQuantConfig fields exposed as flags besides --bits / --rotation / --weights.
_CONFIG_FLAGS = ("act_clip", "kv_clip", "r4_size")


def _default(cls, name: str):
    return {f.name: f.default for f in dataclasses.fields(cls)}[name]


def _flag_type(cls, f: dataclasses.Field) -> type | None:
    """The flag's value type: the default's, or for a ``None`` default the other member of ``T | None``."""
    if f.default is not None:
        return type(f.default) if isinstance(f.default, (bool, int, float, str)) else None
    args = [a for a in typing.get_args(typing.get_type_hints(cls)[f.name]) if a is not type(None)]
    return args[0] if len(args) == 1 and args[0] in (int, float, str) else None


def _add_dataclass_flags(group, cls, names: Sequence[str] | None = None) -> list[str]:
    """One flag per primitive field of ``cls`` (``foo_bar`` -> ``--foo-bar``), default from the field.

    A field of type ``T | None`` with default ``None`` becomes an optional ``T`` flag.
    """
    added = []
    for f in dataclasses.fields(cls):
        if names is not None and f.name not in names:
            continue
        if f.default is dataclasses.MISSING:
            continue
        kind = _flag_type(cls, f)
        if kind is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_ = _HELP.get(f.name, f.name)
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=f.default, help=help_)
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=f.default,
                               metavar=kind.__name__.upper(), help=help_)
        added.append(f.name)
    return added


def build_parser() -> argparse.ArgumentParser:
    from . import evaluate
    from .pipeline import PipelineOptions

    parser = argparse.ArgumentParser(
        prog="spinquant", description="SpinQuant: learn rotations, quantize to W4A4KV4, evaluate.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{quantize,eval}")

    q = sub.add_parser("quantize", help="write a SpinQuant checkpoint from a float model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("--model", default=None,
                   help="GGUF file or Hugging Face directory (default: the bundled SmolLM2-135M-Instruct)")
    q.add_argument("--out", required=True, help="checkpoint directory to write (atomically)")
    q.add_argument("--rotation", choices=[r.value for r in fmt.Rotation],
                   default=fmt.Rotation(_default(fmt.SpinQuantConfig, "rotation")).value,
                   help="learned (SpinQuant), random Hadamard (QuaRot-style) or none")
    q.add_argument("--weights", choices=[w.value for w in fmt.WeightMethod],
                   default=fmt.WeightMethod(_default(fmt.SpinQuantConfig, "weight_method")).value,
                   help="weight quantizer")
    default_bits = fmt.SpinQuantConfig().preset
    q.add_argument("--bits", choices=[p.value for p in fmt.Preset], default=fmt.Preset(default_bits).value,
                   help="weight / activation / KV cache bit widths")
    q.add_argument("--rotations", default=None, metavar="PATH",
                   help="rotations.pt of an earlier learned run: reuse its R1/R2 instead of learning "
                        "(needs --rotation learned)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    quant = q.add_argument_group("quantization")
    _add_dataclass_flags(quant, fmt.SpinQuantConfig, _CONFIG_FLAGS)
    quant.add_argument("--tensor-parallel-sizes", "--tp", dest="tensor_parallel_sizes",
                       type=_tp_sizes, default=_default(fmt.SpinQuantConfig, "tensor_parallel_sizes"),
                       metavar="T[,T...]",
                       help="tensor-parallel degrees the checkpoint must serve at (vLLM "
                            "--tensor-parallel-size), e.g. 1,2,4,8: without --r4-size, R4 gets the "
                            "largest Hadamard order dividing intermediate / lcm(T) so that every rank's "
                            "shard holds whole blocks; with it, each T is checked. quantization_config"
                            ".tensor_parallel_sizes records every degree the blocks fit (vLLM also "
                            "needs T to divide the attention heads)")
    _add_dataclass_flags(q.add_argument_group("pipeline (defaults: the paper's settings)"), PipelineOptions)
    q.set_defaults(func=_quantize, subparser=q)

    e = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("ckpt", metavar="CKPT",
                   help="SpinQuant checkpoint directory (a GGUF file or a float Hugging Face "
                        "directory is evaluated unquantized, as the FP baseline)")
    ppl_sig = inspect.signature(evaluate.perplexity).parameters
    zs_sig = inspect.signature(evaluate.zeroshot).parameters
    e.add_argument("--ppl-windows", type=int, default=ppl_sig["max_windows"].default, metavar="N",
                   help="perplexity windows to score (default: all of the held-out text); 0 skips perplexity")
    e.add_argument("--seqlen", type=int, default=ppl_sig["seqlen"].default, help="perplexity window length")
    e.add_argument("--ppl-batch-size", type=int, default=ppl_sig["batch_size"].default, metavar="N",
                   help="perplexity windows per forward pass")
    e.add_argument("--zeroshot-limit", type=int, default=zs_sig["limit"].default, metavar="N",
                   help="documents per task (default: the full validation sets); 0 skips zero-shot")
    e.add_argument("--tasks", nargs="+", default=list(zs_sig["tasks"].default), metavar="TASK",
                   help="zero-shot tasks (aliases such as siqa, arc-e accepted)")
    e.add_argument("--batch-tokens", type=int, default=zs_sig["batch_tokens"].default, metavar="N",
                   help="zero-shot tokens per forward pass")
    e.add_argument("--device", default=_default(PipelineOptions, "device"), help="torch device")
    e.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="also write the results here")
    e.set_defaults(func=_eval, subparser=e)
    return parser


# ----------------------------------------------------------------------------
# validation helpers (each failure -> parser.error -> exit status 2)
# ----------------------------------------------------------------------------
def _tp_sizes(text: str) -> tuple[int, ...]:
    """``"1,2,4,8"`` -> ``(1, 2, 4, 8)``; argparse turns the ValueError into exit status 2."""
    try:
        sizes = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated ints >= 1 (e.g. 1,2,4,8), got {text!r}") from None
    if any(t < 1 for t in sizes):
        raise argparse.ArgumentTypeError(f"must be ints >= 1, got {text!r}")
    return sizes


def _check_device(parser: argparse.ArgumentParser, device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        parser.error(f"--device {device!r} is not a torch device: {e}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device!r}: CUDA is not available on this machine")


def _quantize(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from . import pipeline
    from .model import default_model_path

    if args.model is None:
        try:
            args.model = default_model_path()
        except FileNotFoundError as e:
            parser.error(f"--model not given and the default model is unavailable: {e}")
    elif not os.path.exists(args.model):
        parser.error(f"--model {args.model!r} does not exist")
    if args.rotations is not None:
        if not os.path.isfile(args.rotations):
            parser.error(f"--rotations {args.rotations!r} does not exist")
        if args.rotation != fmt.Rotation.LEARNED.value:
            parser.error(f"--rotations needs --rotation learned, got --rotation {args.rotation}")
    if os.path.lexists(args.out) and not args.overwrite:
        parser.error(f"--out {args.out!r} exists; pass --overwrite to replace it")
    _check_device(parser, args.device)
    try:
        cfg = fmt.SpinQuantConfig.from_preset(
            args.bits, rotation=args.rotation, weight_method=args.weights,
            tensor_parallel_sizes=args.tensor_parallel_sizes,
            **{k: getattr(args, k) for k in _CONFIG_FLAGS})
        opts = pipeline.PipelineOptions(**{f.name: getattr(args, f.name)
                                           for f in dataclasses.fields(pipeline.PipelineOptions)
                                           if hasattr(args, f.name)})
    except ValueError as e:
        parser.error(str(e))
    t0 = time.time()
    kw = {"overwrite": args.overwrite}
    if args.rotations is not None:
        kw["rotations_path"] = args.rotations
    try:
        meta = pipeline.quantize(args.model, args.out, cfg, opts, **kw)
    except pipeline.ConfigMismatchError as e:  # r4_size / tensor parallel sizes vs the model
        parser.error(str(e))
    written = (meta or {}).get("config", {})
    print(json.dumps({"checkpoint": os.path.abspath(args.out), "config": cfg.preset,
                      "rotation": cfg.rotation.value, "weights": cfg.weight_method.value,
                      "r4_size": written.get("r4_size"),
                      "tensor_parallel_sizes": written.get("tensor_parallel_sizes"),
                      "wall_s": round(time.time() - t0, 1),
                      "timings_s": (meta or {}).get("timings_s")}, indent=2, default=str))
    return 0


def _is_checkpoint(path: str) -> bool:
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    with open(cfg, encoding="utf-8") as f:
        try:
            return "quantization_config" in json.load(f)
        except json.JSONDecodeError:
            return True  # let the checkpoint loader report it


def _eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from . import data, evaluate
    from .checkpoint import CheckpointError, load_checkpoint

    if not os.path.exists(args.ckpt):
        parser.error(f"CKPT {args.ckpt!r} does not exist")
    for flag, v, lo in (("--ppl-windows", args.ppl_windows, 0), ("--zeroshot-limit", args.zeroshot_limit, 0),
                        ("--seqlen", args.seqlen, 2), ("--ppl-batch-size", args.ppl_batch_size, 1),
                        ("--batch-tokens", args.batch_tokens, 1)):
        if v is not None and v < lo:
            parser.error(f"{flag} must be >= {lo}, got {v}")
    try:
        tasks = [evaluate.canonical_task(t) for t in args.tasks]
    except ValueError as e:
        parser.error(f"--tasks: {e}")
    _check_device(parser, args.device)

    t0 = time.time()
    result: dict = {"checkpoint": os.path.abspath(args.ckpt)}
    if os.path.isdir(args.ckpt) and _is_checkpoint(args.ckpt):
        try:
            model, tokenizer, cfg = load_checkpoint(args.ckpt, dtype=torch.float32, device=args.device)
        # CheckpointError: corrupt files; ValueError: a config that does not fit the model
        except (CheckpointError, ValueError) as e:
            parser.error(f"CKPT {args.ckpt!r} refused: {e}")
        result["quantization"] = cfg.to_dict()
    else:
        from .model import load_model
        try:
            model, tokenizer = load_model(args.ckpt, dtype=torch.float32, device=args.device)
        except (OSError, ValueError) as e:
            parser.error(f"CKPT {args.ckpt!r} is neither a SpinQuant checkpoint nor a loadable model: {e}")
        result["quantization"] = None
    if args.ppl_windows != 0:
        ids = data.eval_ids(tokenizer)
        ppl = evaluate.perplexity(model, ids, seqlen=args.seqlen, max_windows=args.ppl_windows,
                                  batch_size=args.ppl_batch_size)
        n = ids.shape[1] // args.seqlen
        result["perplexity"] = {"wiki": ppl, "seqlen": args.seqlen,
                                "windows": n if args.ppl_windows is None else min(n, args.ppl_windows),
                                "text": "wiki.utf8 evaluation part (every 4th article; see spinquant_offline.data)"}
    if args.zeroshot_limit != 0:
        result["zeroshot"] = evaluate.zeroshot(model, tokenizer, tasks=tasks, limit=args.zeroshot_limit,
                                               batch_tokens=args.batch_tokens)
    result["wall_s"] = round(time.time() - t0, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``main(["quantize", ...])`` / ``main(["eval", CKPT, ...])``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args, args.subparser)


if __name__ == "__main__":
    sys.exit(main())
