"""Typer app: each command builds a config, calls one library function, renders the result."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from mmexport import __version__
from mmexport.errors import MMExportError, VerificationError
from mmexport.train import TrainConfig

from .console import RichProgress, bench_table, console, error_console, ratio_table_view, verification_table

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


def _command_line() -> str:
    return shlex.join(["mmexport", *sys.argv[1:]])


def _version(value: bool) -> None:
    if value:
        console.print(f"mmexport {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """MedMerge model merging, from training to verified deployable artifacts."""


@app.command()
def train(
    arch: Annotated[str, typer.Option(help="Architecture, e.g. resnet18, resnet50, densenet121.")],
    source_a: Annotated[str, typer.Option("--source-a", help="Source A: .safetensors, .pt/.pth, or torchvision:<Weights>.<MEMBER>.")],
    source_b: Annotated[str, typer.Option("--source-b", help="Source B, same forms as --source-a.")],
    data: Annotated[str, typer.Option(help="Dataset: PATH[?opts] (image folder, class tree, .csv, .npz; see README) or synthetic:target.")],
    out: Annotated[Path, typer.Option(help="Run directory to create.")],
    method: Annotated[str, typer.Option(help="medmerge, average, finetune-a, finetune-b, lpft-a or lpft-b.")] = _TRAIN_DEFAULTS.method,
    granularity: Annotated[str, typer.Option(help="Merge coefficient granularity: kernel, filter or layer.")] = _TRAIN_DEFAULTS.granularity,
    merge_epochs: Annotated[int, typer.Option(help="Stage 1 epochs (merge logits + head; head only for average/lpft).")] = _TRAIN_DEFAULTS.merge_epochs,
    finetune_epochs: Annotated[int, typer.Option(help="Stage 2 epochs (full fine-tune); 0 skips it.")] = _TRAIN_DEFAULTS.finetune_epochs,
    batch_size: Annotated[int, typer.Option(help="Batch size (per process under torchrun).")] = _TRAIN_DEFAULTS.batch_size,
    lr_logits: Annotated[float, typer.Option(help="Adam learning rate of the merge logits (stage 1); chosen by benchmarks/merge_study.py.")] = _TRAIN_DEFAULTS.lr_logits,
    lr_head: Annotated[float, typer.Option(help="Learning rate of a freshly initialised head.")] = _TRAIN_DEFAULTS.lr_head,
    lr_backbone: Annotated[float, typer.Option(help="AdamW learning rate of stage 2 (full fine-tune).")] = _TRAIN_DEFAULTS.lr_backbone,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay of stage 2.")] = _TRAIN_DEFAULTS.weight_decay,
    schedule: Annotated[str, typer.Option(help="Learning-rate schedule per stage: cosine or constant.")] = _TRAIN_DEFAULTS.schedule,
    warmup_epochs: Annotated[float, typer.Option(help="Linear warm-up at the start of each stage, in epochs.")] = _TRAIN_DEFAULTS.warmup_epochs,
    patience: Annotated[int, typer.Option(help="Stop a stage after this many epochs without val macro-F1 gain; 0 never stops.")] = _TRAIN_DEFAULTS.patience,
    class_weights: Annotated[str, typer.Option(help="Loss class weights: none or balanced (inverse frequency).")] = _TRAIN_DEFAULTS.class_weights,
    sampler: Annotated[str, typer.Option(help="Training sampler: none (shuffle) or balanced (class-balanced).")] = _TRAIN_DEFAULTS.sampler,
    augment: Annotated[bool, typer.Option(help="Training augmentation (flips; resized crop for image folders).")] = _TRAIN_DEFAULTS.augment,
    bn_init: Annotated[str, typer.Option(help="BatchNorm statistics before stage 1: blend (of the sources') or reestimate (on target images).")] = _TRAIN_DEFAULTS.bn_init,
    image_size: Annotated[Optional[int], typer.Option(help="Input size (default 224 for folders, 64 for synthetic).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for every random generator.")] = _TRAIN_DEFAULTS.seed,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:N.")] = "auto",
    amp: Annotated[bool, typer.Option(help="Mixed precision on CUDA (bf16 where supported, else fp16).")] = _TRAIN_DEFAULTS.amp,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 0,
    force: Annotated[bool, typer.Option(help="Replace an existing run directory (or discard an interrupted one).")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run of the same config from its last epoch.")] = False,
) -> None:
    """Train one method into a run directory: stage 1, fold (merge methods), stage 2."""
    from mmexport.train import TrainConfig, train as run_training

    config = TrainConfig(
        arch=arch, source_a=source_a, source_b=source_b, data=data, out=str(out), method=method,
        granularity=granularity, merge_epochs=merge_epochs, finetune_epochs=finetune_epochs, batch_size=batch_size,
        lr_logits=lr_logits, lr_head=lr_head, lr_backbone=lr_backbone, weight_decay=weight_decay, schedule=schedule,
        warmup_epochs=warmup_epochs, patience=patience, class_weights=class_weights, sampler=sampler, augment=augment,
        bn_init=bn_init, image_size=image_size, seed=seed, device=device, amp=amp, num_workers=workers, force=force,
        resume=resume,
    )
    rank = int(os.environ.get("RANK", "0"))
    progress = RichProgress() if rank == 0 else None
    try:
        run_dir = run_training(config, progress, command=_command_line())
    finally:
        if progress is not None:
            progress.finish()
    if rank == 0:
        _print_run_summary(run_dir)


def _print_run_summary(run_dir: Path) -> None:
    from mmexport.workflows import inspect_run

    summary = inspect_run(run_dir)
    manifest = summary["manifest"]
    classes = manifest.get("model", {}).get("classes", [])
    final = manifest.get("training", {}).get("final", {})
    for split, metrics in final.items():
        console.print(f"  final {split}: accuracy {metrics['accuracy']:.3f}  macro-F1 {metrics['macro_f1']:.3f}")
    split = "test" if "test" in final else "val"
    if split in final and classes:
        per_class = final[split]["per_class"]
        table = Table(title=f"per class, {split} (confusion matrix in manifest.json)", title_justify="left")
        for column in ("class", "precision", "recall", "F1", "support"):
            table.add_column(column, justify="left" if column == "class" else "right")
        for index, name in enumerate(classes):
            table.add_row(name, f"{per_class['precision'][index]:.3f}", f"{per_class['recall'][index]:.3f}",
                          f"{per_class['f1'][index]:.3f}", f"{per_class['support'][index]:.0f}")
        console.print(table)
    console.print(f"[green]run written to[/green] {run_dir}")


@app.command("fold")
def fold_command(
    run: RunArg,
    to: Annotated[str, typer.Option(help="safetensors, pt (a state dict loadable with weights_only=True) or onnx.")] = "safetensors",
    precision: Annotated[str, typer.Option(help="With --to onnx: fp32, fp16 (fp32 I/O) or int8 (static QDQ).")] = "fp32",
    calib_data: Annotated[Optional[str], typer.Option(help="int8 calibration images (train split); default: the run's dataset.")] = None,
    calib_images: Annotated[Optional[int], typer.Option(help="Number of calibration images (default 256, all if fewer).")] = None,
    calib_method: Annotated[str, typer.Option(help="int8 calibration: minmax, entropy or percentile.")] = "minmax",
    int8_target: Annotated[str, typer.Option(help="int8 flavour: onnxruntime (U8S8, fast on CPU) or tensorrt (symmetric S8S8).")] = "onnxruntime",
    data: Annotated[Optional[str], typer.Option(help="Labelled held-out images for the check (default: the run's dataset, test split else val).")] = None,
    comparisons: Annotated[bool, typer.Option(help="With --to onnx: also export the unmerged and dual-backbone models (benchmark baselines).")] = False,
) -> None:
    """Write the run's network in a deployable format, verified before it is published."""
    from mmexport.workflows import export_comparison_onnx, export_onnx_run, fold_run

    if to == "onnx":
        try:
            results = export_onnx_run(run, precision, calib_data=calib_data, calib_images=calib_images, data=data,
                                      int8_target=int8_target, calib_method=calib_method,
                                      progress=lambda message: console.print(f"  {message}", soft_wrap=True))
        except VerificationError as exc:
            if exc.report is not None:
                console.print(verification_table(exc.report))
            raise
        for result in results.values():
            console.print(verification_table(result["report"]))
            facts = result["facts"]
            console.print(f"[green]wrote[/green] {result['path']}  {facts['size_bytes'] / 1e6:.1f} MB  sha256 {facts['sha256'][:16]}…",
                          soft_wrap=True)
        if comparisons:
            for kind, facts in export_comparison_onnx(run).items():
                console.print(f"[green]wrote[/green] {kind} comparison model  {facts['size_bytes'] / 1e6:.1f} MB", soft_wrap=True)
        return
    result = fold_run(run, to)
    console.print(verification_table(result["report"]))
    reproduced = {None: "", True: " (bit-identical to the training-time fold)", False: " (differs from the previous fold!)"}
    console.print(f"[green]wrote[/green] {result['path']}  sha256 {result['sha256'][:16]}…{reproduced[result['reproduced']]}",
                  soft_wrap=True)


@app.command()
def verify(
    run: RunArg,
    backend: Annotated[Optional[list[str]], typer.Option(help="torch (unmerged vs folded) and/or onnx (torch fp32 vs each ONNX artifact); repeatable.")] = None,
    precision: Annotated[Optional[list[str]], typer.Option(help="With --backend onnx: fp32, fp16, int8 (repeatable; default: every artifact the run has).")] = None,
    data: Annotated[Optional[str], typer.Option(help="Also compare on real labelled images of this dataset.")] = None,
    samples: Annotated[int, typer.Option(help="Number of random inputs (and at most this many real images for torch).")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the random inputs.")] = 0,
    device: Annotated[str, typer.Option(help="Where torch runs: cpu, cuda, auto.")] = "cpu",
) -> None:
    """Check artifacts against their reference under the project's tolerance policy; exit 1 on failure."""
    from mmexport.manifest import RunDir
    from mmexport.workflows import ONNX_FILES, verify_onnx_run, verify_run

    backends = backend or ["torch"]
    unknown = [b for b in backends if b not in ("torch", "onnx", "trt")]
    if unknown:
        raise MMExportError(f"unknown backend {unknown[0]!r}; choose torch, onnx (trt arrives with the TensorRT runner)")
    if "trt" in backends:
        raise MMExportError("the TensorRT backend is not available yet: verify with --backend torch or --backend onnx")
    failed = False
    try:
        if "torch" in backends:
            report = verify_run(run, data=data, samples=samples, seed=seed, device=device)
            console.print(verification_table(report))
        if "onnx" in backends:
            outputs = RunDir.open(run).manifest["outputs"]
            chosen = precision or [p for p, name in ONNX_FILES.items() if name in outputs]
            if not chosen:
                raise MMExportError(f"{run}: no ONNX artifact yet; make one with `mmexport fold RUN --to onnx`")
            for report in verify_onnx_run(run, chosen, data=data, samples=samples, seed=seed):
                console.print(verification_table(report))
                failed = failed or not report.passed
    except VerificationError as exc:
        if exc.report is not None:
            console.print(verification_table(exc.report))
        raise
    if failed:
        raise VerificationError("verification failed (see the table above)")
    console.print("[green]verification passed[/green]")


@app.command()
def inspect(
    run: RunArg,
    all_parameters: Annotated[bool, typer.Option("--all", help="List every merged parameter, not only weights of conv layers.")] = False,
    plot: Annotated[Optional[Path], typer.Option(help="Also draw the per-layer mean σ(λ), input to output, to this PNG.")] = None,
) -> None:
    """Summarise a run's manifest and the per-layer mean merge coefficient (depth-wise view)."""
    from mmexport.workflows import inspect_run, plot_run_coefficients

    if plot is not None:
        written = plot_run_coefficients(run, plot, all_layers=all_parameters)
        console.print(f"[green]plot written to[/green] {written}")

    summary = inspect_run(run)
    manifest = summary["manifest"]
    config = manifest.get("config", {})
    console.print(f"[bold]{summary['path']}[/bold]  created {manifest.get('created')}  by `{manifest.get('command', '')}`")
    model = manifest.get("model", {})
    console.print(f"arch {model.get('arch')}  classes {', '.join(model.get('classes', []))}  image {model.get('image_size')}px  "
                  f"granularity {config.get('granularity')}  seed {manifest.get('seed')}")
    inputs = Table(title="inputs", title_justify="left")
    for column in ("input", "spec", "sha256"):
        inputs.add_column(column)
    for key, value in manifest.get("inputs", {}).items():
        inputs.add_row(key, str(value.get("spec", value.get("source", ""))), (value.get("sha256") or "—")[:16])
    console.print(inputs)
    outputs = Table(title="outputs", title_justify="left")
    for column in ("file", "kind", "size", "sha256", "state"):
        outputs.add_column(column)
    for name, entry in summary["outputs"].items():
        state = "[green]intact[/green]" if entry["state"] == "intact" else f"[red]{entry['state']}[/red]"
        outputs.add_row(name, entry["kind"], f"{entry['size_bytes'] / 1e6:.1f} MB", entry["sha256"][:16], state)
    console.print(outputs)
    checks = Table(title="verification", title_justify="left")
    for column in ("artifact", "policy", "when", "max abs error", "top-1", "result"):
        checks.add_column(column)
    for entry in manifest.get("verification", []):
        stats = [o for s in entry["input_sets"] for o in s["outputs"].values()]
        checks.add_row(
            entry.get("artifact", "?"), entry["tolerance"]["name"], entry.get("created", ""),
            f"{max(o['max_abs_error'] for o in stats):.3g}" if stats else "—",
            f"{min(o['top1_agreement'] for o in stats):.1%}" if stats else "—",
            "[green]pass[/green]" if entry["passed"] else "[red]FAIL[/red]",
        )
    console.print(checks)
    for split, metrics in manifest.get("training", {}).get("final", {}).items():
        console.print(f"final {split}: accuracy {metrics['accuracy']:.3f}  macro-F1 {metrics['macro_f1']:.3f}")
    rows = [r for r in summary["coefficients"] if all_parameters or (r["layer"] == "conv" and r["name"].endswith("weight"))]
    if rows:
        table = Table(title="mean weight of source A, σ(λ), input → output", title_justify="left")
        for column in ("#", "parameter", "layer", "σ(λ)", ""):
            table.add_column(column, justify="right" if column in ("#", "σ(λ)") else "left")
        for index, row in enumerate(rows):
            bar = round(20 * row["mean"])
            table.add_row(str(index), row["name"], row["layer"], f"{row['mean']:.3f}", "A " + "█" * bar + "·" * (20 - bar) + " B")
        console.print(table)


@app.command()
def bench(
    run: RunArg,
    engine: Annotated[str, typer.Option(help="torch (eager), onnx (ONNX Runtime) or trt (TensorRT, not available yet).")] = "onnx",
    precision: Annotated[str, typer.Option(help="fp32, fp16 or int8 (ONNX only).")] = "fp32",
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8,32",
    models: Annotated[str, typer.Option(help="Comma-separated: folded, unmerged, dual, single (stock torchvision net).")] = "folded,unmerged,dual,single",
    warmup: Annotated[float, typer.Option(help="Warm-up per model and batch size, seconds.")] = 1.0,
    duration: Annotated[Optional[float], typer.Option(help="Timed seconds per model and batch size (default 5 unless --iterations).")] = None,
    iterations: Annotated[Optional[int], typer.Option(help="Timed iterations per model and batch size instead of --duration.")] = None,
    rounds: Annotated[int, typer.Option(help="Interleaving rounds: models alternate this many times per batch size.")] = 5,
    threads: Annotated[Optional[int], typer.Option(help="Intra-op threads (ONNX Runtime session / torch).")] = None,
    device: Annotated[str, typer.Option(help="torch engine: auto, cpu, cuda.")] = "auto",
    device_timing: Annotated[Optional[str], typer.Option(help="GPU: time on the device with CUDA events; compute (copies excluded) or total (copies included).")] = None,
    cuda_graphs: Annotated[bool, typer.Option(help="GPU, torch engine: capture and replay CUDA graphs.")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write every number plus machine and versions here.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Latency and throughput vs batch size, PNG.")] = None,
) -> None:
    """Latency and throughput of the folded network against the unmerged, dual-backbone and stock models."""
    from mmexport.bench import BenchSettings
    from mmexport.benchrun import BenchRequest, bench_run, plot as draw, write_json

    try:
        sizes = tuple(int(b) for b in batch_sizes.split(","))
    except ValueError:
        raise MMExportError(f"--batch-sizes must be comma-separated integers, got {batch_sizes!r}") from None
    settings = BenchSettings(batch_sizes=sizes, warmup_s=warmup, rounds=rounds, iterations=iterations,
                             device_timing=device_timing,
                             duration_s=None if iterations is not None else (duration if duration is not None else 5.0))
    request = BenchRequest(engine=engine, precision=precision, models=tuple(m.strip() for m in models.split(",") if m.strip()),
                           threads=threads, device=device, cuda_graphs=cuda_graphs, settings=settings)
    with console.status("benchmarking") as status:
        report = bench_run(run, request, on_progress=lambda message: status.update(message))
    console.print(bench_table(report))
    console.print(ratio_table_view(report))
    for result in report["results"]:
        for warning in result.warnings:
            console.print(f"[yellow]warning[/yellow] {result.model} batch {result.batch_size}: {warning}", soft_wrap=True)
    if json_path is not None:
        write_json(report, json_path)
        console.print(f"[green]wrote[/green] {json_path}")
    if plot is not None:
        draw(report["results"], plot, f"{Path(report['run']).name}: {report['engine']} {report['precision']}")
        console.print(f"[green]wrote[/green] {plot}")


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
    table = Table(title="demo summary", title_justify="left")
    table.add_column("step")
    table.add_column("result")
    table.add_column("time", justify="right")
    t = summary["timings"]
    for label in ("A", "B"):
        s = summary[f"source_{label}"]
        table.add_row(f"source {label} ({s['task']})", f"val acc {s['val_accuracy']:.3f}  macro-F1 {s['val_macro_f1']:.3f}", f"{t[f'source_{label}']:.0f} s")
    mb = summary["merge_best"]
    table.add_row("stage 1 merge (best epoch)", f"val acc {mb['val_accuracy']:.3f}  macro-F1 {mb['val_macro_f1']:.3f}", "")
    table.add_row("MedMerge run", summary["run"], f"{t['train']:.0f} s")
    for name, stats in summary["verification"].items():
        table.add_row(f"fold check ({name})", f"max abs err {stats.max_abs_error:.3g}, top-1 {stats.top1_agreement:.1%}, N={stats.n_samples}", "")
    table.add_row("fold + verify", "bit-identical re-fold" if summary["fold"]["reproduced"] else "re-folded", f"{t['fold_verify']:.0f} s")
    for precision, export in summary["exports"].items():
        for name, stats in export["stats"].items():
            detail = f"max abs err {stats.max_abs_error:.3g}, top-1 {stats.top1_agreement:.1%}, N={stats.n_samples}"
            if stats.candidate_macro_f1 is not None:
                detail += f", macro-F1 {stats.reference_macro_f1:.3f} → {stats.candidate_macro_f1:.3f}"
            table.add_row(f"ONNX {precision} ({name})", detail, "")
        if "refused" in export:
            table.add_row(f"ONNX {precision}", f"[red]refused by the {precision} policy, not published[/red]: "
                          f"{escape(export['refused'].split(': ')[-1])}", "")
        else:
            table.add_row(f"ONNX {precision} file", f"{export['size_bytes'] / 1e6:.1f} MB", "")
    if "export" in t:
        table.add_row("export + verify", "", f"{t['export']:.0f} s")
    console.print(table)
    comparison = Table(title="MedMerge vs each source fine-tuned alone (same epochs), synthetic target", title_justify="left")
    for column in ("method", "test macro-F1", "test accuracy", "val macro-F1"):
        comparison.add_column(column, justify="left" if column == "method" else "right")
    for method, metrics in summary["comparison"].items():
        test = metrics.get("test", metrics["val"])
        comparison.add_row(method, f"{test['macro_f1']:.3f}", f"{test['accuracy']:.3f}", f"{metrics['val']['macro_f1']:.3f}")
    console.print(comparison)
    if summary["bench"]:
        console.print(ratio_table_view(summary["bench"]))
        for r in summary["bench"]["results"]:
            console.print(f"  {r.model:9s} ONNX Runtime batch 1: median {r.latency.median_ms:.2f} ms, file "
                          f"{(r.artifact_bytes or 0) / 1e6:.1f} MB", soft_wrap=True)
    console.print(f"total {sum(t.values()):.0f} s; everything is in {summary['out']} (see `mmexport inspect {summary['run']}`)",
                  soft_wrap=True)


def main() -> None:
    """Entry point: library errors become one red line and exit 1 (traceback with MMEXPORT_DEBUG=1).

    Click's standalone mode handles usage errors (exit 2) and Ctrl-C itself and lets
    every other exception through, so only MMExportError needs catching here.
    """
    command = typer.main.get_command(app)
    try:
        command.main(prog_name="mmexport", standalone_mode=True)
    except MMExportError as exc:
        if os.environ.get("MMEXPORT_DEBUG") == "1":
            raise
        error_console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True, highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
