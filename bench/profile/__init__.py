"""`bench profile`: where one decode step and one prefill chunk spend their time
on this backend, by kind of operation, and how many kernels they launch.

MLX is lazy: a forward pass only records a graph, and the work happens when
something is evaluated. To time each part, the model's modules are wrapped for
the duration of one run (nothing inside them changes): a wrapper first
evaluates what its inputs still owe (that time belongs to the code that called
it), then runs its module, evaluates the output and synchronizes. Time spent in
a nested wrapper is its own group's, so every second of the run lands in
exactly one group, and "other" is what no module of a group ran (the
embedding, residual adds, the mask, the argmax). The step is also timed
without wrappers: the difference is the cost of syncing after every group.

Groups, found by the modules' names in each decoder layer (mlx-lm's layout):
attention (`self_attn`: projections, cache update, attention), norms and RoPE
(the layer norms, `rope`, `q_norm`/`k_norm`), router (an MoE block's own work:
the router matmul, the expert selection, the weighted combine), routed experts
(`experts`, mlx-lm's `switch_mlp`), shared expert, dense FFN (a feed-forward
block without experts), head (the final norm and the output projection) and
other. A group the model has no module for is absent.

The graph of each step is counted too, by primitive, with the views (reshape,
transpose, slice, broadcast...: no kernel, no copy) apart from the nodes that
launch a kernel. On MLX's CPU backend fast.rms_norm, fast.rope and
scaled_dot_product_attention are built from elementary ops, so the CPU's graph
is larger than a GPU's: the output says which backend's graph it counted.

The package by what it measures: groups.py says which module is which kind of
operation, clock.py times each group within one step, measure.py runs the
steps (a decode step, a prefill chunk) and gathers a Profile, output.py writes
it for a person. The graph's kernels and views are counted by bench/steps.py.
"""
