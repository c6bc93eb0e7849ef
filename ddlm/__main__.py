import os
import sys

from ddlm.cli import main

code = main()
if "TORCHELASTIC_RUN_ID" in os.environ or "WORLD_SIZE" in os.environ:
    # Under torchrun, leave without the interpreter's shutdown: gloo's native worker threads can
    # still hold work objects whose tensors reach into Python, and destroying them while the
    # interpreter finalises aborts the process ("terminate called without an active exception";
    # pytorch/pytorch#179291) after every file is written, which torchrun reports as a failure.
    # Everything ddlm writes is closed by now (checkpoints, metrics, dashboards).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
