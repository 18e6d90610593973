"""One module per method: its math as pure functions and its recipe step (a thin :class:`Step`).

Every module here is imported when a recipe is parsed (:func:`normquant.pipeline.step.discover_steps`), so a
new method is one new file; nothing else is edited."""
