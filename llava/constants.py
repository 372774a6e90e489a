"""Constants shared with LLaVA-NeXT.

The values are part of the public contract: lmms-eval's ``llava_onevision`` and
``llava_vid`` wrappers import them and build prompts/ids with them, so they
must stay identical to LLaVA-NeXT's.
"""

# Serving (controller / model worker) settings kept for API compatibility.
CONTROLLER_HEART_BEAT_EXPIRATION = 30
WORKER_HEART_BEAT_INTERVAL = 15
LOGDIR = "."

# Label value ignored by the loss.
IGNORE_INDEX = -100
# Placeholder id that ``tokenizer_image_token`` puts where "<image>" was;
# the model replaces it with the visual features.
IMAGE_TOKEN_INDEX = -200

DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
# Used by LLaVA-1.5-era scripts to mark where an image goes in a free-form query.
IMAGE_PLACEHOLDER = "<image-placeholder>"
