"""Run the end-to-end benchmark of chapter 09 and write its table and figure (`make bench`).

    python tools/bench.py                       # the full benchmark, about ten minutes on two quiet CPU cores
    python tools/bench.py --num-requests 16 --static-batch-sizes 4 16   # a quicker, smaller run

Results go to artifacts/bench/ (results.md, results.csv, bench.png), which git ignores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str]):
    from nanovllm_lib.bench import BenchConfig

    defaults = BenchConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=defaults.num_requests, help="requests in the workload")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the workload's lengths and prompts")
    parser.add_argument("--prompt-median", type=float, default=defaults.prompt_median, help="median prompt length in tokens")
    parser.add_argument("--output-median", type=float, default=defaults.output_median,
                        help="median number of tokens to generate")
    parser.add_argument("--max-output-len", type=int, default=defaults.max_output_len,
                        help="most tokens one request generates")
    parser.add_argument("--static-batch-sizes", type=int, nargs="+", default=list(defaults.static_batch_sizes),
                        help="batch sizes tried for static batching with transformers generate")
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs,
                        help="most sequences the engine runs in one step")
    parser.add_argument("--kv-cache-mib", type=int, default=defaults.kv_cache_mib, help="size of the engine's KV pool in MiB")
    parser.add_argument("--skip-one-at-a-time", action="store_true",
                        help="leave out the one-request-at-a-time baseline (the slowest part)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, one per core)")
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench", help="folder for the results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch
    from transformers import AutoModelForCausalLM

    from nanovllm_lib import load_model
    from nanovllm_lib.bench import BenchConfig, markdown_table, run_benchmark, summary_rows, write_report

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = BenchConfig(num_requests=args.num_requests, seed=args.seed, prompt_median=args.prompt_median,
                         output_median=args.output_median, max_output_len=args.max_output_len,
                         kv_cache_mib=args.kv_cache_mib, max_num_seqs=args.max_num_seqs,
                         static_batch_sizes=tuple(args.static_batch_sizes), one_at_a_time=not args.skip_one_at_a_time)
    start = time.perf_counter()
    torch.manual_seed(0)
    lm = load_model()
    hf_model = AutoModelForCausalLM.from_pretrained(lm.path, dtype=lm.model.lm_head.weight.dtype).eval()
    results = run_benchmark(config, lm, hf_model, log=lambda line: print(line, flush=True))
    paths = write_report(results, config, args.out)
    print()
    print(markdown_table(summary_rows(results)))
    print(f"\nwrote {', '.join(str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in paths)} "
          f"in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
