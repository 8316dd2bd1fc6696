"""benchmarks/trace_overlap.py: the sweep that splits a step's GPU span by which kinds of kernel run."""

from __future__ import annotations

from benchmarks.trace_overlap import kernel_intervals, overlap_summary


def test_sweep_splits_the_span_by_kind():
    kernels = [
        (0.0, 10.0, "nvjet_gemm"),           # base alone 0-2
        (2.0, 6.0, "_shrink_kernel"),        # both 2-6
        (6.0, 14.0, "_expand_kernel"),       # both 6-10, LoRA alone 10-14
        (16.0, 20.0, "_rms_norm_kernel"),    # idle 14-16, base alone 16-20
        (17.0, 18.0, "vectorized_elementwise_kernel<FillFunctor<float>>"),  # LoRA inside base: both 17-18
    ]
    s = overlap_summary(kernels)
    assert s["span_us"] == 20.0
    assert (s["base_only_us"], s["both_us"], s["lora_only_us"], s["idle_us"]) == (5.0, 9.0, 4.0, 2.0)
    assert s["lora_kernel_us"] == 13.0 and s["base_kernel_us"] == 14.0
    assert sum(s[k] for k in ("base_only_us", "both_us", "lora_only_us", "idle_us")) == s["span_us"]


def test_back_to_back_kernels_leave_no_idle_time():
    s = overlap_summary([(0.0, 5.0, "a"), (5.0, 9.0, "_shrink_kernel"), (9.0, 12.0, "b")])
    assert (s["idle_us"], s["base_only_us"], s["lora_only_us"], s["both_us"]) == (0.0, 8.0, 4.0, 0.0)


def test_kernel_events_are_read_from_a_chrome_trace():
    trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "_shrink_kernel", "ts": 100.0, "dur": 7.0},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 90.0, "dur": 50.0},
        {"ph": "M", "name": "process_name"},
    ]}
    assert kernel_intervals(trace) == [(100.0, 107.0, "_shrink_kernel")]
    assert overlap_summary([])["span_us"] == 0.0
