"""The tools around the engine, each behind an `mla` command: bench (and its roofline), bench --kernels
(kernel_bench), bench --kernels --compile-for (gpu_check), tune, plan and perplexity. They use the engine's public
objects; the engine never imports them."""
