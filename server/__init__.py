"""The coordinator: rounds, aggregation strategy, model store, and the ``fedcoreml`` command.

It works on Core ML specs through ``fedcoreml.ios_bridge`` only and never imports TensorFlow.
"""
