"""Typer app: each command builds a config, calls one library function, renders the result."""

from __future__ import annotations

import functools
import math
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional, Sequence

import typer

from mmexport import __version__, artifacts
from mmexport.config import TrainConfig, check_int
from mmexport.errors import MissingDependencyError, MMExportError, VerificationError

from .console import (
    RichProgress, console, error_console, literal, one_line, print_bench, print_comparison_model, print_demo,
    print_doctor, print_monai_bundle, print_onnx_exports, print_predictions, print_provenance, print_published, print_refold,
    print_run_summary, print_serving, print_serving_preparation, print_training_outcome, print_triton_export,
    print_verification, print_written,
)

app = typer.Typer(
    name="mmexport",
    help="MedMerge: merge two CNN backbones, fold to plain torchvision, verify, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# One source of truth for training defaults: the library's TrainConfig.
_TRAIN_DEFAULTS = TrainConfig(arch="", source_a="", source_b="", data="", out="")
RunArg = Annotated[Path, typer.Argument(help="Run directory written by `mmexport train`.")]


@dataclass(frozen=True)
class CliState:
    """What the top-level options hand down to the commands (``ctx.obj``)."""
    lock_wait: float | None = None  # --lock-wait: seconds a command that writes a run waits for another writer


def _lock_wait(ctx: typer.Context) -> float | None:
    """--lock-wait, for the library call that writes the run (None: the library's default, no wait)."""
    state = ctx.find_object(CliState)
    return state.lock_wait if state is not None else None


def _command_line() -> str:
    return shlex.join(["mmexport", *sys.argv[1:]])


def _version(value: bool) -> None:
    if value:
        console.print(f"mmexport {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
    lock_wait: Annotated[Optional[float], typer.Option(help="Seconds to wait for another command writing the same run (default 0: stop at once with one line).")] = None,
) -> None:
    """MedMerge model merging, from training to verified deployable artifacts."""
    if lock_wait is not None:
        if not (math.isfinite(lock_wait) and lock_wait >= 0):
            raise typer.BadParameter(f"must be a finite number of seconds >= 0, got {lock_wait}", param_hint="--lock-wait")
    ctx.obj = CliState(lock_wait=lock_wait)


@app.command()
def train(
    ctx: typer.Context,
    arch: Annotated[str, typer.Option(help="Architecture, e.g. resnet18, resnet50, densenet121.")],
    data: Annotated[str, typer.Option(help="Dataset: PATH[?opts] (image folder, class tree, .csv, .npz; see README) or synthetic:target.")],
    out: Annotated[Path, typer.Option(help="Run directory to create (missing parent directories are created).")],
    source_a: Annotated[str, typer.Option("--source-a", help="Source A: .safetensors, .pt/.pth, torchvision:<Weights>.<MEMBER>, or scratch[:SEED] (random initialisation). Needed by medmerge, average, finetune-a, lpft-a.")] = "",
    source_b: Annotated[str, typer.Option("--source-b", help="Source B, same forms as --source-a. Needed by medmerge, average, finetune-b, lpft-b.")] = "",
    method: Annotated[str, typer.Option(help="medmerge, average, finetune-a, finetune-b, lpft-a or lpft-b.")] = _TRAIN_DEFAULTS.method,
    granularity: Annotated[str, typer.Option(help="Merge coefficient granularity: kernel, filter or layer.")] = _TRAIN_DEFAULTS.granularity,
    merge_epochs: Annotated[int, typer.Option(help="Stage 1 epochs (merge logits + head; head only for average/lpft).")] = _TRAIN_DEFAULTS.merge_epochs,
    finetune_epochs: Annotated[int, typer.Option(help="Stage 2 epochs (full fine-tune); 0 skips it.")] = _TRAIN_DEFAULTS.finetune_epochs,
    batch_size: Annotated[int, typer.Option(help="Batch size (per process under torchrun).")] = _TRAIN_DEFAULTS.batch_size,
    lr_logits: Annotated[float, typer.Option(help="Adam learning rate of the merge logits (stage 1); chosen by benchmarks/merge_study.py.")] = _TRAIN_DEFAULTS.lr_logits,
    lr_logits_probe: Annotated[str, typer.Option(help="Comma-separated candidate logit learning rates (e.g. 0.03,0.1,0.3): each trains --lr-probe-epochs epochs, the best on val macro-F1 continues (replaces --lr-logits).")] = ",".join(f"{v:g}" for v in _TRAIN_DEFAULTS.lr_logits_probe),
    lr_probe_epochs: Annotated[int, typer.Option(help="Epochs each --lr-logits-probe candidate trains before the choice.")] = _TRAIN_DEFAULTS.lr_probe_epochs,
    sigma_bound: Annotated[float, typer.Option(help="Keep every merge coefficient σ between b and 1 - b (0: unbounded); b < 0.5.")] = _TRAIN_DEFAULTS.sigma_bound,
    lr_head: Annotated[float, typer.Option(help="Learning rate of a freshly initialised head.")] = _TRAIN_DEFAULTS.lr_head,
    lr_backbone: Annotated[float, typer.Option(help="AdamW learning rate of stage 2 (full fine-tune); use ~1e-3 for a scratch source.")] = _TRAIN_DEFAULTS.lr_backbone,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay of stage 2.")] = _TRAIN_DEFAULTS.weight_decay,
    schedule: Annotated[str, typer.Option(help="Learning-rate schedule per stage: cosine or constant.")] = _TRAIN_DEFAULTS.schedule,
    warmup_epochs: Annotated[float, typer.Option(help="Linear warm-up at the start of each stage, in epochs.")] = _TRAIN_DEFAULTS.warmup_epochs,
    patience: Annotated[int, typer.Option(help="Stop a stage after this many epochs without val macro-F1 gain; 0 never stops.")] = _TRAIN_DEFAULTS.patience,
    class_weights: Annotated[str, typer.Option(help="Loss class weights: none or balanced (inverse frequency).")] = _TRAIN_DEFAULTS.class_weights,
    sampler: Annotated[str, typer.Option(help="Training sampler: none (shuffle) or balanced (class-balanced).")] = _TRAIN_DEFAULTS.sampler,
    augmentation: Annotated[Optional[str], typer.Option(help="Training augmentation preset: none, light (default: crop + colour jitter, never flips), orientation-free (flips + 90° rotations: dermoscopy, histology) or legacy (the old default).")] = None,
    augment: Annotated[Optional[bool], typer.Option("--augment/--no-augment", help="Kept for scripts: --no-augment is --augmentation none; --augment is the default preset.")] = None,
    bn_init: Annotated[str, typer.Option(help="BatchNorm statistics before stage 1: blend (of the sources') or reestimate (on target images).")] = _TRAIN_DEFAULTS.bn_init,
    intended_use: Annotated[Optional[str], typer.Option(help="What the model is for, in your words (one line): the model card's intended use. Without it the card says research use only, not for clinical use.")] = None,
    align: Annotated[str, typer.Option(help="Source B's channels before a merge: none (as stored, the default), weights (permuted into A's order by weight matching, Git Re-Basin; exact: B computes the same; ResNets only), or auto: weights when the lineage check finds no shared ancestor, for medmerge on a ResNet, else none.")] = _TRAIN_DEFAULTS.align,
    image_size: Annotated[Optional[int], typer.Option(help="Input size (default 224 for folders, 64 for synthetic).")] = None,
    dicom_voi: Annotated[Optional[str], typer.Option(help="DICOM datasets: the VOI step recorded in the run: none (default: the full modality range), file (each file's own window; files without one are refused) or window:CENTER,WIDTH[:linear|linear_exact|sigmoid] (e.g. window:-600,1500). See docs/dicom.md.")] = None,
    dicom_frame: Annotated[Optional[int], typer.Option(help="DICOM datasets: use this frame (0-based) of multi-frame files (default: refuse them).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for every random generator (0 to 2**32-1).")] = _TRAIN_DEFAULTS.seed,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:N.")] = "auto",
    amp: Annotated[bool, typer.Option(help="Mixed precision on CUDA (bf16 where supported, else fp16).")] = _TRAIN_DEFAULTS.amp,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 0,
    force: Annotated[bool, typer.Option(help="Replace an existing run directory (or discard an interrupted one).")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run of the same config from its last epoch.")] = False,
    compare: Annotated[bool, typer.Option(help="Also train --compare-methods on every --seeds with the same settings and write the table (comparison.json): did the merge pay?")] = False,
    compare_methods: Annotated[str, typer.Option(help="Methods --compare trains beside this one (comma-separated).")] = "finetune-a,finetune-b",
    seeds: Annotated[str, typer.Option(help="Seeds of --compare, comma-separated (default: --seed only; use 3 to judge the spread).")] = "",
    keep_runs: Annotated[Optional[str], typer.Option(help="Which --compare runs to keep as complete runs: best (default: the best single source at its best seed, the run the verdict recommends), all, or none.")] = None,
    runs_dir: Annotated[Optional[Path], typer.Option(help="Where --keep-runs keeps them, as METHOD-seedN (default: RUN.compare beside the run).")] = None,
) -> None:
    """Train one method into a run directory: stage 1, fold (merge methods), stage 2."""
    from mmexport.config import DEFAULT_AUGMENTATION, parse_floats, parse_seeds

    if augment is False and augmentation not in (None, "none"):
        raise MMExportError(f"--no-augment contradicts --augmentation {augmentation}: give one of them")
    preset = "none" if augment is False else (augmentation or DEFAULT_AUGMENTATION)
    config = TrainConfig(
        arch=arch, source_a=source_a, source_b=source_b, data=data, out=str(out), method=method,
        granularity=granularity, merge_epochs=merge_epochs, finetune_epochs=finetune_epochs, batch_size=batch_size,
        lr_logits=lr_logits, lr_logits_probe=parse_floats(lr_logits_probe, "--lr-logits-probe"),
        lr_probe_epochs=lr_probe_epochs, sigma_bound=sigma_bound, lr_head=lr_head, lr_backbone=lr_backbone,
        weight_decay=weight_decay, schedule=schedule, warmup_epochs=warmup_epochs, patience=patience,
        class_weights=class_weights, sampler=sampler, augmentation=preset, bn_init=bn_init, align=align, intended_use=intended_use, image_size=image_size,
        dicom_voi=dicom_voi, dicom_frame=dicom_frame, seed=seed, device=device, amp=amp, num_workers=workers, force=force, resume=resume,
    )
    config.validate()  # before torch is imported: option errors are immediate
    compare_seeds = parse_seeds(seeds) if seeds.strip() else ()
    if compare_seeds and not compare:
        raise MMExportError("--seeds is the seed list of --compare: add --compare (or use --seed for one run)")
    if (keep_runs is not None or runs_dir is not None) and not compare:
        raise MMExportError("--keep-runs and --runs-dir say which --compare runs are kept: add --compare")
    rank = int(os.environ.get("RANK", "0"))
    progress = RichProgress() if rank == 0 else None
    lock_wait = _lock_wait(ctx)
    try:
        if compare:
            from mmexport.torchside.comparison import compare_methods as run_comparison

            methods = [m.strip() for m in compare_methods.split(",") if m.strip()]
            run_comparison(config, methods, compare_seeds, progress, command=_command_line(), lock_wait=lock_wait,
                           keep_runs=keep_runs or "best", runs_dir=runs_dir)
            run_dir = Path(config.out).expanduser().absolute()
        else:
            from mmexport.torchside.train import train as run_training

            run_dir = run_training(config, progress, command=_command_line(), lock_wait=lock_wait)
    finally:
        if progress is not None:
            progress.finish()
    if rank == 0:
        from mmexport.runs.inspect import training_outcome

        print_training_outcome(training_outcome(run_dir))


@app.command("fold")
def fold_command(
    ctx: typer.Context,
    run: RunArg,
    to: Annotated[str, typer.Option(help=f"What to write: {', '.join(artifacts.FOLD_TARGETS)}, monai-bundle. safetensors/pt re-fold the merge; onnx exports the final network; trt builds a TensorRT engine from the verified ONNX; monai-bundle writes a verified MONAI Bundle (--out, --license).")] = "safetensors",
    precision: Annotated[str, typer.Option(help="With --to onnx/trt: fp32, fp16 (fp32 I/O) or int8 (static QDQ).")] = "fp32",
    calib_data: Annotated[Optional[str], typer.Option(help="int8 calibration images (train split; any classes); default: the run's dataset.")] = None,
    calib_images: Annotated[Optional[int], typer.Option(help="Number of calibration images (default 256, all if fewer).")] = None,
    calib_method: Annotated[str, typer.Option(help="int8 calibration: minmax, entropy or percentile.")] = "minmax",
    int8_target: Annotated[str, typer.Option(help="int8 flavour: onnxruntime (U8S8, fast on CPU) or tensorrt (symmetric S8S8).")] = "onnxruntime",
    data: Annotated[Optional[str], typer.Option(help="Judge on this dataset's held-out images instead of the stored reference (needs PyTorch).")] = None,
    comparisons: Annotated[bool, typer.Option(help="With --to onnx: also export and verify the unmerged, dual and stock models (benchmark baselines).")] = False,
    min_batch: Annotated[int, typer.Option(help="With --to trt: smallest batch of the engine's optimisation profile.")] = 1,
    opt_batch: Annotated[Optional[int], typer.Option(help="With --to trt: batch TensorRT tunes for (default 8, or max if smaller).")] = None,
    max_batch: Annotated[Optional[int], typer.Option(help="With --to trt: largest batch of the profile (default 32); with --to triton: max_batch_size (default: the artifact's limit, 32 for ONNX).")] = None,
    workspace_mib: Annotated[Optional[int], typer.Option(help="With --to trt: builder workspace limit in MiB (default: TensorRT's, the GPU's memory).")] = None,
    opt_level: Annotated[int, typer.Option(help="With --to trt: builder optimisation level 0-5 (TensorRT's default 3).")] = 3,
    timing_cache: Annotated[Optional[Path], typer.Option(help="With --to trt: directory of persistent timing caches (one per TensorRT version and GPU).")] = None,
    hardware_compatibility: Annotated[Optional[str], typer.Option(help="With --to trt: none, ampere-plus or same-cc (engines that run on other GPUs).")] = None,
    version_compatible: Annotated[bool, typer.Option(help="With --to trt: an engine later TensorRT versions can run (embeds its lean runtime).")] = False,
    print_trtexec: Annotated[bool, typer.Option(help="With --to trt: only print the equivalent trtexec command (works without TensorRT).")] = False,
    accuracy_aware: Annotated[bool, typer.Option(help="int8: keep the most sensitive layers in float until the int8 policy holds.")] = True,
    int8_max_float: Annotated[float, typer.Option(help="int8: the largest fraction of weight layers the accuracy-aware search may keep in float.")] = 0.5,
    repo: Annotated[Optional[Path], typer.Option(help="With --to triton: the Triton model repository to write into (DIR/<name>/<version>/; created if missing).")] = None,
    backend: Annotated[str, typer.Option(help="With --to triton: onnxruntime (Triton's ONNX Runtime backend), tensorrt (the run's engine: --to trt first) or python (mmexport.runtime inside Triton's Python backend).")] = "onnxruntime",
    model_name: Annotated[Optional[str], typer.Option("--name", help="With --to triton: model name (default: the run directory's name, made valid).")] = None,
    preprocess: Annotated[Optional[bool], typer.Option("--preprocess/--no-preprocess", help="With --to triton: also accept encoded PNG/JPEG bytes (input image_bytes), preprocessed on the server exactly as the run recorded. Default: on with --backend python (as `serve`), off with onnxruntime/tensorrt (Triton's native backends take only the normalised tensor; --preprocess is refused there).")] = None,
    engine: Annotated[Optional[list[Path]], typer.Option("--engine", help="With --to triton --backend tensorrt: an engine of the same model built on another GPU (repeatable): cc_model_filenames.")] = None,
    allow_unverified: Annotated[bool, typer.Option(help="Publish an artifact that FAILED its check, marked unverified in the file and the manifest (loaders refuse it by default).")] = False,
    out: Annotated[Optional[Path], typer.Option(help="With --to monai-bundle: the bundle folder to create (a path ending in .zip writes a zip); inside the run it is recorded as outputs, outside under monai_bundles.")] = None,
    license_file: Annotated[Optional[Path], typer.Option("--license", help="With --to monai-bundle: the bundle's LICENSE (required by the MONAI Bundle specification).")] = None,
    authors: Annotated[Optional[str], typer.Option(help="With --to monai-bundle: metadata.json authors (default: not recorded).")] = None,
    copyright_: Annotated[Optional[str], typer.Option("--copyright", help="With --to monai-bundle: metadata.json copyright (default: not recorded, see LICENSE).")] = None,
) -> None:
    """Write the run's network in a deployable format, verified before it is published."""
    if to == "monai-bundle":
        _fold_to_monai_bundle(run, out, license_file, authors=authors, copyright=copyright_, lock_wait=_lock_wait(ctx))
        return
    if to not in artifacts.FOLD_TARGETS:
        raise MMExportError(f"unknown --to {to!r}; choose one of {', '.join(artifacts.FOLD_TARGETS)}")
    lock_wait = _lock_wait(ctx)
    if to in ("safetensors", "pt"):
        _fold_to_weights(run, to, lock_wait=lock_wait)
    elif to == "triton":
        if repo is None:
            raise MMExportError("--to triton needs --repo DIR (the Triton model repository to write into)")
        if preprocess is None:  # the same default as `serve` where the backend can preprocess at all
            preprocess = backend == "python"
        _fold_to_triton(run, repo, precision=precision, backend=backend, name=model_name, preprocess=preprocess,
                        max_batch=max_batch, engines=engine or (), lock_wait=lock_wait)
    elif to == "trt":
        for name, value in (("--min-batch", min_batch), ("--max-batch", max_batch), ("--opt-batch", opt_batch)):
            if value is not None and value < 1:
                raise MMExportError(f"{name} must be at least 1, got {value}")
        _fold_to_trt(run, precision, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
                     workspace_mib=workspace_mib, opt_level=opt_level, timing_cache=timing_cache,
                     hardware_compatibility=hardware_compatibility, version_compatible=version_compatible,
                     print_trtexec=print_trtexec, lock_wait=lock_wait)
    else:
        _fold_to_onnx(run, precision, calib_data=calib_data, calib_images=calib_images, calib_method=calib_method,
                      int8_target=int8_target, data=data, accuracy_aware=accuracy_aware, int8_max_float=int8_max_float,
                      allow_unverified=allow_unverified, comparisons=comparisons, lock_wait=lock_wait)


def _fold_to_weights(run: Path, to: str, *, lock_wait: float | None) -> None:
    """--to safetensors|pt: re-fold the merge from the unmerged checkpoint, verified against it."""
    from mmexport.torchside.operations import fold_run

    print_refold(fold_run(run, to, lock_wait=lock_wait))


def _fold_to_triton(run: Path, repo: Path, *, precision: str, backend: str, name: str | None, preprocess: bool,
                    max_batch: int | None, engines: Sequence[Path], lock_wait: float | None) -> None:
    """--to triton: a new version of the run's verified artifact in a Triton model repository, recorded in the run."""
    from mmexport.serving.triton import export_repository, record_in_run

    progress = RichProgress()
    try:
        result = export_repository(run, repo, precision=precision, backend=backend, name=name,
                                   preprocess=preprocess, max_batch=max_batch, engines=engines, progress=progress)
        record_in_run(result, lock_wait=lock_wait)
    finally:
        progress.finish()
    print_triton_export(result)


def _fold_to_monai_bundle(run: Path, out: Path | None, license_file: Path | None, *, authors: str | None,
                          copyright: str | None, lock_wait: float | None) -> None:
    """--to monai-bundle: a MONAI Bundle of the run's network, every model file verified, recorded in the run."""
    from mmexport.torchside.monai_bundle import export_monai_bundle

    if out is None:
        raise MMExportError("--to monai-bundle needs --out DIR (the bundle folder to create, or a .zip)")
    progress = RichProgress()
    try:
        try:
            result = export_monai_bundle(run, out, license_file, authors=authors, copyright=copyright,
                                         progress=progress, lock_wait=lock_wait)
        except VerificationError as exc:
            if exc.report is not None:
                print_verification(exc.report)
            raise
    finally:
        progress.finish()
    print_monai_bundle(result)


def _fold_to_trt(run: Path, precision: str, *, min_batch: int, opt_batch: int | None, max_batch: int | None,
                 workspace_mib: int | None, opt_level: int, timing_cache: Path | None,
                 hardware_compatibility: str | None, version_compatible: bool, print_trtexec: bool,
                 lock_wait: float | None) -> None:
    """--to trt: a TensorRT engine built from the verified ONNX and verified itself (or only the trtexec line)."""
    from mmexport.runs.engine_build import DEFAULT_TIMING_CACHE, EngineOptions, build_engine_run, trtexec_line

    options = EngineOptions(min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch or 32,
                            workspace_bytes=None if workspace_mib is None else workspace_mib * 2**20,
                            optimization_level=opt_level, timing_cache=timing_cache or DEFAULT_TIMING_CACHE,
                            hardware_compatibility=hardware_compatibility, version_compatible=version_compatible)
    if print_trtexec:
        console.print(one_line(trtexec_line(run, precision, options)), soft_wrap=True, markup=False, highlight=False)
        return
    progress = RichProgress()
    try:
        result = build_engine_run(run, precision, options, progress=progress, lock_wait=lock_wait)
    finally:
        progress.finish()
    print_published(result)


def _fold_to_onnx(run: Path, precision: str, *, calib_data: str | None, calib_images: int | None, calib_method: str,
                  int8_target: str, data: str | None, accuracy_aware: bool, int8_max_float: float,
                  allow_unverified: bool, comparisons: bool, lock_wait: float | None) -> None:
    """--to onnx: the final network (and with ``comparisons`` the benchmark baselines) as verified ONNX."""
    from mmexport.runs.manifest import RunDir
    from mmexport.torchside.operations import export_comparison, export_onnx_run

    progress = RichProgress()
    try:
        try:
            results = export_onnx_run(run, precision, calib_data=calib_data, calib_images=calib_images, data=data,
                                      int8_target=int8_target, calib_method=calib_method, progress=progress,
                                      allow_unverified=allow_unverified, accuracy_aware=accuracy_aware,
                                      int8_max_float=int8_max_float, lock_wait=lock_wait)
        except VerificationError as exc:
            if exc.report is not None:
                print_verification(exc.report)
            raise
        print_onnx_exports(results.values())
        if comparisons:
            opened = RunDir.open(run)
            for kind in artifacts.COMPARISON_KINDS:
                if kind == "unmerged" and precision != "fp32":
                    continue
                print_comparison_model(kind, export_comparison(opened, kind, precision, progress=progress,
                                                               lock_wait=lock_wait))
    finally:
        progress.finish()


@app.command()
def verify(
    ctx: typer.Context,
    run: RunArg,
    backend: Annotated[Optional[list[str]], typer.Option(help="torch (unmerged vs folded), onnx or trt (each artifact vs the stored reference outputs); repeatable.")] = None,
    precision: Annotated[Optional[list[str]], typer.Option(help="With --backend onnx/trt: fp32, fp16, int8 (repeatable; default: every artifact the run has).")] = None,
    data: Annotated[Optional[str], typer.Option(help="Also/instead judge on this dataset's labelled images (needs PyTorch).")] = None,
    samples: Annotated[Optional[int], typer.Option(help="Random inputs: torch backend, how many (default 64); onnx/trt, at most this many of the stored ones.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random inputs (torch backend).")] = 0,
    device: Annotated[str, typer.Option(help="Where torch runs: cpu, cuda, auto.")] = "cpu",
    manifest: Annotated[bool, typer.Option("--manifest", help="Re-hash every file of the run (and its Triton repositories) against manifest.json and trace each deployable artifact to its sources.")] = False,
) -> None:
    """Check artifacts against their reference under the project's tolerance policy; exit 1 on failure."""
    if manifest:
        _verify_manifest(run)
        if not backend:
            return
    backends = backend or ["torch"]
    for name in backends:
        artifacts.check_engine(name, "backend")
    if samples is not None:
        # every backend compares that many random inputs; 0 would compare none and prove nothing
        check_int(samples, "--samples", low=1)
    failed = []
    lock_wait = _lock_wait(ctx)
    try:
        if "torch" in backends:
            from mmexport.torchside.operations import verify_run

            report = verify_run(run, data=data, samples=64 if samples is None else samples, seed=seed, device=device,
                                lock_wait=lock_wait)
            print_verification(report)
        for name in ("onnx", "trt"):
            if name not in backends:
                continue
            from mmexport.runs.verify import verify_artifacts

            for report in verify_artifacts(run, name, list(precision) if precision else None,
                                           reference_from=_data_reference(data, samples), samples=samples, device=device,
                                           lock_wait=lock_wait):
                print_verification(report)
                if not report.passed:
                    failed.append(report)
    except VerificationError as exc:
        if exc.report is not None:
            print_verification(exc.report)
        raise
    if failed:
        first = failed[0]
        reasons = first.failures()
        # a report that ran names its candidate; one refused before running already names the file
        reason = (f"{first.candidate}: " if first.input_sets else "") + (reasons[0] if reasons else "no reason recorded")
        others = f" (and {len(failed) - 1} more artifact(s))" if len(failed) > 1 else ""
        raise VerificationError(f"verification failed{others}, see above: {reason}")
    console.print("[green]verification passed[/green]")


def _data_reference(data: str | None, samples: int | None):
    """With ``--data``: the torch side recomputes the reference on that dataset (torch is needed only then)."""
    if data is None:
        return None
    from mmexport.torchside.operations import reference_on_data

    return functools.partial(reference_on_data, data=data, samples=samples)


def _verify_manifest(run: Path) -> None:
    from mmexport.runs.provenance import verify_manifest

    report = verify_manifest(run)
    print_provenance(report)
    if not report.passed:
        bad = [f.name for f in report.files if f.state != "intact"] + [t for t, s, _ in report.repositories if s != "intact"]
        unlisted = [u.name for u in report.unexpected]
        parts = [f"{len(bad)} file(s) differ from the manifest: {', '.join(bad[:5])}"] if bad else []
        if unlisted:
            parts.append(f"{len(unlisted)} file(s) the manifest does not list would be read as part of the run: "
                         f"{', '.join(unlisted[:5])}")
        differing = [name for name, state, _ in report.embedded if state == "differs"]
        if differing:
            parts.append(f"{len(differing)} file(s) carry provenance that differs from the manifest: {', '.join(differing[:5])}")
        raise VerificationError("; ".join(parts))
    others = len(report.untracked)
    console.print("[green]every file matches the manifest[/green]"
                  + (f" ({others} other file(s) in the run are not part of it and not read by mmexport)" if others else ""))


def _coefficient_reader():
    """The torch side's per-layer coefficient reader, or None where PyTorch is not installed."""
    try:
        from mmexport.torchside.coefficients import layer_coefficients
    except ImportError:
        return None
    return layer_coefficients


@app.command()
def inspect(
    run: RunArg,
    all_parameters: Annotated[bool, typer.Option("--all", help="List every merged parameter, not only weights of conv layers.")] = False,
    plot: Annotated[Optional[Path], typer.Option(help="Also draw the per-layer mean σ(λ), input to output, to this PNG.")] = None,
) -> None:
    """Summarise a run's manifest and the per-layer mean merge coefficient (depth-wise view)."""
    from mmexport.runs.inspect import inspect_run

    if plot is not None:
        from mmexport.torchside.coefficients import plot_run_coefficients

        written = plot_run_coefficients(run, plot, all_layers=all_parameters)
        console.print(f"[green]plot written to[/green] {literal(written)}")

    summary = inspect_run(run, coefficients=_coefficient_reader())
    final_saturation = None
    if summary.coefficients and summary.training.sigma_saturation is None:
        from mmexport.torchside.coefficients import saturation

        final_saturation = saturation(summary.coefficients)
    print_run_summary(summary, all_parameters=all_parameters, final_saturation=final_saturation)


@app.command()
def bench(
    ctx: typer.Context,
    run: RunArg,
    engine: Annotated[str, typer.Option(help="torch (eager), onnx (ONNX Runtime) or trt (TensorRT engines).")] = "onnx",
    precision: Annotated[str, typer.Option(help="fp32, fp16 or int8 (ONNX/TensorRT; the folded artifact must be published).")] = "fp32",
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8,32",
    models: Annotated[Optional[str], typer.Option(help="Comma-separated: folded, unmerged (fp32 only), dual, single (stock torchvision net). Default: all that apply to the precision.")] = None,
    warmup: Annotated[float, typer.Option(help="Warm-up per model and batch size, seconds.")] = 1.0,
    duration: Annotated[Optional[float], typer.Option(help="Timed seconds per model and batch size (default 5 unless --iterations).")] = None,
    iterations: Annotated[Optional[int], typer.Option(help="Timed iterations per model and batch size instead of --duration.")] = None,
    rounds: Annotated[int, typer.Option(help="Interleaving rounds: models alternate this many times per batch size.")] = 5,
    threads: Annotated[Optional[int], typer.Option(help="Intra-op threads (ONNX Runtime session / torch).")] = None,
    device: Annotated[str, typer.Option(help="torch engine: auto, cpu, cuda.")] = "auto",
    device_timing: Annotated[Optional[str], typer.Option(help="GPU: time on the device with CUDA events; compute (copies excluded) or total (copies included).")] = None,
    cuda_graphs: Annotated[bool, typer.Option(help="GPU (torch, trt): capture and replay CUDA graphs.")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write every number plus machine and versions here.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Latency and throughput vs batch size, PNG.")] = None,
) -> None:
    """Latency and throughput of the folded network against the unmerged, dual-backbone and stock models."""
    from mmexport.bench import BenchRequest, bench_run, plot as draw, write_json
    from mmexport.runs.manifest import RunDir
    from mmexport.runtime.timing import BenchSettings

    try:
        sizes = tuple(int(b) for b in batch_sizes.split(","))
    except ValueError:
        raise MMExportError(f"--batch-sizes must be comma-separated integers, got {batch_sizes!r}") from None
    settings = BenchSettings(batch_sizes=sizes, warmup_s=warmup, rounds=rounds, iterations=iterations,
                             device_timing=device_timing,
                             duration_s=None if iterations is not None else (duration if duration is not None else 5.0))
    if models is None:
        chosen = tuple(k for k in artifacts.MODEL_KINDS if precision == "fp32" or engine == "torch" or k != "unmerged")
    else:
        chosen = tuple(m.strip() for m in models.split(",") if m.strip())
    request = BenchRequest(engine=engine, precision=precision, models=chosen, threads=threads, device=device,
                           cuda_graphs=cuda_graphs, settings=settings)
    request.validate()
    opened = RunDir.open(run)
    for target in (json_path, plot):
        if target is not None:
            opened.refuse_overwrite(target)
    if plot is not None:
        from mmexport.plots import pyplot

        pyplot()  # matplotlib (the plot extra) is there before the benchmark runs
    progress = RichProgress()
    try:
        report = bench_run(run, request, progress=progress, lock_wait=_lock_wait(ctx))
    finally:
        progress.finish()
    print_bench(report)
    if json_path is not None:
        write_json(report, json_path)
        print_written(json_path)
    if plot is not None:
        draw(report.results, plot, f"{Path(report.run).name}: {report.engine} {report.precision}")
        print_written(plot)


@app.command()
def doctor(
    run: Annotated[Optional[Path], typer.Argument(help="Optionally a run: which of its artifacts can run here, and why not.")] = None,
) -> None:
    """What this machine can do: torch and CUDA, ONNX Runtime providers, TensorRT, CUDA layer, GPU, Triton server."""
    from mmexport.serving.diagnose import doctor as diagnose

    print_doctor(diagnose(run), run)


@app.command()
def predict(
    target: Annotated[Path, typer.Argument(help="Run directory (its verified model.onnx, or --precision's), or a deployable artifact of a run (.onnx; .plan with --backend tensorrt).")],
    files: Annotated[list[Path], typer.Argument(help="Images to classify (PNG, JPEG, ...; DICOM where the model records a DICOM pipeline).")],
    top: Annotated[int, typer.Option(help="How many of the most probable classes to show per file.")] = 3,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write every result (and the model's hash and verification) to this JSON file.")] = None,
    sr_out: Annotated[Optional[Path], typer.Option(help="Write one DICOM Structured Report per classified DICOM file into this directory (created if missing; needs mmexport[dicom]).")] = None,
    backend: Annotated[str, typer.Option(help="onnxruntime (the ONNX file, CPU) or tensorrt (the run's engine, GPU).")] = "onnxruntime",
    precision: Annotated[str, typer.Option(help="With a run directory: fp32 (model.onnx), fp16 or int8.")] = "fp32",
    threads: Annotated[Optional[int], typer.Option(help="ONNX Runtime intra-op threads (default: ONNX Runtime's).")] = None,
    allow_unverified: Annotated[bool, typer.Option(help="Classify with an artifact that failed its verification or lies outside any run (the SRs and --json say so).")] = False,
) -> None:
    """Classify files with a run's deployed model, as a server would: the check to run before deploying.

    A file that cannot be read is one line in its row; the others are still classified, and the
    command exits 1 at the end.
    """
    from mmexport.runs import predict as predicting

    check_int(top, "--top", low=1)
    if threads is not None:
        check_int(threads, "--threads", low=1)
    model = predicting.resolve_model(target, backend=backend, precision=precision, allow_unverified=allow_unverified)
    predicting.check_outputs(model, json_path=json_path, sr_out=sr_out)
    with predicting.open_predictor(model, threads=threads) as predictor:
        report = predicting.predict_files(predictor, model, [str(f) for f in files], top=top, sr_out=sr_out)
    print_predictions(report)
    if json_path is not None:
        predicting.write_predictions(report, json_path)
        print_written(json_path)
    failed = report.failed
    if failed:
        first = failed[0].error or ""
        first = first if failed[0].file in first else f"{failed[0].file}: {first}"  # errors mostly name their file
        raise MMExportError(f"{len(failed)} of {len(report.rows)} file(s) failed, see the table; first: {first}")


@app.command("serve")
def serve_command(
    target: Annotated[Path, typer.Argument(help="Run directory, or a deployable artifact of a run (model[.fp16|.int8].onnx; a .plan on a GPU host).")],
    precision: Annotated[str, typer.Option(help="With a run directory: serve model.onnx (fp32), model.fp16.onnx or model.int8.onnx.")] = "fp32",
    repo: Annotated[Optional[Path], typer.Option(help="Export into this Triton model repository (kept; each call adds a version). Default: a temporary repository, removed on exit.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Model name in the repository and the URLs (default: the run directory's name, made valid).")] = None,
    preprocess: Annotated[bool, typer.Option(help="Also accept encoded PNG/JPEG bytes (input image_bytes), decoded and preprocessed on the server as the run recorded (the default, as `fold --to triton --backend python`); --no-preprocess: normalised FP32 tensors only.")] = True,
    max_batch: Annotated[Optional[int], typer.Option(help="Triton max_batch_size (default 32 for ONNX; an engine's profile maximum).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="ONNX Runtime intra-op threads of the model instance (default: ONNX Runtime's).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on. 127.0.0.1 (default) keeps the server on this machine; 0.0.0.0 exposes it without TLS or authentication.")] = "127.0.0.1",
    http_port: Annotated[Optional[int], typer.Option(help="HTTP/REST (KServe v2) port (default: a free one).")] = None,
    grpc_port: Annotated[Optional[int], typer.Option(help="gRPC port (default: a free one).")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(help="Prometheus metrics port (default: a free one).")] = None,
    ready_timeout: Annotated[float, typer.Option(help="Seconds to wait for the server and the model to be ready.")] = 120.0,
    log_file: Annotated[Optional[Path], typer.Option(help="Keep the server's log here (default: a temporary file; its tail is shown on errors).")] = None,
    prepare_python: Annotated[bool, typer.Option(help="If Triton's Python backend needs its own Python environment (numpy<2 for nvidia-pytriton 0.7) and it is missing, create it now (pip, from the configured index). Better at installation: `mmexport prepare-serving` (offline: --wheels DIR).")] = False,
    allow_untracked: Annotated[bool, typer.Option(help="Serve an .onnx that is not part of a run directory (its verification cannot be checked).")] = False,
) -> None:
    """Serve a run's verified model with Triton Inference Server on this machine, until Ctrl-C."""
    from mmexport.serving.server import serve as serve_artifact

    progress = RichProgress()
    try:
        with serve_artifact(target, repo=repo, name=name, precision=precision, preprocess=preprocess, max_batch=max_batch,
                            threads=threads, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                            ready_timeout=ready_timeout, log_file=log_file, prepare_python=prepare_python,
                            allow_untracked=allow_untracked, progress=progress) as session:
            progress.finish()
            print_serving(session)
            try:
                session.wait()
            except KeyboardInterrupt:
                console.print("stopping tritonserver …")
    finally:
        progress.finish()
    console.print("[green]tritonserver stopped[/green]")


@app.command("prepare-serving")
def prepare_serving_command(
    wheels: Annotated[Optional[Path], typer.Option(help="Install from this folder of wheels only (no index: an air-gapped host); made on a connected machine with `pip download 'numpy>=1.24,<2' --only-binary :all: -d DIR`.")] = None,
) -> None:
    """Installation step of `serve`: find tritonserver and prepare its Python backend's environment (numpy<2), once.

    Without --wheels pip uses the index it is configured for (PIP_INDEX_URL, PIP_FIND_LINKS, pip.conf).
    Afterwards `serve` runs no pip; without it, `serve` stops with one line saying to run this.
    """
    from mmexport.serving.server import prepare_serving

    progress = RichProgress()
    try:
        prepared = prepare_serving(wheels=wheels, progress=progress)
    finally:
        progress.finish()
    print_serving_preparation(prepared)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Directory for the demo's sources and run.")] = Path("mmexport-demo"),
    arch: Annotated[str, typer.Option(help="Architecture for both sources.")] = "resnet18",
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda.")] = "auto",
    force: Annotated[bool, typer.Option(help="Replace a non-empty --out that is not an earlier demo.")] = False,
) -> None:
    """Train two synthetic source backbones, merge them on the synthetic target, fold and verify."""
    from mmexport.demo import DemoConfig, run_demo

    progress = RichProgress()
    console.print("[bold]mmexport demo[/bold]: source A learns lesion pigment, source B lesion border; the target needs both.")
    try:
        summary = run_demo(DemoConfig(out=str(out), arch=arch, device=device, force=force), progress)
    finally:
        progress.finish()
    print_demo(summary)


def _one_line_warnings() -> None:
    """Library and third-party warnings as one yellow line each on stderr, not Python's two-line format."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        text = " ".join(str(message).split())
        error_console.print(f"[yellow]warning:[/yellow] {literal(text)} ({category.__name__})", soft_wrap=True,
                            highlight=False)

    warnings.showwarning = show


def _environment_error(exc: OSError) -> str:
    """A failure of the machine rather than of mmexport (disk full, file too large, read-only, permissions)."""
    import errno

    where = exc.filename or "a file"
    hints = {errno.ENOSPC: "the disk is full", errno.EFBIG: "the file size limit was reached",
             errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
             errno.EDQUOT: "the disk quota is exceeded", errno.ELOOP: "too many levels of symbolic links"}
    reason = hints.get(exc.errno, exc.strerror or type(exc).__name__)
    return f"{where}: {reason}; nothing partial was published (a file is written under a temporary name and renamed only when complete)"


TORCH_PACKAGES = ("torch", "torchvision")


def _torch_import_failure(exc: ImportError, command: str | None) -> MissingDependencyError | None:
    """``exc`` as one line naming the extra to install, when a package of the torch extra (PyTorch,
    torchvision, onnxscript, onnxconverter-common) cannot be imported; else None (a bug, with its traceback).

    ``pip install mmexport`` is the torch-free core; the torch side is imported lazily (inside commands, and
    inside the library where a path needs it: bench --engine torch, verify --data), so the one place that
    sees every such import fail is here. Every torch-side command says the same:
    ``mmexport train needs PyTorch: pip install 'mmexport[torch]'``.
    """
    import traceback

    from mmexport.environment import TORCH_EXTRA_INSTALL, TORCH_EXTRA_MODULES

    missing = (exc.name or "").split(".")[0]
    # A broken installation fails while ``import torch`` itself runs (torch/__init__.py at module level, e.g. a
    # missing CUDA library); an ImportError of another package that torch imports lazily later is not torch's.
    broken = next((frame.f_globals.get("__name__") for frame, _ in traceback.walk_tb(exc.__traceback__)
                   if frame.f_globals.get("__name__") in TORCH_PACKAGES and frame.f_code.co_name == "<module>"), None)
    needs = f"mmexport {command}" if command else "this command"
    if missing in TORCH_PACKAGES:
        what = "PyTorch"
    elif missing in TORCH_EXTRA_MODULES:
        what = f"{missing.replace('_', '-')} (part of the torch extra)"
    elif broken is not None:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        what = f"PyTorch, and {broken} is installed but cannot be imported ({reason}); reinstall it"
    else:
        return None
    return MissingDependencyError(f"{needs} needs {what}: {TORCH_EXTRA_INSTALL}")


class _OneLineRecords:
    """A logging filter: a library log record (which may quote file text) as one terminal-safe line."""

    @staticmethod
    def filter(record) -> bool:
        record.msg, record.args = one_line(record.getMessage()), None
        return True


def _print_error(message: str) -> None:
    error_console.print(f"[red]error:[/red] {literal(message)}", soft_wrap=True, highlight=False)


def main() -> None:
    """Entry point: library errors become one red line and exit 1 (traceback with MMEXPORT_DEBUG=1).

    Click's standalone mode handles usage errors (exit 2) and Ctrl-C itself and lets
    every other exception through: ``MMExportError`` (the user's input or a failed
    check), ``OSError`` (the machine: disk full, file-size limits, permissions) and an
    ``ImportError`` of PyTorch (a torch-free host running a torch-side command) become
    one line here, with every control character and line break escaped.
    """
    debug = os.environ.get("MMEXPORT_DEBUG") == "1"
    if not debug:
        _one_line_warnings()
    import logging

    from rich.logging import RichHandler

    # The library logs diagnostics under "mmexport.*" and never configures logging; the CLI shows them.
    handler = RichHandler(console=error_console, show_time=False, show_path=debug, markup=False)
    handler.addFilter(_OneLineRecords())
    library_logger = logging.getLogger("mmexport")
    library_logger.addHandler(handler)
    library_logger.setLevel(logging.DEBUG if debug else logging.WARNING)
    command = typer.main.get_command(app)
    try:
        command.main(prog_name="mmexport", standalone_mode=True)
    except MMExportError as exc:
        if debug:
            raise
        _print_error(str(exc))
        sys.exit(1)
    except OSError as exc:
        if debug:
            raise
        _print_error(_environment_error(exc))
        sys.exit(1)
    except ImportError as exc:
        invoked = next((arg for arg in sys.argv[1:] if arg in getattr(command, "commands", {})), None)
        missing = _torch_import_failure(exc, invoked)
        if debug or missing is None:
            raise
        _print_error(str(missing))
        sys.exit(1)


if __name__ == "__main__":
    main()
