"""The quantization pipeline: the step contract (``step``), the block runner (``runner``) and the run
itself (``run.quantize``). Import from the submodules; this package imports nothing so that ``recipe`` can
depend on ``pipeline.step`` without a cycle."""
