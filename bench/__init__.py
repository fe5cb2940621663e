"""Prefill, decode and memory benchmarks of MobileMoE against a dense baseline.

From a checkout this is `bench` (`python -m bench ...`); installed, the same
package is `mobilemoe_bench` (the `mobilemoe-bench` command), so its modules
import each other relatively.

    python -m bench run       # measure, write results.json, report.md and plots
    python -m bench report    # rebuild the report from results.json
    python -m bench plan      # will a model fit a memory budget at a context?
    python -m bench export-prompts / export-synthetic / export-parity
                              # what the Swift benchmark and parity test (ios/) read
    python -m bench.interleave  # the decode step's build against another revision's
"""
