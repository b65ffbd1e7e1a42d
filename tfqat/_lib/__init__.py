"""Native artefacts built by ``pip install``: libtfqat_ops.so (the TFLite delegate) and tfqat_bench."""
