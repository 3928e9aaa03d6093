"""Import TensorFlow and Keras without the C++ start-up chatter on stderr.

TensorFlow's native libraries log through absl before logging is configured, so
``TF_CPP_MIN_LOG_LEVEL`` does not silence their import-time lines ("oneDNN custom operations
are on", "All log messages before absl::InitializeLog() ..."). Those lines are captured at the
file-descriptor level during the import and shown only if the import fails.
"""

from __future__ import annotations

import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _import_quietly():
    if "tensorflow" in sys.modules and sys.modules["tensorflow"] is not None:
        import keras
        import tensorflow

        return tensorflow, keras
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import keras
            import tensorflow
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return tensorflow, keras


tf, keras = _import_quietly()

__all__ = ["keras", "tf"]
