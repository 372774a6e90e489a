"""Entry point (group ``lmms_eval.models``): lmms-eval's ``llava_onevision`` and ``llava_vid`` become ours, and
its wrappers of transformers' own video LLMs (``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``, ``llava_hf``) take the
compression model args.

lmms-eval loads this group after its built-in models, with overwrite, so the names users already type
resolve to the subclasses in ``llava.eval``. Nothing heavy is imported here.
"""


def manifests():
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(model_id="llava_onevision", simple_class_path="llava.eval.llava_onevision.LlavaOneVision"),
        ModelManifest(model_id="llava_vid", simple_class_path="llava.eval.llava_vid.LlavaVid"),
        ModelManifest(model_id="qwen2_vl", simple_class_path="llava.eval.native_wrappers.Qwen2VL"),
        ModelManifest(model_id="qwen2_5_vl", simple_class_path="llava.eval.native_wrappers.Qwen25VL",
                      chat_class_path="llava.eval.native_wrappers.Qwen25VLChat"),
        ModelManifest(model_id="qwen3_vl", simple_class_path="llava.eval.native_wrappers.Qwen3VL",
                      chat_class_path="llava.eval.native_wrappers.Qwen3VLChat"),
        ModelManifest(model_id="llava_hf", simple_class_path="llava.eval.native_wrappers.LlavaHf",
                      chat_class_path="llava.eval.native_wrappers.LlavaHfChat"),
    ]
