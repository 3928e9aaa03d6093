"""Core ML side of fedcoreml: the .mlmodel format, its parameters, and a reference interpreter.

Everything a coordinator needs to build, read, write and judge the exact .mlmodel bytes that a
device receives, without Core ML itself (which does not exist on Linux) and without TensorFlow.
"""
