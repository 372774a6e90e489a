"""Entry point (group ``lmms_eval.models``): lmms-eval's ``llava_onevision`` and ``llava_vid`` become ours.

lmms-eval loads this group after its built-in models, with overwrite, so the names users already type
resolve to the subclasses in ``llava.eval``. Nothing heavy is imported here.
"""


def manifests():
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(model_id="llava_onevision", simple_class_path="llava.eval.llava_onevision.LlavaOneVision"),
        ModelManifest(model_id="llava_vid", simple_class_path="llava.eval.llava_vid.LlavaVid"),
    ]
