"""The inference wing: captioning, question answering and retrieval as library functions.

``generators`` holds the :class:`~qformer_cli.inference.generators.Generator` interface, its
torch and onnxruntime implementations and the one batched loop that feeds either; ``caption``,
``vqa`` and ``retrieve`` are the use cases the commands (and :mod:`qformer_cli.api`) call.
Nothing here imports the training package.
"""
