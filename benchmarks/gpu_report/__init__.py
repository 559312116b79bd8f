"""Verify the project on a CUDA machine with one command, and write one report of what ran, passed and failed.

    python -m benchmarks.gpu_report --data PATH --out DIR
    python -m benchmarks.gpu_report --out DIR --parts tests kernels              # no data needed
    python -m benchmarks.gpu_report --data PATH --out DIR --seeds 1 --configs eager compile   # shorter
    python -m benchmarks.gpu_report --data PATH --out DIR --cpu-smoke            # every part, toy-sized, on the CPU

Parts, each run in processes of its own, so that a crash (a segfault, a sticky CUDA error, a hang past
--timeout) fails that part, or that run, and the rest still run:
  tests           the CUDA test subset: tests marked `cuda`, or skipped by a skipif whose condition follows
                  torch.cuda.is_available() and whose reason names CUDA or a GPU; pass/fail per test from pytest's
                  junit XML (on a GPU this also picks the tests gated on the fused kernel being runnable)
  kernels         the fused GroupNorm+ReLU against eager F.group_norm + F.relu and torch.compile of that pair at
                  every norm shape of the gn and ln models (30 shapes over all layouts), by default at batch 512
                  in fp32 and bf16, NCHW and channels_last: 30 x 2 x 2 = 120 configurations. Each is checked
                  before it is timed (verify_kernel(strict=True), then the fused forward and all three gradients
                  against fp32 eager); a configuration that fails its check is a failed row and is not timed.
                  Forward and forward+backward, median GPU time from CUDA events over 100 calls, inputs cycled
                  past the L2 cache; the compiled pair is compiled afresh per configuration, twice (forward,
                  forward+backward)
  time_to_target  time to 70% per norm for eager/compile x unfused/fused, CUDA graphs on the compiled ones
                  (CONFIGS; fused only for gn and ln: 3 + 6 + 6 = 15 configurations), --seeds seeds each (default
                  3: 45 runs). Every run is a fresh process with empty inductor and Triton caches, so its compile
                  is cold; in that process an untimed warm-up (one epoch on 1,024 images, never compiled) first
                  pays the one-time costs and compiles and autotunes the fused kernel, so that autotuning never
                  lands inside a timed epoch. Steps to the target are recorded beside the time.

No GPU has run this yet, so durations are estimates from these counts, not measurements: tests a few
minutes; kernels 240 compiles of a few seconds each, 10-20 min; time_to_target 45 processes of start-up and
warm-up (about 20 s each) and 2-3 epochs, plus a cold compile (30-60 s) in the 30 compiled runs, 30-45 min:
about an hour in all. The report records each part's wall time. --seeds 1 cuts time_to_target to a third,
--kernel-dtypes bf16 --kernel-formats cl the kernels to a quarter.

--cpu-smoke runs every part's own code on the CPU at a toy size, in well under a minute: the tests part
collects (does not run) the CUDA tests, the kernels part checks and times one shape under TRITON_INTERPRET=1
with a one-call timer (and torch.compile's eager backend), time_to_target trains gn eager for one epoch on 256
images (cached as plain arrays: no ffcv start-up). Each part then reports "ok" or "failed"; no number it prints
is a result.

Writes DIR/report.md and DIR/report.json (atomically, after every part and every run, so an interrupted or
crashed report keeps what finished), DIR/logs/*.log (each process's output), DIR/tests/junit.xml,
DIR/time_to_target/<norm>-<config>/s<seed>/ (each run's metrics.json). Exit status: 0 when no part failed, 1
when one did, 130 when interrupted. Without CUDA (and without --cpu-smoke) it says so, runs the test selection
(every CUDA test is reported skipped), skips the rest and exits 0.

Modules: cli (flags, the report's life), tests_part, kernels_part, time_to_target_part (one part each, with the
code its child process runs), processes (child processes and their logs), render (report.md), plugin (the
pytest plugin that selects the CUDA tests).
"""
