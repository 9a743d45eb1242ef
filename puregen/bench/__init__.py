"""Throughput benchmarks: `puregen bench` and the measurements the scripts in `benchmarks/` share."""

from .flops import count_ebm_flops, count_unet_flops
from .measure import conv_ceiling, counted_flops, median_seconds, benchmark_images
from .throughput import format_summary, run_bench

__all__ = ["conv_ceiling", "count_ebm_flops", "count_unet_flops", "counted_flops", "median_seconds", "benchmark_images", "run_bench", "format_summary"]
