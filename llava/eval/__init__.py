"""lmms-eval plugin: ``--model llava_onevision`` / ``llava_vid`` with compression model args (see ``plugin``)."""
