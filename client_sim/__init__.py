"""Simulated iPhones: the Core ML training emulator, the devices, and their data.

The emulator (``emulator``) trains an updatable .mlmodel the way Core ML's ``MLUpdateTask`` does,
in TensorFlow; ``data`` loads MNIST-style data sets and the bundled sample; ``partition`` splits a
training set across devices with flwr-datasets' partitioners. Never imports ``fedcoreml.server``.
"""
