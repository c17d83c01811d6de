"""Speed benchmarks: miniqwen beside transformers (+PEFT) on the same weights (recorded in the README, never
asserted in tests).

    python -m experiments.benchmark --model DIR --data FILE [--sections peak,forward,train,...] [--repeats 3]

Sections (``--sections``, default all), each a plain function returning a JSON-ready dict:

* ``peak`` — this machine's matmul peak: an n × n square matmul in float32 and in the default dtype (GFLOP/s =
  2n³ / s), the denominator of every "fraction of peak" below; and its memory read bandwidth (summing 1 GiB).
* ``counting`` — the overhead of FLOP counting: a forward pass timed with and without a
  :class:`miniqwen.flop_count.FlopCounter`, and the counter's bookkeeping alone on a 24-layer model too narrow to hide
  it.
* ``throughput`` — miniqwen's prefill tokens/s and KV-cached decoding tokens/s at several batch sizes, and the
  rate at which a decoding step reads the weights (GB/s, and the fraction of the memory bandwidth with ``peak``).
* ``forward`` / ``train`` — one forward pass, and one LoRA training step (rank 4 on q, v; AdamW; clipping), of
  miniqwen and of transformers(+PEFT) in float32 and in the default dtype, with the logits' / losses' agreement,
  peak memory and the fraction of the matmul peak reached (FLOPs from :mod:`miniqwen.flop_count`'s closed forms).
* ``loss`` — miniqwen's validation loss in the default dtype against float32 (first ``--loss-chunks`` chunks).
* ``forecast`` — forecasting ``--trajectories`` validation trajectories (80 → 20 steps, greedy, LLMTIME) with
  miniqwen's forecaster and with transformers' ``generate`` batched the same way, plus both at batch 1 on the first
  ``--batch1-sample`` trajectories (extrapolated to all); wall time and the parse rate of both by our own parser.

Timings are medians of ``--repeats`` runs after a warm-up, the two implementations interleaved (alternating which
goes first) so that drifts in machine load hit both; the 100-trajectory forecasts run once each. ``counting``,
``throughput`` and ``forecast`` run in the default dtype (``--precision``). Peak memory is measured per call (see
:func:`~experiments.lib.benchmark.harness.memory_method`) and, for the whole process, after each section. Writes
``<out>/benchmark.json`` and a README-ready ``<out>/benchmark.md`` in a run directory with its run record (an earlier
benchmark run is replaced only with ``--overwrite``, a directory of other files never; checked, with every option,
before any section runs); the targets of the speed issue are
reported as met / not met. Nothing is charged to the FLOP ledger (a benchmark is not an experiment; the forecast's
counted FLOPs are recorded).
"""

from __future__ import annotations

import time

import torch

from miniqwen.atomic import atomic_write
from miniqwen.loading import resolve_model_dir

from .lib.benchmark import hf, options
from .lib.benchmark.counting import counting_bookkeeping, counting_overheads
from .lib.benchmark.forecast_speed import forecast_side_by_side
from .lib.benchmark.forward_train import forward_side_by_side, train_side_by_side
from .lib.benchmark.harness import dtype_names, process_peak_mib
from .lib.benchmark.loss_precision import loss_precision
from .lib.benchmark.peak import matmul_peak, memory_bandwidth
from .lib.benchmark.summary import check_targets, markdown, run_record
from .lib.benchmark.throughput import throughputs
from .lib.cli import check_positions, run_cli
from .lib.results import write_json
from .lib.run_directory import claim_out, record_written
from .lib.loader import resolve_precision
from .lib.dataset import load_dataset
from .lib.settings import DataSettings

STAGE = "benchmark"
#: options left out of the recorded settings (recorded elsewhere, or a machine path)
UNRECORDED = ("model", "data", "out", "sections", "overwrite")


def build_parser():
    return options.build_parser("python -m experiments.benchmark", __doc__.split("\n\n")[0])


def run_section(section: str, args, model_dir, device: torch.device, default: str, results: dict) -> None:
    """Run one ``section`` with the options ``args``, adding its entries to ``results``."""
    dtypes = dtype_names(default)
    if section == "peak":
        results["matmul_peak"] = matmul_peak(args.peak_size, dtypes, args.repeats, device)
        results["memory_bandwidth"] = memory_bandwidth(args.bandwidth_mib, args.repeats, device)
    elif section == "counting":
        results["counting_bookkeeping"] = counting_bookkeeping(args.bookkeeping_repeats)
        results["counting_overhead"] = counting_overheads(model_dir, default, device, args.counting_lengths,
                                                          args.repeats)
    elif section == "throughput":
        results["throughput"] = throughputs(model_dir, default, device, args.throughput_batches, args.prompt_len,
                                            args.new_tokens, results.get("memory_bandwidth"))
    elif section == "forward":
        results["forward"] = forward_side_by_side(model_dir, args.data, args.forward_batch, args.forward_seq, dtypes,
                                                  args.repeats, device, results.get("matmul_peak"))
    elif section == "train":
        results["train"] = train_side_by_side(model_dir, args.data, args.train_batch, args.train_context, dtypes,
                                              args.repeats, device, results.get("matmul_peak"))
    elif section == "loss":
        results["loss"] = loss_precision(model_dir, args.data, args.loss_chunks, args.loss_context,
                                         args.loss_batch_size, default, device)
    elif section == "forecast":
        results["forecast"] = forecast_side_by_side(model_dir, args.data, args.trajectories, args.batch1_sample,
                                                    args.gen_batch_size, default, device, args.context_steps,
                                                    args.horizon, args.decimals)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sections = options.check_options(args)
    hf.require(*options.packages_needed(sections))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    default = resolve_precision(args.precision, device)
    model_dir = resolve_model_dir(args.model)
    if "loss" in sections:  # a context past the model's positions would fail only after minutes (or run out of memory)
        check_positions(args.model, [args.loss_context], "--loss-context")
    # a run directory like every stage's: a benchmark run is replaced only with --overwrite, other files never
    claim_out(args.out, STAGE, {k: v for k, v in vars(args).items() if k not in UNRECORDED},
              overwrite=args.overwrite)
    torch.manual_seed(0)
    results = run_record(args.model, device, default, sections,
                         {k: v for k, v in vars(args).items() if k not in UNRECORDED})
    if set(options.NEEDS_DATA) & set(sections):
        results["data"] = load_dataset(DataSettings(data=args.data, decimals=args.decimals)).record()
    results["seconds"], results["peak_memory_mib_after"] = {}, {}
    for section in sections:
        start = time.perf_counter()
        run_section(section, args, model_dir, device, default, results)
        results["seconds"][section] = time.perf_counter() - start
        results["peak_memory_mib_after"][section] = process_peak_mib(device)
        print(f"{section}: done in {results['seconds'][section]:.0f} s")
    results["targets"] = check_targets(results)
    write_json(args.out / "benchmark.json", results)
    table = markdown(results)
    atomic_write(args.out / "benchmark.md", table)
    print(table)
    record_written(args.out)
    print(f"wrote {args.out / 'benchmark.json'} and {args.out / 'benchmark.md'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
